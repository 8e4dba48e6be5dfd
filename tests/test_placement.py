"""Placement without Ray: the user's Placement, its levels and defaults, the environment, reachability."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from kvmesh import Agent, Pipeline, PipelineError, Placement
from kvmesh.runtime.config import ConfigError, RuntimeConfig
from kvmesh.runtime.env_vars import ENV_VARS
from kvmesh.runtime.placement import (
    AGENT_RESOURCE,
    WORKER_RESOURCE,
    describe_cluster,
    resolve,
    shortfall,
    warn_if_short,
    worker_threads,
)
from kvmesh.runtime.reachability import check_reachable
from kvmesh.workers.worker import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = {"CPU": 2.0, "memory": 8.0 * (1 << 30)}
KVMESH_CLUSTER = {"CPU": 8.0, "GPU": 2.0, "memory": 64.0 * (1 << 30), WORKER_RESOURCE: 2.0, AGENT_RESOURCE: 100.0}


def test_placement_is_validated_read_only_hashable_and_picklable():
    bad_values = [
        {"num_cpus": -1},
        {"num_gpus": float("nan")},
        {"memory_bytes": 0},
        {"memory_bytes": 1.5},
        {"resources": {"": 1}},
        {"resources": {"x": 0}},
        {"resources": {"GPU": 1}},
        {"resources": ["x"]},
    ]
    for bad in bad_values:
        with pytest.raises(ValueError):
            Placement(**bad)
    given = {"pool": 1.0}
    placement = Placement(num_gpus=1, resources=given)
    given["pool"] = 5.0
    assert placement.resources == {"pool": 1.0}  # a copy, and read-only
    with pytest.raises(TypeError):
        placement.resources["pool"] = 2.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(placement)) == placement  # the config travels to every actor pickled
    assert hash(placement) == hash(Placement(num_gpus=1, resources={"pool": 1}))
    assert Placement(num_cpus=1).over(Placement(num_cpus=2, num_gpus=1)) == Placement(num_cpus=1, num_gpus=1)


def test_defaults_follow_the_cluster_workers_to_gpus_and_the_kvmesh_resources_when_offered():
    worker = resolve("worker", [RuntimeConfig().worker_placement], CPU_ONLY)
    assert worker.ray_options() == {"num_cpus": 0.5, "num_gpus": 0.0, "memory": 1 << 30}  # goes anywhere
    agent = resolve("agent", [None, RuntimeConfig().agent_placement], CPU_ONLY)
    assert agent.ray_options() == {"num_cpus": 0.0, "num_gpus": 0.0}
    worker = resolve("worker", [Placement()], KVMESH_CLUSTER)
    assert worker.num_gpus == 1.0 and worker.resources == {WORKER_RESOURCE: 1.0}
    agent = resolve("agent", [None, Placement()], KVMESH_CLUSTER)
    assert agent.num_gpus == 0.0 and agent.resources == {AGENT_RESOURCE: 0.01}
    # explicit beats automatic: {} means anywhere, num_gpus=0 keeps a worker on CPU in a GPU cluster
    assert resolve("worker", [Placement(num_gpus=0, resources={})], KVMESH_CLUSTER).ray_options() == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory": 1 << 30,
    }


def test_a_pipelines_agent_placement_wins_over_the_sessions_field_by_field():
    pipeline = Pipeline("p", [Agent("a", "{query}")], agent_placement={"resources": {"cpu-pool": 1}})
    session_level = Placement(num_cpus=0.25, resources={"other": 1})
    options = resolve("agent", [pipeline.agent_placement, session_level], KVMESH_CLUSTER)
    assert options.num_cpus == 0.25 and options.resources == {"cpu-pool": 1}
    assert pipeline.with_agent_options(max_tokens=4).agent_placement == pipeline.agent_placement
    with pytest.raises(PipelineError, match="unknown placement field"):
        Pipeline("p", [Agent("a", "{query}")], agent_placement={"gpus": 1})


def test_the_environment_sets_placements_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("KVMESH_WORKER_GPUS", "1")
    monkeypatch.setenv("KVMESH_WORKER_MEMORY_MB", "4096")
    monkeypatch.setenv("KVMESH_WORKER_RESOURCES", '{"kvmesh-worker": 1, "a100": 1}')
    monkeypatch.setenv("KVMESH_AGENT_RESOURCES", "{}")
    config = RuntimeConfig()
    assert config.worker_placement == Placement(
        num_gpus=1, memory_bytes=4096 << 20, resources={"kvmesh-worker": 1, "a100": 1}
    )
    assert resolve("agent", [None, config.agent_placement], KVMESH_CLUSTER).resources == {}
    assert RuntimeConfig(agent_placement={"num_cpus": 1}).agent_placement == Placement(num_cpus=1)  # a plain dict
    with pytest.raises(ConfigError, match=r"RuntimeConfig\.worker_placement: unknown placement field"):
        RuntimeConfig(worker_placement={"gpus": 1})
    for name, value, said in (
        ("KVMESH_WORKER_RESOURCES", "[1]", "JSON object"),
        ("KVMESH_WORKER_RESOURCES", "{kvmesh", "is not JSON"),
        ("KVMESH_AGENT_CPUS", "two", "is not a number"),
        ("KVMESH_WORKER_MEMORY_MB", "0", "memory_bytes"),
    ):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ConfigError, match=said):
                RuntimeConfig()


def test_shortfall_names_what_the_cluster_lacks_in_total(capsys):
    options = resolve("worker", [Placement()], KVMESH_CLUSTER)
    assert shortfall(options, 2, KVMESH_CLUSTER) == []
    lacking = shortfall(options, 3, KVMESH_CLUSTER)
    assert "3 GPU (the cluster has 2)" in lacking and f"3 {WORKER_RESOURCE!r} (the cluster has 2)" in lacking
    warn_if_short(options, 3, KVMESH_CLUSTER)
    assert "3 worker actor(s) ask for 0.5 CPU, 1 GPU, 1 GiB memory, 'kvmesh-worker': 1" in capsys.readouterr().err
    offered = describe_cluster(KVMESH_CLUSTER | {"node:10.0.0.1": 1.0, "object_store_memory": 1e9})
    assert offered == "'CPU': 8, 'GPU': 2, 'kvmesh-agent': 100, 'kvmesh-worker': 2, 'memory': 64 GiB"


def test_workers_share_their_nodes_cores_not_rays_cpu_reservation():
    one_node = [{"CPU": 8.0}]
    plain = resolve("worker", [Placement()], one_node[0])  # reserves 0.5 CPU: Ray alone would give 1 thread
    assert [worker_threads(plain, n, one_node) for n in (1, 2, 3, 8, 9)] == [8, 4, 2, 1, 1]
    gpu_nodes = [{"CPU": 16.0, "GPU": 1.0, WORKER_RESOURCE: 1.0}, {"CPU": 16.0, "GPU": 1.0, WORKER_RESOURCE: 1.0}]
    head = {"CPU": 4.0, AGENT_RESOURCE: 1000.0}  # hosts no worker: its cores do not count
    options = resolve("worker", [Placement()], KVMESH_CLUSTER)
    assert worker_threads(options, 2, [head, *gpu_nodes]) == 16  # one worker per GPU node
    assert worker_threads(options, 3, [head, *gpu_nodes]) == 8  # two on one of them
    env = RuntimeConfig(worker=WorkerConfig(threads=3))
    assert env.worker.threads == 3


def test_worker_settings_come_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("KVMESH_WORKER_THREADS", "6")
    monkeypatch.setenv("KVMESH_WORKER_WEIGHTS", "bf16")
    monkeypatch.setenv("KVMESH_WORKER_DEVICE", "cpu")
    worker = RuntimeConfig().worker
    assert (worker.threads, worker.weights, worker.device, worker.model) == (6, "bf16", "cpu", "smollm2")
    for name, bad in (
        ("KVMESH_WORKER_THREADS", "many"),
        ("KVMESH_WORKER_WEIGHTS", "fp8"),
        ("KVMESH_WORKER_DEVICE", "tpu"),
    ):
        with monkeypatch.context() as patch:
            patch.setenv(name, bad)
            with pytest.raises(ConfigError, match=bad):
                RuntimeConfig()
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        WorkerConfig(threads=0)
    with pytest.raises(ValueError, match="decode_graph must be True or False"):
        WorkerConfig(decode_graph="no")  # type: ignore[arg-type]


def test_loopback_defaults_are_refused_on_a_cluster_of_several_machines():
    check_reachable(RuntimeConfig(), ["10.0.0.1", "10.0.0.1"])  # one machine, several nodes: fine
    with pytest.raises(ConfigError) as refused:
        check_reachable(RuntimeConfig(), ["10.0.0.1", "10.0.0.2"])
    assert "KVMESH_HOST=0.0.0.0" in str(refused.value) and "KVMESH_REDIS_URL" in str(refused.value)
    spread = RuntimeConfig(host="0.0.0.0", token="t", redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="on loopback"):
        check_reachable(spread, ["10.0.0.1", "10.0.0.2"])
    check_reachable(RuntimeConfig(host="0.0.0.0", token="t", redis_url="redis://redis:6379/0"), ["a", "b"])
    check_reachable(RuntimeConfig(host="0.0.0.0", token="t", redis_url="memory"), ["a", "b"])


def test_every_kvmesh_variable_the_code_reads_is_listed_and_every_listed_one_is_read():
    folders = ("runtime", "workers", "kvcomm", "agents", "bench", "kvmesh")
    sources = [path for folder in folders for path in (ROOT / folder).rglob("*.py")]
    named = set()
    for path in sources:
        if path.name != "env_vars.py":
            named |= set(re.findall(r"\bKVMESH_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert named == set(ENV_VARS), (sorted(named - set(ENV_VARS)), sorted(set(ENV_VARS) - named))
