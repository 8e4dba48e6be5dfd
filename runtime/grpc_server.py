"""Starting a kvmesh gRPC server: bind, limits, token check, TLS, health checking and reflection.

Every server binds `config.host` on a free port (127.0.0.1 by default; anywhere else only with a
token, which RuntimeConfig enforces), speaks the standard grpc.health.v1 and reflection services
beside its own, and reports the address it can be reached at for the registry.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import RuntimeConfig
from .grpc_interceptors import ServerCallInterceptor

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
AddService = Callable[[grpc.Server], None]


def message_options(config: RuntimeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


@dataclass
class GrpcServer:
    server: grpc.Server
    address: str  # host:port where others reach it
    health: health.HealthServicer

    def stop(self, grace_s: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def start_server(config: RuntimeConfig, services: Mapping[str, AddService], name: str) -> GrpcServer:
    """Serve `services` ({full service name: adder}) on a free port of config.host; `name` is for messages."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.server_threads, thread_name_prefix=f"grpc-{name}"),
        interceptors=[ServerCallInterceptor(config)],
        options=[*message_options(config), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,  # the executor's queue is otherwise unbounded
    )
    for add in services.values():
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    bind = f"[{config.host}]:0" if ":" in config.host else f"{config.host}:0"
    try:
        if config.tls:
            credentials = grpc.ssl_server_credentials([(config.read("tls_key"), config.read("tls_cert"))])
            port = server.add_secure_port(bind, credentials)
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError as exc:
        raise OSError(f"{name}: cannot bind a gRPC server to {bind} ({exc}); check RuntimeConfig.host") from exc
    if not port:
        raise OSError(f"{name}: cannot bind a gRPC server to {bind}; check RuntimeConfig.host")
    server.start()
    for service in ("", *services):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    host = _reachable_host(config.host)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return GrpcServer(server=server, address=address, health=health_servicer)


def _reachable_host(host: str) -> str:
    """The address others dial: the bound host, or this machine's outbound interface for a wildcard bind."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:  # UDP connect sends nothing; it only picks the interface a packet would leave from
            probe.connect(("2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1", 9))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())
