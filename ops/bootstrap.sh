#!/usr/bin/env bash
# One command to set up and run Parley on a fresh Debian machine.
#
#   bash ops/bootstrap.sh up [ARGS]     install what `parley up` needs, then run it
#   bash ops/bootstrap.sh test [ARGS]   install what the tests need, then run pytest
#   bash ops/bootstrap.sh install       install only (the test extras included)
#   bash ops/bootstrap.sh packages up|test   print the Debian packages a mode installs
#
# Installs Debian packages with apt-get (as root, or through sudo) when they are missing, creates
# ./.venv and installs this checkout into it (editable). Re-running skips what is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-}"
[ $# -gt 0 ] && shift
case "$mode" in
  up|test|install|packages) ;;
  *) echo "usage: bash ops/bootstrap.sh up|test|install [ARGS]" >&2; exit 2 ;;
esac

# What each mode needs from Debian. The tests check that every program they start comes from
# one of these (or from Debian's required base): tests/programs.py.
#   etcd-server  etcd, the cluster's store (parley up, and a fresh one per test)
#   libopus0     Opus for opuslib
#   etcd-client  etcdctl: tests compact etcd's history under a live watch
#   espeak-ng    real speech for the audio and interop tests
#   chromium     the browser interop tests
#   systemd      systemd-analyze: the tests verify the units in ops/deploy/systemd (systemd is
#                of priority important, not required: a minimal container lacks it)
up_packages=(etcd-server libopus0)
test_packages=("${up_packages[@]}" etcd-client espeak-ng chromium systemd)
if [ "$mode" = packages ]; then
  case "${1:-}" in
    up) printf '%s\n' "${up_packages[@]}" ;;
    test|install) printf '%s\n' "${test_packages[@]}" ;;
    *) echo "usage: bash ops/bootstrap.sh packages up|test" >&2; exit 2 ;;
  esac
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

debian_packages=("${test_packages[@]}")
if [ "$mode" = up ]; then debian_packages=("${up_packages[@]}"); fi
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Parley needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$python" -m venv .venv
fi
extras="[test]"
stamp=".venv/.parley-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing parley$extras into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".$extras"
  echo "$want" > "$stamp"
fi

case "$mode" in
  up) exec .venv/bin/parley up "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  install) echo "bootstrap: done; the CLI is .venv/bin/parley" >&2 ;;
esac
