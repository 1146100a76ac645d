"""The deploy files (ops/deploy): the image, the systemd units and the Kubernetes manifests.

Nothing here starts a cluster. The manifests are validated against Kubernetes' own schemas
(kubernetes-validate, strict: an unknown field is an error) and cross-checked against each other
and against the code: every Secret and ConfigMap a pod names exists, every setting a pod or unit
gives is one that `parley` accepts, the drain fits in the grace period, the init containers lay
out what `parley` reads. Every check is also run on a copy broken on purpose, which it must
reject.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate.utils
import pytest

from ops.certs import init_cluster
from ops.cli import build_parser
from ops.config import ConfigError
from ops.etcdserver import find_etcd_binary
from relay.settings import ClusterSettings, SettingsError
from relay.tunnel.certs import issue_files
from storage.etcd import parse_endpoints
from tests.ops import deploy_checks as dc

#: the oldest Kubernetes the manifests are written for, and the newest schema we have
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, dict[str, Any]]]:
    return dc.load_docs()


@pytest.fixture(scope="module")
def generated() -> dict[str, dict[str, str]]:
    return dc.generated_configmaps()


# -- Kubernetes: the files and their schema ---------------------------------------------------


def test_kustomization_lists_every_manifest_and_no_placeholder_secret() -> None:
    listed = set(dc.kustomization()["resources"])
    on_disk = {p.name for p in dc.KUBERNETES.glob("*.yaml")}
    assert on_disk - listed == {"kustomization.yaml", dc.SECRETS_EXAMPLE}
    assert listed <= on_disk
    # Applying the kustomization must never replace real keys with the placeholders.
    applied = [doc for name, doc in dc.load_docs() if name != dc.SECRETS_EXAMPLE]
    assert not [doc for doc in applied if doc["kind"] == "Secret"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schema(
    docs: list[tuple[str, dict[str, Any]]], version: str
) -> None:
    assert dc.schema_problems(docs, version) == []


def test_schema_check_rejects_broken_manifests(docs: list[tuple[str, dict[str, Any]]]) -> None:
    node = copy.deepcopy(dc.by_kind(docs, "StatefulSet", "parley-node"))
    node["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # a misspelt field
    assert "terminationGracePeriod" in " ".join(
        dc.schema_problems([("node.yaml", node)], KUBERNETES_VERSIONS[0])
    )
    relay = copy.deepcopy(dc.by_kind(docs, "DaemonSet", "parley-relay"))
    relay["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "3478/udp"
    assert dc.schema_problems([("relay.yaml", relay)], KUBERNETES_VERSIONS[0])
    odd = {"apiVersion": "parley.dev/v1", "kind": "Relay", "metadata": {"name": "x"}}
    assert "Couldn't find schema" in " ".join(dc.schema_problems([("x.yaml", odd)], "1.30.0"))


# -- Kubernetes: cross-references -------------------------------------------------------------


def test_everything_a_pod_names_is_defined(
    docs: list[tuple[str, dict[str, Any]]], generated: dict[str, dict[str, str]]
) -> None:
    assert dc.reference_problems(docs, generated) == []
    assert dc.parley_pods_problems(docs) == []


def _replace(docs: list[tuple[str, dict[str, Any]]], new: dict[str, Any]) -> list[Any]:
    kind, name = new["kind"], new["metadata"]["name"]
    return [(f, new if (d["kind"], d["metadata"]["name"]) == (kind, name) else d) for f, d in docs]


def test_cross_references_catch_what_is_missing(
    docs: list[tuple[str, dict[str, Any]]], generated: dict[str, dict[str, str]]
) -> None:
    no_token_keys = [(f, d) for f, d in docs if d["metadata"]["name"] != "parley-token-keys"]
    assert "Secret parley-token-keys is defined nowhere" in " ".join(
        dc.reference_problems(no_token_keys, generated)
    )
    cluster = copy.deepcopy(dc.by_kind(docs, "Secret", "parley-cluster"))
    del cluster["stringData"]["hint.secret"]
    assert "has no key hint.secret" in " ".join(
        dc.reference_problems(_replace(docs, cluster), generated)
    )
    assert "ConfigMap parley-config is defined nowhere" in " ".join(dc.reference_problems(docs, {}))
    node = copy.deepcopy(dc.by_kind(docs, "StatefulSet", "parley-node"))
    node["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9999"
    node["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = "opz"
    problems = " ".join(dc.reference_problems(_replace(docs, node), generated))
    assert "prometheus.io/port '9999' is no TCP containerPort" in problems
    assert "livenessProbe port opz is not a containerPort" in problems
    relay = copy.deepcopy(dc.by_kind(docs, "DaemonSet", "parley-relay"))
    del relay["spec"]["template"]["metadata"]["annotations"]
    del relay["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    problems = " ".join(dc.parley_pods_problems(_replace(docs, relay)))
    assert "not scraped on its ops port" in problems and "lacks requests or limits" in problems


def test_the_grace_period_covers_the_node_drain(docs: list[tuple[str, dict[str, Any]]]) -> None:
    budget = dc.drain_budget()
    assert budget >= 10  # DRAIN_WITHIN alone is 10 s today: the budget is read, not made up
    assert dc.grace_problems(docs, budget) == []
    node = copy.deepcopy(dc.by_kind(docs, "StatefulSet", "parley-node"))
    node["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = int(budget) - 1
    assert dc.grace_problems(_replace(docs, node), budget)
    del node["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]  # Kubernetes: 30 s
    assert dc.grace_problems(_replace(docs, node), 31.0)


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_pods_start_with_settings_parley_accepts(
    docs: list[tuple[str, dict[str, Any]]], generated: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    etcd = dc.by_kind(docs, "StatefulSet", "parley-etcd")
    namespace = etcd["metadata"]["namespace"]
    members = [
        f"{etcd['metadata']['name']}-{i}.{etcd['spec']['serviceName']}.{namespace}.svc:"
        f"{_ports(etcd['spec']['template']['spec']['containers'][0])['client']}"
        for i in range(etcd["spec"]["replicas"])
    ]
    seen = set()
    for workload, pod in dc.pod_templates(docs):
        for container in pod["spec"]["containers"]:
            if container["image"] != dc.PARLEY_IMAGE:
                continue
            role = container["args"][0]
            seen.add(role)
            build_parser().parse_args(container["args"])  # exits on an unknown flag
            config = dc.parley_config(docs, workload, container, generated, tmp_path)
            ports = _ports(container)
            assert config.cluster.etcd_uses_tls()
            assert parse_endpoints(config.cluster.etcd) == members
            certs = dc.mount_of(pod, container, config.cluster.certs + "/ca.pem")
            assert certs is not None and "emptyDir" in certs[0]
            values = dc.sample_pod_values(workload)
            # the ops port listens where the probes and the scrape annotation point
            pod_ip = values["status.hostIP" if pod["spec"].get("hostNetwork") else "status.podIP"]
            assert getattr(config, role).ops_address() == (pod_ip, ports["ops"])
            if role == "node":
                assert config.node.media == "relay"
                assert config.node.id == values["metadata.name"]
                assert config.node.signaling_host == values["status.podIP"]
                assert config.node.signaling_port == ports["signaling"]
            else:
                assert config.relay.id == values["spec.nodeName"]
                assert config.relay.listen_addresses() == [
                    (values["status.hostIP"], ports["public"])
                ]
                assert config.relay.tunnel_port == ports["tunnel"]
                assert config.relay.tunnel_host == values["status.hostIP"]
    assert seen == {"node", "relay"}


def test_a_setting_parley_does_not_have_is_caught(
    docs: list[tuple[str, dict[str, Any]]], generated: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    node = copy.deepcopy(dc.by_kind(docs, "StatefulSet", "parley-node"))
    container = node["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "PARLEY_NODE_SIGNALLING_HOST", "value": "$(POD_IP)"})
    with pytest.raises(ConfigError, match=r"node\.signalling_host"):
        dc.parley_config(docs, node, container, generated, tmp_path)
    container["env"].pop()
    bad_toml = {**generated["parley-config"], "parley.toml": "[node]\nmedia = 'udp'\n"}
    with pytest.raises(ConfigError, match=r"node\.media"):
        dc.parley_config(docs, node, container, {"parley-config": bad_toml}, tmp_path)


def test_etcd_flags_are_etcds(docs: list[tuple[str, dict[str, Any]]]) -> None:
    """Every flag of the etcd StatefulSet exists (in Debian's etcd 3.4, the image runs 3.5),
    and its TLS files are in its TLS volume."""
    etcd = dc.by_kind(docs, "StatefulSet", "parley-etcd")
    pod = etcd["spec"]["template"]
    container = pod["spec"]["containers"][0]
    out = subprocess.run([find_etcd_binary(), "--help"], capture_output=True, text=True, timeout=30)
    known = set(re.findall(r"--[a-z0-9-]+", out.stdout + out.stderr))
    assert "--client-cert-auth" in known
    flags = [arg.partition("=")[0] for arg in container["args"]]
    assert [f for f in flags if f not in known] == []
    assert [f for f in ["--client-cert-authh", "--listen-client-url"] if f in known] == []
    values = dict(arg.partition("=")[::2] for arg in container["args"])
    assert "--client-cert-auth" in values and "--peer-client-cert-auth" in values
    for flag in ("--trusted-ca-file", "--cert-file", "--key-file", "--peer-cert-file"):
        found = dc.mount_of(pod, container, values[flag])
        assert found is not None, flag
        volume, key = found
        items = [i["path"] for s in volume["projected"]["sources"] for i in s["secret"]["items"]]
        assert key in items, flag
    urls = ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls")
    assert all(values[u].startswith("https://") for u in urls)
    peers = values["--initial-cluster"].split(",")
    assert len(peers) == etcd["spec"]["replicas"]


# -- Kubernetes: the init containers lay out what parley reads --------------------------------

#: what each Secret holds, as secrets.example.yaml's commands make it from `parley certs`
SECRET_FILES = {
    "parley-cluster": ["ca.pem", "hint.secret", "cluster.key"],
    "parley-etcd-tls": ["etcd-server.pem", "etcd-server.key"],
    "parley-node-certs": ["node-*.pem", "node-*.key"],
    "parley-relay-certs": ["relay-*.pem", "relay-*.key"],
    "parley-token-keys": ["token-keys/*.pub"],
}


def _script_default(script: str, name: str) -> str:
    found = re.search(r'"\$\{' + name + r":-([^}]+)\}\"", script)
    assert found, name
    return found.group(1)


def _secret_volume(volume: dict[str, Any]) -> tuple[str, list[str] | None]:
    secret = volume["secret"]
    items = secret.get("items")
    return secret["secretName"], None if items is None else [i["path"] for i in items]


def _lay_out(
    docs: list[tuple[str, dict[str, Any]]],
    generated: dict[str, dict[str, str]],
    workload: dict[str, Any],
    certs: Path,
    tmp: Path,
) -> subprocess.CompletedProcess[str]:
    """Run the workload's init container on ``certs`` (`parley certs` output), its Secrets
    mounted as the manifest says; the result lands in ``tmp``/out."""
    pod = workload["spec"]["template"]
    init = pod["spec"]["initContainers"][0]
    script_path = init["command"][1]
    found = dc.mount_of(pod, init, script_path)
    assert found is not None and init["command"][0] == "/bin/sh"
    script = generated[found[0]["configMap"]["name"]][found[1]]
    secrets_dir = _script_default(script, "SECRETS_DIR")
    out_dir = _script_default(script, "CERTS_DIR")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    secrets, out = tmp / "secrets", tmp / "out"
    out.mkdir(parents=True)
    for mount in init["volumeMounts"]:
        volume = volumes[mount["name"]]
        if mount["mountPath"] == out_dir:
            assert "emptyDir" in volume
            continue
        if "secret" not in volume:
            continue
        assert mount["mountPath"].startswith(secrets_dir + "/")
        name, items = _secret_volume(volume)
        target = secrets / mount["mountPath"][len(secrets_dir) + 1 :]
        target.mkdir(parents=True)
        for pattern in SECRET_FILES[name]:
            for file in certs.glob(pattern):
                if items is None or file.name in items:
                    shutil.copy(file, target / file.name)
    (tmp / "script.sh").write_text(script)
    env = {
        "PATH": "/usr/bin:/bin",
        **dc.container_env(workload, init),
        "SECRETS_DIR": str(secrets),
        "CERTS_DIR": str(out),
    }
    return subprocess.run(
        ["/bin/sh", str(tmp / "script.sh")], env=env, capture_output=True, text=True, timeout=30
    )


def _certs(tmp: Path) -> Path:
    certs = tmp / "certs"
    init_cluster(certs)
    for i in range(3):
        issue_files(certs, "node", f"parley-node-{i}")
    issue_files(certs, "relay", "machine-1")
    return certs


def test_secrets_example_holds_what_parley_certs_makes(
    docs: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    certs = _certs(tmp_path)
    examples = {
        d["metadata"]["name"]: set(d["stringData"]) for _, d in docs if d["kind"] == "Secret"
    }
    assert set(examples) == set(SECRET_FILES)
    for name, keys in examples.items():
        made = {f.name for pattern in SECRET_FILES[name] for f in certs.glob(pattern)}
        assert made, name
        for key in keys:  # KID and MACHINE stand for a token key's id and a machine's name
            shape = key.replace("KID", "*").replace("MACHINE", "*")
            assert any(fnmatch.fnmatchcase(m, shape) for m in made), f"{name}: {key}"
        if not any("*" in pattern for pattern in SECRET_FILES[name]):
            assert keys == made, name


@pytest.mark.parametrize(
    ("kind", "name"), [("StatefulSet", "parley-node"), ("DaemonSet", "parley-relay")]
)
def test_init_container_lays_out_what_parley_reads(
    docs: list[tuple[str, dict[str, Any]]],
    generated: dict[str, dict[str, str]],
    tmp_path: Path,
    kind: str,
    name: str,
) -> None:
    workload = dc.by_kind(docs, kind, name)
    result = _lay_out(docs, generated, workload, _certs(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    container = workload["spec"]["template"]["spec"]["containers"][0]
    role = container["args"][0]
    env = dc.container_env(workload, container)
    ident = env[f"PARLEY_{role.upper()}_ID"]
    cluster = ClusterSettings(etcd="https://192.0.2.1:2379", certs=str(out))
    assert cluster.credentials(role, ident)
    assert cluster.etcd_tls(role, ident) is not None
    assert cluster.hint_secrets()
    for key in out.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "ca.key" not in present and not any(
        p.startswith("token-keys/") and p.endswith(".key") for p in present
    )
    members = sorted(p for p in present if p.startswith(("node-", "relay-")))
    assert members == [f"{role}-{ident}.key", f"{role}-{ident}.pem"]  # its own pair only
    if role == "node":
        assert cluster.sealer()
        assert cluster.token_keys()
    else:  # a relay needs neither the cluster key nor the token keys
        assert "cluster.key" not in present
        with pytest.raises(SettingsError):
            cluster.token_keys()


def test_init_container_names_the_missing_certificate(
    docs: list[tuple[str, dict[str, Any]]], generated: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    init_cluster(certs)
    issue_files(certs, "node", "parley-node-7")  # not the pod's
    workload = dc.by_kind(docs, "StatefulSet", "parley-node")
    result = _lay_out(docs, generated, workload, certs, tmp_path)
    assert result.returncode != 0
    assert "parley certs issue --dir DIR node parley-node-0" in result.stderr


# -- systemd ----------------------------------------------------------------------------------

UNITS = {"node": "parley-node.service", "relay": "parley-relay.service"}


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing: Debian's systemd (ops/bootstrap.sh installs it)")
    return found


def _verify(units: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on copies whose ExecStart runs this venv's parley (verify
    checks that the program exists)."""
    parley = Path(sys.executable).parent / "parley"
    paths = []
    for name, text in units.items():
        path = tmp / name
        path.write_text(text.replace("/opt/parley/bin/parley", str(parley)))
        paths.append(str(path))
    return subprocess.run(
        [_analyze(), "verify", *paths], capture_output=True, text=True, timeout=60, cwd=tmp
    )


def _unit_texts() -> dict[str, str]:
    return {name: (dc.SYSTEMD / name).read_text() for name in UNITS.values()}


def test_units_verify(tmp_path: Path) -> None:
    result = _verify(_unit_texts(), tmp_path)
    # verify warns about unknown keys and bad values on stderr and still exits 0
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("KillSignall=SIGTERM", "Unknown key"),
        ("ProtectSystem=strictly", "Failed to parse"),
        ("Environment=PARLEY_NODE_ID=%Q", "specifier"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, line: str, complaint: str) -> None:
    texts = _unit_texts()
    node = UNITS["node"]
    texts[node] = texts[node].replace("[Service]\n", f"[Service]\n{line}\n", 1)
    result = _verify(texts, tmp_path)
    assert complaint.lower() in (result.stdout + result.stderr).lower(), result.stderr


def test_units_are_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score (0 best, 10 worst) stays at 2 or below; without the
    hardening lines it would not."""
    analyze = _analyze()

    def exposure_ok(text: str, name: str) -> bool:
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run(
            [analyze, "security", "--offline=yes", "--threshold=20", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode == 0

    for name, text in _unit_texts().items():
        assert exposure_ok(text, name), name
        softened = "\n".join(
            line
            for line in text.splitlines()
            if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
        )
        assert not exposure_ok(softened, "soft-" + name)


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_stops_restarts_and_starts_with_accepted_settings(role: str, tmp_path: Path) -> None:
    text = (dc.SYSTEMD / UNITS[role]).read_text()
    budget = dc.drain_budget()
    assert dc.unit_problems(text, role, budget) == []
    exec_start = dc.unit_value(dc.read_unit(text), "Service", "ExecStart")
    assert exec_start is not None
    build_parser().parse_args(exec_start.split()[1:])
    toml = tmp_path / "parley.toml"
    toml.write_text((dc.SYSTEMD / "parley.toml.example").read_text())
    env_file = (dc.SYSTEMD / "parley.env.example").read_text()
    config = dc.unit_config(text, env_file, toml)
    assert config.cluster.etcd_uses_tls() and config.node.media == "relay"
    assert getattr(config, role).id == "machine-1"  # the short host name: %l
    ops = getattr(config, role).ops_address()
    assert ops is not None and not ipaddress.ip_address(ops[0]).is_loopback
    # the relay's candidate is the address it binds: never the unspecified address
    assert all(host not in ("0.0.0.0", "::") for host, _ in config.relay.listen_addresses())
    with pytest.raises(ConfigError, match=r"node\.signalling_host"):
        dc.unit_config(text, env_file + "PARLEY_NODE_SIGNALLING_HOST=10.0.0.1\n", toml)


def test_unit_checks_catch_a_short_stop() -> None:
    text = (dc.SYSTEMD / UNITS["node"]).read_text()
    shortened = re.sub(r"TimeoutStopSec=\S+", "TimeoutStopSec=10s", text)
    assert "TimeoutStopSec 10 s is shorter" in " ".join(
        dc.unit_problems(shortened, "node", dc.drain_budget())
    )
    assert "KillSignal" in " ".join(
        dc.unit_problems(text.replace("KillSignal=SIGTERM", "KillSignal=SIGKILL"), "node", 20)
    )


# -- the image --------------------------------------------------------------------------------


def _packages() -> list[str]:
    pyproject = tomllib.loads((dc.ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in include]


def test_dockerfile_builds_on_debian_with_libopus() -> None:
    text = dc.DOCKERFILE.read_text()
    assert dc.dockerfile_problems(text, _packages()) == []
    ignore = (dc.ROOT / ".dockerignore").read_text()
    assert dc.dockerignore_problems(text, ignore) == []


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("python:3.11-slim-bookworm", "python:3.11-alpine", "not a Debian release"),
        ("--no-install-recommends libopus0", "--no-install-recommends ca-certificates", "libopus0"),
        ("USER 10001:10001", "USER root", "runs as root"),
        ('ENTRYPOINT ["parley"]', 'ENTRYPOINT ["python"]', "entrypoint"),
        ("COPY relay ./relay\n", "", "relay is not copied"),
    ],
)
def test_dockerfile_check_catches_a_broken_image(old: str, new: str, complaint: str) -> None:
    text = dc.DOCKERFILE.read_text()
    assert old in text
    assert complaint in " ".join(dc.dockerfile_problems(text.replace(old, new), _packages()))


def test_dockerignore_check_catches_an_excluded_package() -> None:
    text = dc.DOCKERFILE.read_text()
    ignore = (dc.ROOT / ".dockerignore").read_text() + "sessions\n"
    assert dc.dockerignore_problems(text, ignore) == [
        "COPY sessions: excluded by .dockerignore (sessions)"
    ]
