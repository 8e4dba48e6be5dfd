"""The gRPC layer every kvmesh server and client uses: token, binding, TLS, size limits, deadlines,
health checking and reflection through the standard clients. Real servers on loopback, no Ray."""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kvmesh.runtime.agent_actor import AGENT_SERVICE
from kvmesh.runtime.config import ConfigError, InsecureTransportWarning, RuntimeConfig
from kvmesh.runtime.driver_sink import DriverSink
from kvmesh.runtime.errors import MessageTooLargeError
from kvmesh.runtime.grpc_client import describe_rpc_error, open_channel
from kvmesh.runtime.grpc_server import GrpcServer, start_server
from kvmesh.v1 import agent_pb2, agent_pb2_grpc

TOKEN = "s3cret-test-token"


@pytest.fixture
def serve():
    servers: list[GrpcServer] = []

    def start(config: RuntimeConfig) -> GrpcServer:
        sink = DriverSink()
        server = start_server(
            config, {AGENT_SERVICE: lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(sink, s)}, "test"
        )
        sink.address = server.address
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=0)


def status(channel: grpc.Channel, **kwargs) -> agent_pb2.AgentStatus:
    return agent_pb2_grpc.AgentServiceStub(channel).Status(agent_pb2.StatusRequest(), timeout=5, **kwargs)


def test_a_server_with_a_token_refuses_calls_without_it_and_serves_calls_with_it(serve):
    config = RuntimeConfig(token=TOKEN)
    server = serve(config)
    assert server.address.startswith("127.0.0.1:")
    with grpc.insecure_channel(server.address) as bare:
        with pytest.raises(grpc.RpcError) as refused:
            status(bare)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no token" in refused.value.details() and "KVMESH_TOKEN" in refused.value.details()
        with pytest.raises(grpc.RpcError) as wrong:
            status(bare, metadata=[("authorization", "Bearer not-it")])
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in wrong.value.details()
    with open_channel(server.address, config) as channel:
        assert status(channel).name == "driver"


def test_standard_health_checking_answers_serving_without_a_token(serve):
    server = serve(RuntimeConfig(token=TOKEN))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", AGENT_SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services_to_the_standard_client(serve):
    server = serve(RuntimeConfig())
    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {AGENT_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_binding_off_loopback_requires_a_token(serve):
    with pytest.raises(ConfigError, match="requires a shared token"):
        RuntimeConfig(host="0.0.0.0")
    with pytest.warns(InsecureTransportWarning, match="without TLS: the session token and every message"):
        config = RuntimeConfig(host="0.0.0.0", token=TOKEN)
    server = serve(config)
    assert not server.address.startswith(("0.0.0.0", "127."))  # an address others can dial
    with open_channel(server.address, config) as channel:
        assert status(channel).name == "driver"


def test_an_oversized_message_is_refused_with_the_limit_and_the_setting_named(serve):
    config = RuntimeConfig(max_message_bytes=64 * 1024)
    server = serve(config)
    big = agent_pb2.Message(kind=agent_pb2.Message.OUTPUT, run_id="r", text="x" * 100_000)
    # our client refuses before sending
    with open_channel(server.address, config) as channel, pytest.raises(MessageTooLargeError) as refused:
        agent_pb2_grpc.AgentServiceStub(channel).Deliver(big)
    assert "65,536 bytes" in str(refused.value) and "KVMESH_MAX_MESSAGE_MB" in str(refused.value)
    # any other client: the server refuses
    with grpc.insecure_channel(server.address) as bare, pytest.raises(grpc.RpcError) as exceeded:
        agent_pb2_grpc.AgentServiceStub(bare).Deliver(big, timeout=5)
    assert exceeded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_bytes" in describe_rpc_error(exceeded.value, "Deliver")


def test_every_call_gets_the_default_deadline():
    config = RuntimeConfig(call_deadline_s=0.3)
    # nothing listens there; wait_for_ready waits for it — until the deadline the interceptor set
    with open_channel("127.0.0.1:9", config) as channel, pytest.raises(grpc.RpcError) as late:
        agent_pb2_grpc.AgentServiceStub(channel).Status(agent_pb2.StatusRequest(), wait_for_ready=True)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_with_a_token_serves_tls_clients_and_refuses_plaintext(serve, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kvmesh-test",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    config = RuntimeConfig(token=TOKEN, tls_cert=str(cert), tls_key=str(key), tls_ca=str(cert))
    server = serve(config)
    with open_channel(server.address, config) as channel:
        assert status(channel).name == "driver"
    with grpc.insecure_channel(server.address) as plaintext, pytest.raises(grpc.RpcError) as refused:
        status(plaintext, metadata=[("authorization", f"Bearer {TOKEN}")])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="KVMESH_TLS_CERT and KVMESH_TLS_KEY"):
        RuntimeConfig(tls_cert="/etc/hostname")
    with pytest.raises(ConfigError, match="call_deadline_s"):
        RuntimeConfig(call_deadline_s=0)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        RuntimeConfig(max_message_bytes=10)


def test_a_server_refuses_calls_beyond_its_concurrency_bound_and_takes_them_again_after(serve):
    config = RuntimeConfig(token=TOKEN, server_threads=2, max_concurrent_rpcs=3)
    server = serve(config)
    with open_channel(server.address, config) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        feeds = [queue.Queue() for _ in range(3)]

        def requests(feed: queue.Queue):  # a stream the client keeps open: its handler holds a thread
            while (item := feed.get()) is not None:
                yield item

        streams = [reflection.ServerReflectionInfo(requests(feed), timeout=30) for feed in feeds]
        for feed in feeds:
            feed.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        answered: queue.Queue = queue.Queue()

        def first_answer(stream) -> None:
            answered.put(next(stream).list_services_response.service)

        readers = [threading.Thread(target=first_answer, args=(stream,), daemon=True) for stream in streams]
        for reader in readers:  # the server takes the streams in arrival order, which need not be this one
            reader.start()
        for _ in range(2):  # two run on the two threads; the third waits for one: 3 of 3 places held
            assert answered.get(timeout=30)
        assert answered.empty()
        with pytest.raises(grpc.RpcError) as refused:
            status(channel)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for feed in feeds:
            feed.put(None)
        assert answered.get(timeout=30)  # the third, once a thread was free
        for reader in readers:
            reader.join(timeout=30)
        for stream in streams:
            list(stream)
        assert status(channel).name == "driver"
