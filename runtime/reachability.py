"""On a Ray cluster of several machines, every address a process hands out must be reachable from the others.

Two defaults are loopback-only: the gRPC servers bind 127.0.0.1 (KVMESH_HOST), and with no
KVMESH_REDIS_URL the session starts a redis-server on a unix socket of its own machine. Both are right on one
machine (nodes started there share 127.0.0.1) and silently wrong across machines: agents would dial
127.0.0.1 for a worker elsewhere, and workers elsewhere would find no Redis. So a session refuses them
when the cluster spans machines, naming the settings to change.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

from kvmesh.kvcomm.redis_store import redact_url

from .config import ConfigError, RuntimeConfig, is_loopback


def check_reachable(config: RuntimeConfig, node_ips: Collection[str]) -> None:
    """Raise ConfigError if the config's addresses cannot work across these nodes (their IPs, alive ones)."""
    machines = sorted(set(node_ips))
    if len(machines) < 2:
        return
    listed = ", ".join(machines[:4]) + (" …" if len(machines) > 4 else "")
    where = f"this Ray cluster spans {len(machines)} machines ({listed})"
    problems = []
    if is_loopback(config.host):
        problems.append(
            f"the gRPC servers would bind {config.host} (KVMESH_HOST), which other machines cannot reach: set "
            "KVMESH_HOST=0.0.0.0 (each server then advertises its own address) and a shared KVMESH_TOKEN"
        )
    if config.redis_url is None:
        problems.append(
            "with no KVMESH_REDIS_URL the session would start a redis-server on this machine's loopback, which "
            "workers elsewhere cannot reach: set KVMESH_REDIS_URL=redis://HOST:6379/0 to a Redis every node "
            "reaches (deploy/ runs one), or KVMESH_REDIS_URL=memory to keep anchors per worker (nothing shared)"
        )
    elif config.redis_url.startswith("unix://"):
        problems.append(
            f"KVMESH_REDIS_URL={redact_url(config.redis_url)!r} is a unix socket of this machine: workers on other "
            "machines cannot reach it; give a redis:// address every node reaches"
        )
    elif config.redis_url.startswith(("redis://", "rediss://")):
        host = urlsplit(config.redis_url).hostname or ""
        if is_loopback(host):
            problems.append(
                f"KVMESH_REDIS_URL={redact_url(config.redis_url)!r} is on loopback: workers on other machines cannot "
                "reach it; give an address every node reaches"
            )
    if problems:
        raise ConfigError(f"{where}: " + "; and ".join(problems))
