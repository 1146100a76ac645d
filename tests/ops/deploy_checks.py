"""Readers and checks of the deploy files (ops/deploy), used by tests/ops/test_deploy.py.

Each ``*_problems`` function returns what is wrong, as sentences (empty: nothing), so that a
test can run it on the real files and on a deliberately broken copy.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from ops.config import Config, ConfigError, load_config
from sessions.node import daemon, host
from storage.etcd import open_etcd

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "ops" / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "Dockerfile"
#: the Secrets' shapes, with placeholders; never applied
SECRETS_EXAMPLE = "secrets.example.yaml"
#: the image ops/deploy/Dockerfile builds, as the manifests name it (kustomization: images)
PARLEY_IMAGE = "parley"

Doc = dict[str, Any]


# -- the node's drain, from the code ----------------------------------------------------------


def drain_budget() -> float:
    """Seconds a node may take to stop after SIGTERM, from the code's own constants: moves for
    DRAIN_WITHIN, four etcd calls outside that window (publish `draining`, list the targets,
    deregister, revoke the lease) of at most the client's timeout each, and WIND_DOWN for the
    clients to hear their last events (sessions/node/daemon.py, host.py)."""
    rpc_timeout = inspect.signature(open_etcd).parameters["rpc_timeout"].default
    return float(daemon.DRAIN_WITHIN + host.WIND_DOWN + 4 * rpc_timeout)


# -- Kubernetes: reading ----------------------------------------------------------------------


def kustomization(directory: Path = KUBERNETES) -> Doc:
    data: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def load_docs(directory: Path = KUBERNETES) -> list[tuple[str, Doc]]:
    """Every object of the kustomization's resources and of the Secrets example, by file."""
    names = [*kustomization(directory).get("resources", []), SECRETS_EXAMPLE]
    out = []
    for name in names:
        for doc in yaml.safe_load_all((directory / name).read_text()):
            if doc:
                out.append((name, doc))
    return out


def generated_configmaps(directory: Path = KUBERNETES) -> dict[str, dict[str, str]]:
    """The kustomization's generated ConfigMaps: name -> {key: file content}."""
    out: dict[str, dict[str, str]] = {}
    for generator in kustomization(directory).get("configMapGenerator", []):
        files = {}
        for item in generator.get("files", []):
            key, _, path = item.rpartition("=")
            files[key or Path(path).name] = (directory / path).read_text()
        out[generator["name"]] = files
    return out


def pod_templates(docs: list[tuple[str, Doc]]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) of every workload."""
    for _, doc in docs:
        template = doc.get("spec", {}).get("template")
        if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet") and template:
            yield doc, template


def containers(pod: Doc) -> list[Doc]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def by_kind(docs: list[tuple[str, Doc]], kind: str, name: str) -> Doc:
    for _, doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"{kind} {name}")


def find_container(docs: list[tuple[str, Doc]], kind: str, name: str, container: str) -> Doc:
    template = by_kind(docs, kind, name)["spec"]["template"]
    return next(c for c in containers(template) if c["name"] == container)


def sample_pod_values(workload: Doc) -> dict[str, str]:
    """What the downward API gives a pod of ``workload``, made up but well-formed."""
    name = workload["metadata"]["name"]
    pod_name = f"{name}-0" if workload["kind"] == "StatefulSet" else f"{name}-x7k2p"
    return {
        "metadata.name": pod_name,
        "metadata.namespace": workload["metadata"].get("namespace", "default"),
        "spec.nodeName": "machine-1",
        "status.podIP": "10.1.2.3",
        "status.hostIP": "192.0.2.10",
    }


def container_env(workload: Doc, container: Doc) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: fieldRefs from sample values, and
    ``$(NAME)`` expanded from the variables defined before it."""
    fields = sample_pod_values(workload)
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(item["value"])
            )
        else:
            value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env[item["name"]] = value
    return env


def mount_of(pod: Doc, container: Doc, path: str) -> tuple[Doc, str] | None:
    """The volume mounted in ``container`` that holds ``path``, and ``path`` inside it."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        base = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(base) and mount["name"] in volumes:
            return volumes[mount["name"]], path[len(base) :]
    return None


# -- Kubernetes: checks -----------------------------------------------------------------------


def schema_problems(docs: list[tuple[str, Doc]], version: str) -> list[str]:
    """Each object against Kubernetes ``version``'s schema, strictly (no unknown field)."""
    problems = []
    for name, doc in docs:
        where = f"{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    return problems


def _secret_keys(docs: list[tuple[str, Doc]]) -> dict[str, set[str]]:
    return {
        doc["metadata"]["name"]: {*doc.get("stringData", {}), *doc.get("data", {})}
        for _, doc in docs
        if doc["kind"] == "Secret"
    }


def _configmap_keys(docs: list[tuple[str, Doc]], generated: Mapping[str, Any]) -> dict[str, set]:
    found = {name: set(files) for name, files in generated.items()}
    for _, doc in docs:
        if doc["kind"] == "ConfigMap":
            found[doc["metadata"]["name"]] = {*doc.get("data", {}), *doc.get("binaryData", {})}
    return found


