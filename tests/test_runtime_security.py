"""A default Session probed from outside, as another local process (or another machine) would: what listens
where, and which calls are refused (issue: security and fault hardening)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import ray
import redis
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from os_probes import listeners_of_this_process_tree, tcp_listeners

from kvmesh import Agent, Pipeline
from kvmesh.runtime.grpc_client import open_channel
from kvmesh.runtime.wire import DRIVER, Kind
from kvmesh.v1 import agent_pb2, agent_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def outward_address() -> str:
    """This machine's address towards the outside (what another machine would dial)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it picks the outbound interface
        return probe.getsockname()[0]


PIPELINE = Pipeline("probe", [Agent("echo", "Repeat: {query}", max_tokens=2)])  # held: its agents live on


@pytest.fixture(scope="module")
def addresses(runtime_session) -> dict[str, str]:
    """name -> host:port of every gRPC server the session started: driver, workers, a pipeline's agents."""
    runtime_session.run(PIPELINE, "hello")
    workers = {w.name: w.address for w in ray.get(runtime_session.registry.workers.remote())}
    agents = runtime_session._agents_for(PIPELINE).addresses
    return {"driver": runtime_session.sink.address, **workers, **{f"agent {k}": v for k, v in agents.items()}}


def test_every_listener_kvmesh_started_is_on_loopback(runtime_session, addresses):
    listeners = tcp_listeners()
    for name, address in addresses.items():
        port = int(address.rsplit(":", 1)[1])
        assert port in listeners, (name, address)
        assert all(is_loopback(a) for a in listeners[port]), f"{name} listens on {listeners[port]}"
    assert (runtime_session.config.redis_url or "").startswith("unix://")  # its Redis has no TCP port at all


def test_no_process_the_session_started_listens_off_loopback(runtime_session, addresses):
    """Ray's own servers included: the GCS, the raylet, every worker process and Ray's agents."""
    listeners = listeners_of_this_process_tree()
    names = " ".join(listeners)
    assert "gcs_server" in names and "raylet" in names, listeners  # the table does see Ray's processes
    outside = {name: where for name, where in listeners.items() if not all(is_loopback(a) for a in where)}
    assert not outside, f"listening off loopback: {outside}"


def test_the_sessions_redis_is_a_private_socket_that_wants_a_password(runtime_session):
    socket_path = runtime_session.redis.socket_path
    assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o700  # other users cannot reach it
    for password in (None, "guess"):  # no password, a wrong one
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(unix_socket_path=socket_path, password=password).get("anything")
    cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
    secret = runtime_session.config.redis_url.split(":", 2)[2].split("@", 1)[0]  # unix://:PASSWORD@path
    assert len(secret) >= 32 and not any(secret.encode() in line for line in cmdlines)


def test_calls_without_the_session_token_are_refused(addresses):
    for name, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError):  # reflection would map the services for an attacker
                ProtoReflectionDescriptorDatabase(channel).get_services()
            if name.startswith("worker"):
                with pytest.raises(grpc.RpcError) as refused:
                    request = worker_pb2.GenerateRequest(parts=[worker_pb2.PromptPart(text="hi")])
                    list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=10))
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    agent_pb2_grpc.AgentServiceStub(channel).Deliver(agent_pb2.Message(kind=Kind.OUTPUT), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_an_agent_takes_start_and_cancel_only_from_its_driver(runtime_session, addresses):
    agent = addresses["agent echo"]
    with open_channel(agent, runtime_session.config) as channel:  # the session's token, not the driver's key
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        for kind in (Kind.START, Kind.CANCEL):
            forged = agent_pb2.Message(kind=kind, run_id="forged", source=DRIVER, driver="127.0.0.1:1")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Deliver(forged)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "only from this agent's session driver" in (refused.value.details() or "")


def test_a_second_ray_driver_cannot_join_the_embedded_cluster(runtime_session):
    """Through the outward address nothing answers; through loopback (another local user) the token refuses."""
    host, port = runtime_session.cluster.address.rsplit(":", 1)
    assert is_loopback(host)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outward_address(), int(port)), timeout=10).close()
    joining = {  # a plain Ray driver, as a stranger would write it; kvmesh's own connect, as a user would
        "ray": f"import ray\nray.init(address='{host}:{port}', log_to_driver=False)\n",
        "kvmesh": f"from kvmesh.runtime.cluster import connect\nconnect('{host}:{port}')\n",
    }
    then = "import ray\nprint('joined', ray.get(ray.remote(lambda: 1).remote()))\n"
    # Ray dials a loopback address through the outward one unless told it is a single machine; kvmesh's
    # connect finds that out by itself (no variable set in its case)
    single_machine = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    own = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}
    cases = [("ray", single_machine, False), ("ray", single_machine | wrong, False), ("kvmesh", own, True)]
    for driver, env, joins in cases:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | env
        done = subprocess.run(
            [sys.executable, "-c", joining[driver] + then],
            env=clean,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # the session's own token joins: the refusals are the token's doing, not an unreachable address
        assert ("joined 1" in done.stdout) == joins, (driver, env, done.stdout, done.stderr[-2000:])


def test_an_agents_inbox_holds_at_most_its_bound_of_runs_that_never_start(runtime_session, addresses):
    """OUTPUTs of runs whose START never comes (a driver gone mid-run) would pile up: the oldest go."""
    with open_channel(addresses["agent echo"], runtime_session.config) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        for n in range(1024 + 60):  # the default bound is 1024 waiting runs
            stub.Deliver(agent_pb2.Message(kind=Kind.OUTPUT, run_id=f"orphan-{n}", source="nobody"))
        assert stub.Status(agent_pb2.StatusRequest()).waiting_runs == 1024
    assert runtime_session.run(PIPELINE, "still answering").outputs["echo"]  # the agent works on
