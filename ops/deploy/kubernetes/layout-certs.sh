#!/bin/sh
# Lays out the certificate directory that a relay or node reads (cluster.certs) from the Secrets
# its init container mounts, so that the running container sees only what it needs:
#
#   /secrets/cluster/*            every file the pod projects from parley-cluster (nodes: ca.pem,
#                                 hint.secret, cluster.key; relays: ca.pem and hint.secret)
#   /secrets/members/ROLE-ID.*    its own certificate and key, picked from every member's pair
#   /secrets/token-keys/*.pub     nodes only: the public keys that access tokens are checked with
#
# into /run/parley/certs (an in-memory emptyDir) as ca.pem, hint.secret, cluster.key,
# ROLE-ID.pem, ROLE-ID.key and token-keys/*.pub, keys mode 0600. PARLEY_ROLE is node or relay,
# PARLEY_ID the id its certificate names. tests/ops/test_deploy.py runs it on the output of
# `parley certs`.
set -eu
: "${PARLEY_ROLE:?node or relay}" "${PARLEY_ID:?the id its certificate names}"
secrets="${SECRETS_DIR:-/secrets}"
out="${CERTS_DIR:-/run/parley/certs}"

for file in "$secrets"/cluster/*; do
  install -m 0600 "$file" "$out/"
done
stem="$PARLEY_ROLE-$PARLEY_ID"
for ext in pem key; do
  if [ ! -e "$secrets/members/$stem.$ext" ]; then
    echo "no $stem.$ext in the Secret parley-$PARLEY_ROLE-certs: make it with" \
      "\`parley certs issue --dir DIR $PARLEY_ROLE $PARLEY_ID\` and add it there" >&2
    exit 1
  fi
  install -m 0600 "$secrets/members/$stem.$ext" "$out/"
done
if [ -d "$secrets/token-keys" ]; then
  mkdir -p "$out/token-keys"
  for file in "$secrets"/token-keys/*.pub; do
    install -m 0644 "$file" "$out/token-keys/"
  done
fi
echo "certificates for $stem laid out in $out"