def _declared_ports(pod: Doc) -> dict[str | int, Doc]:
    ports: dict[str | int, Doc] = {}
    for container in pod["spec"].get("containers", []):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port
            if "name" in port:
                ports[port["name"]] = port
    return ports


def reference_problems(
    docs: list[tuple[str, Doc]], generated: Mapping[str, Any] | None = None
) -> list[str]:
    """What the pods name but nothing defines: Secrets and ConfigMaps (and their keys), volumes,
    ports of probes, Services and scrape annotations, governing Services."""
    generated = generated_configmaps() if generated is None else generated
    secrets, configmaps = _secret_keys(docs), _configmap_keys(docs, generated)
    services = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Service"}
    problems = []

    def source(where: str, kind: str, name: str, items: list[Doc] | None) -> None:
        known = secrets if kind == "Secret" else configmaps
        if name not in known:
            problems.append(f"{where}: {kind} {name} is defined nowhere")
            return
        for item in items or []:
            if item["key"] not in known[name]:
                problems.append(f"{where}: {kind} {name} has no key {item['key']}")

    for workload, pod in pod_templates(docs):
        where = f"{workload['kind']} {workload['metadata']['name']}"
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in volumes.values():
            if "secret" in volume:
                secret = volume["secret"]
                source(where, "Secret", secret["secretName"], secret.get("items"))
            if "configMap" in volume:
                source(
                    where,
                    "ConfigMap",
                    volume["configMap"]["name"],
                    volume["configMap"].get("items"),
                )
            for part in volume.get("projected", {}).get("sources", []):
                if "secret" in part:
                    source(where, "Secret", part["secret"]["name"], part["secret"].get("items"))
                if "configMap" in part:
                    cm = part["configMap"]
                    source(where, "ConfigMap", cm["name"], cm.get("items"))
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in claims:
                    problems.append(
                        f"{where}: {container['name']} mounts no volume {mount['name']}"
                    )
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if key in ref:
                        source(where, kind, ref[key]["name"], [ref[key]])
        ports = _declared_ports(pod)
        for container in spec.get("containers", []):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                get = container.get(probe, {}).get("httpGet")
                if get is not None and get["port"] not in ports:
                    problems.append(f"{where}: {probe} port {get['port']} is not a containerPort")
        annotations = pod["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            port = annotations.get("prometheus.io/port", "")
            declared = ports.get(int(port)) if port.isdigit() else None
            if declared is None or declared.get("protocol", "TCP") != "TCP":
                problems.append(f"{where}: prometheus.io/port {port!r} is no TCP containerPort")
            if annotations.get("prometheus.io/path") != "/metrics":
                problems.append(f"{where}: prometheus.io/path is not /metrics")
        if workload["kind"] == "StatefulSet":
            governing = services.get(workload["spec"]["serviceName"])
            if governing is None or governing["spec"].get("clusterIP") != "None":
                problems.append(f"{where}: no headless Service {workload['spec']['serviceName']}")
    for name, service in services.items():
        selector = service["spec"].get("selector", {})
        matched = [
            pod
            for _, pod in pod_templates(docs)
            if selector.items() <= pod["metadata"].get("labels", {}).items()
        ]
        if not matched:
            problems.append(f"Service {name}: its selector matches no pod")
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if matched and not any(target in _declared_ports(pod) for pod in matched):
                problems.append(f"Service {name}: targetPort {target} is no containerPort")
    return problems


def parley_pods_problems(docs: list[tuple[str, Doc]]) -> list[str]:
    """Every pod that runs parley is scraped and probed on its ops port, runs as a non-root
    user and has resource requests and limits."""
    problems = []
    for workload, pod in pod_templates(docs):
        where = f"{workload['kind']} {workload['metadata']['name']}"
        ports = _declared_ports(pod)
        for container in pod["spec"]["containers"]:
            if container["image"] != PARLEY_IMAGE:
                continue
            ops = ports.get("ops")
            annotations = pod["metadata"].get("annotations", {})
            if ops is None or annotations.get("prometheus.io/port") != str(ops["containerPort"]):
                problems.append(f"{where}: not scraped on its ops port")
            for probe in ("readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet", {})
                if get.get("path") != "/healthz" or ports.get(get.get("port")) is not ops:
                    problems.append(f"{where}: {probe} is not GET /healthz on the ops port")
            if not pod["spec"].get("securityContext", {}).get("runAsNonRoot"):
                problems.append(f"{where}: may run as root")
        for container in containers(pod):
            resources = container.get("resources", {})
            if not resources.get("requests") or not resources.get("limits"):
                problems.append(f"{where}: {container['name']} lacks requests or limits")
    return problems


def grace_problems(docs: list[tuple[str, Doc]], budget: float) -> list[str]:
    """A node pod's grace period covers the drain (SIGTERM to SIGKILL)."""
    problems = []
    for workload, pod in pod_templates(docs):
        runs_node = any(c.get("args", [])[:1] == ["node"] for c in pod["spec"]["containers"])
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if runs_node and grace < budget:
            problems.append(
                f"{workload['metadata']['name']}: terminationGracePeriodSeconds {grace} is "
                f"shorter than the node's drain, {budget:g} s"
            )
    return problems


def parley_config(
    docs: list[tuple[str, Doc]],
    workload: Doc,
    container: Doc,
    generated: Mapping[str, dict[str, str]],
    tmp: Path,
) -> Config:
    """The configuration ``container`` starts with: the ConfigMap file PARLEY_CONFIG names,
    overridden by its environment. Raises ConfigError."""
    env = container_env(workload, container)
    found = mount_of(workload["spec"]["template"], container, env["PARLEY_CONFIG"])
    if found is None or "configMap" not in found[0]:
        raise ConfigError(f"PARLEY_CONFIG {env['PARLEY_CONFIG']} is in no ConfigMap volume")
    volume, key = found
    configmaps = {**generated}
    for _, doc in docs:
        if doc["kind"] == "ConfigMap":
            configmaps[doc["metadata"]["name"]] = doc.get("data", {})
    file = tmp / f"{container['name']}.toml"
    file.write_text(configmaps[volume["configMap"]["name"]][key])
    return load_config(file, env=env)


# -- systemd ----------------------------------------------------------------------------------


def read_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


def read_env_file(text: str) -> dict[str, str]:
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


def seconds(value: str) -> float:
    """A systemd time span in seconds (``45``, ``45s``, ``1min 30s``)."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def unit_problems(text: str, role: str, budget: float) -> list[str]:
    """What a unit must say beyond what systemd-analyze checks: how it stops and restarts."""
    unit = read_unit(text)
    problems = []
    if unit_value(unit, "Service", "KillSignal") != "SIGTERM":
        problems.append("KillSignal is not SIGTERM")
    if unit_value(unit, "Service", "Restart") != "on-failure":
        problems.append("Restart is not on-failure")
    stop = seconds(unit_value(unit, "Service", "TimeoutStopSec") or "90s")
    if role == "node" and stop < budget:
        problems.append(f"TimeoutStopSec {stop:g} s is shorter than the node's drain, {budget:g} s")
    for key in ("NoNewPrivileges", "ProtectSystem", "User"):
        if not unit_value(unit, "Service", key):
            problems.append(f"{key} is not set")
    exec_start = shlex.split(unit_value(unit, "Service", "ExecStart") or "")
    if exec_start[1:2] != [role]:
        problems.append(f"ExecStart does not run `parley {role}`")
    return problems


def unit_config(text: str, env_file: str, toml: Path, hostname: str = "machine-1") -> Config:
    """The configuration a unit starts with: its Environment= (``%l``: ``hostname``), then its
    environment file, with PARLEY_CONFIG pointed at ``toml``. Raises ConfigError."""
    unit = read_unit(text)
    env = {}
    for key, value in unit.get("Service", []):
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val.replace("%l", hostname)
    env.update(read_env_file(env_file))
    env["PARLEY_CONFIG"] = str(toml)
    return load_config(env=env)


# -- the Dockerfile ---------------------------------------------------------------------------

#: Debian's releases an image may be built on, by codename
DEBIAN_CODENAMES = ("bookworm", "trixie")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_problems(text: str, packages: list[str]) -> list[str]:
    """Every stage on a Debian base, libopus0 from apt in the final one, this checkout's
    packages copied in, a non-root user, and `parley` as the entrypoint."""
    steps = dockerfile_instructions(text)
    args = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        if word == "FROM":
            break
    stages: list[list[tuple[str, str]]] = []
    problems = []
    for word, rest in steps:
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest.split()[0])
            name, _, tag = image.partition(":")
            debian = name in ("debian", "python") and any(c in tag for c in DEBIAN_CODENAMES)
            if not debian:
                problems.append(f"base image {image} is not a Debian release")
            stages.append([])
        elif stages:
            stages[-1].append((word, rest))
    if not stages:
        return ["no FROM"]
    final = stages[-1]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    if not re.search(r"apt-get install[^&;]*\blibopus0\b", runs):
        problems.append("the final stage does not apt-get install libopus0")
    copied = {
        src
        for word, rest in (s for stage in stages for s in stage)
        if word == "COPY" and "--from" not in rest
        for src in rest.split()[:-1]
    }
    for package in [*packages, "pyproject.toml"]:
        if package not in copied:
            problems.append(f"{package} is not copied into the image")
    users = [rest for word, rest in final if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final stage runs as root")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if not entry or yaml.safe_load(entry[-1]) != ["parley"]:
        problems.append('the entrypoint is not ["parley"]')
    return problems


def dockerignore_problems(dockerfile: str, dockerignore: str) -> list[str]:
    """What the Dockerfile copies from the context that .dockerignore leaves out."""
    patterns = [
        line.strip()
        for line in dockerignore.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    problems = []
    for word, rest in dockerfile_instructions(dockerfile):
        if word != "COPY" or "--from" in rest:
            continue
        for src in rest.split()[:-1]:
            hit = [p for p in patterns if fnmatch.fnmatch(src, p.lstrip("/"))]
            if hit:
                problems.append(f"COPY {src}: excluded by .dockerignore ({hit[0]})")
    return problems
