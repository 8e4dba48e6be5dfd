"""`kvmesh serve`: a session's workers behind an OpenAI-compatible HTTP API (FastAPI, openai_app.py).

Two ingresses serve the same app, each calling the session's workers through its registry, as agents do:
- `driver` (default): uvicorn in the driver's process, one event loop. No hop between processes: on a 2-core
  machine Ray Serve's proxy → replica → proxy hop cost ~15 ms of a ~500 ms TTFT (bench/NOTES.md), the driver's
  uvicorn ~1 ms. One process serves every request, which a single machine's workers saturate long before.
- `serve`: a Ray Serve deployment whose replicas sit behind Serve's proxy, for `--replicas` > 1 (HTTP work
  spread over a cluster). Joining a cluster where Serve already runs, its proxy's settings stand (Serve
  cannot change them while it runs): the server refuses to start if that proxy listens off loopback and no
  key is set.
Either binds `ServeConfig.host` (127.0.0.1 by default); any other host requires an API key.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from ray import serve
from ray.serve.context import _get_global_client  # Serve's own handle on its controller: its proxy settings

from .chat_door import ChatDoor, DoorSettings
from .cluster import ACTOR_ENV
from .config import ConfigError, is_loopback
from .driver import Session
from .openai_app import build_app
from .worker_actor import model_label

MAX_ONGOING_REQUESTS = 256  # per ingress process: each holds an open stream from a worker, not a core
INGRESSES = ("driver", "serve")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port
    api_key: str | None = field(default_factory=lambda: os.environ.get("KVMESH_API_KEY") or None, repr=False)
    replicas: int = 1  # HTTP ingress replicas behind Serve's proxy (ingress="serve")
    ingress: Literal["driver", "serve"] = "driver"  # uvicorn in the driver, or a Ray Serve deployment
    startup_timeout_s: float = 60.0  # the driver's uvicorn: until it listens

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("--host is empty; use 127.0.0.1 (default) or an interface address")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535] (0: a free one), got {self.port!r}")
        if self.api_key is not None and (not self.api_key.isprintable() or not self.api_key.strip()):
            raise ConfigError("the API key must be non-empty printable text (it travels in an HTTP header)")
        if not is_loopback(self.host) and self.api_key is None:
            raise ConfigError(
                f"serving on {self.host!r} (not loopback) requires an API key: set KVMESH_API_KEY (or --api-key) "
                "and give it to clients as their api_key"
            )
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"--replicas must be an int >= 1, got {self.replicas!r}")
        if self.ingress not in INGRESSES:
            raise ConfigError(f"--ingress must be one of {', '.join(INGRESSES)}, got {self.ingress!r}")
        if self.replicas > 1 and self.ingress != "serve":
            raise ConfigError(f"--replicas {self.replicas} needs --ingress serve (the driver's ingress is one process)")


@serve.deployment(
    name="openai",
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(ACTOR_ENV)}},  # I/O bound: packs anywhere
)
@serve.ingress()
class OpenAIIngress:
    """One replica: a ChatDoor and the FastAPI app over it (built in the replica, never pickled)."""

    def __init__(self, settings: DoorSettings) -> None:
        self.door = ChatDoor(settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.door)


class OpenAIServer:
    """The session's workers served over HTTP until close(); `base_url` is what OpenAI clients take."""

    def __init__(self, session: Session, config: ServeConfig | None = None) -> None:
        config = config or ServeConfig()
        self.model = model_label(session.model)
        self.config = config
        self.app_name = f"kvmesh-{session.id}"
        self._uvicorn: _DriverIngress | None = None
        self._owns_serve = False
        settings = DoorSettings(session.id, session.config, self.model, config.api_key)
        try:
            if config.ingress == "driver":
                self._uvicorn = _DriverIngress(build_app(ChatDoor(settings)), config)
                host, port = config.host, self._uvicorn.port
            else:
                host, port = self._start_serve(settings, config)
        except BaseException:
            self.close()
            raise
        shown = _reachable(host, session)
        self.base_url = f"http://[{shown}]:{port}/v1" if ":" in shown else f"http://{shown}:{port}/v1"

    def _start_serve(self, settings: DoorSettings, config: ServeConfig) -> tuple[str, int]:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines, in the driver
        self._owns_serve = _get_global_client(raise_if_no_controller_running=False) is None
        port = config.port or _free_port(config.host)
        serve.start(
            http_options={"host": config.host, "port": port},
            proxy_location="HeadOnly",  # one proxy, on the head node, in front of replicas on every node
            logging_config={"log_level": "WARNING"},
        )
        host, port = _proxy_address(config.host, port, config.api_key)
        ingress = OpenAIIngress.options(num_replicas=config.replicas).bind(settings)
        serve.run(ingress, name=self.app_name, route_prefix="/", logging_config={"log_level": "WARNING"})
        return host, port

    def close(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.close()
            self._uvicorn = None
        if self.config.ingress != "serve":
            return
        try:
            serve.delete(self.app_name)
            if self._owns_serve and not serve.status().applications:
                serve.shutdown()
        except Exception as exc:  # Ray is going down already: nothing of Serve's is left to stop
            print(f"kvmesh: stopping Ray Serve: {exc}", file=sys.stderr)

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DriverIngress:
    """uvicorn serving the app from a thread of this process, on a socket bound before it starts (so port 0
    gives a known free port and a bind error surfaces here, not in the thread)."""

    def __init__(self, app: FastAPI, config: ServeConfig) -> None:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((config.host, config.port))
        except OSError as exc:
            self.socket.close()
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror}; choose another --port (0: a free one)"
            ) from None
        self.port = int(self.socket.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(  # past the bound, 503: as a Serve replica's max_ongoing_requests
            app, log_level="warning", access_log=False, lifespan="off", limit_concurrency=MAX_ONGOING_REQUESTS
        ))  # fmt: skip
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True, name="kvmesh-http"
        )
        self.thread.start()
        deadline = time.monotonic() + config.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the HTTP server did not start within {config.startup_timeout_s:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True  # finishes open responses, then returns from run()
        self.thread.join(timeout=30)
        self.socket.close()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _proxy_address(host: str, port: int, api_key: str | None) -> tuple[str, int]:
    """Where Serve's proxy listens: where we asked, or where a Serve that was already running listens."""
    options: Any = _get_global_client().http_config
    if (options.host, options.port) != (host, port):
        print(
            f"kvmesh: Ray Serve was already running on this cluster: its proxy listens on {options.host}:"
            f"{options.port}",
            file=sys.stderr,
        )
    if not is_loopback(options.host) and api_key is None:
        raise ConfigError(
            f"Ray Serve on this cluster already listens on {options.host!r} (not loopback): set KVMESH_API_KEY (or "
            "--api-key) so that its clients need a key"
        )
    return options.host, options.port


def _reachable(host: str, session: Session) -> str:
    """The host to print: the bound one, or for a wildcard bind the head node's address."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    import ray

    heads = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    return heads[0] if heads else session.cluster.node_ips[0]


def run_serve(args: argparse.Namespace) -> int:
    """`kvmesh serve`: until Ctrl-C or SIGTERM, then everything it started is stopped."""
    from .pipeline_runs import session_config

    config = ServeConfig(  # validated before Ray starts
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        ingress=args.ingress,
        **({"api_key": args.api_key} if args.api_key else {}),
    )
    session_settings = session_config(args)
    started = time.perf_counter()
    print(f"kvmesh: starting {args.workers} worker(s) ({session_settings.worker.model}) …", file=sys.stderr, flush=True)
    with (
        Session(workers=args.workers, address=args.address, config=session_settings) as session,
        OpenAIServer(session, config) as server,
    ):
        where = "embedded local Ray" if session.cluster.embedded else f"Ray at {session.cluster.address}"
        print(
            f"kvmesh: {where}, ready in {time.perf_counter() - started:.1f} s; serving {server.model!r} "
            f"({_ingress_label(config)}" + (", API key required" if config.api_key else "") + ")",
            file=sys.stderr,
        )
        print(server.base_url, flush=True)  # stdout: the one line a script wants
        try:
            # Wake regularly: Ctrl-C may land on any of this process's threads (uvicorn's, gRPC's, Ray's), and
            # Python runs the handler only once the main thread wakes; a plain wait could sleep through it.
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nkvmesh: stopping the server, the workers and Ray …", file=sys.stderr, flush=True)
    return 0


def _ingress_label(config: ServeConfig) -> str:
    return "uvicorn in the driver" if config.ingress == "driver" else f"{config.replicas} Ray Serve replica(s)"
