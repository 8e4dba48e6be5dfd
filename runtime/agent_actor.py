"""An agent as a Ray actor: serves AgentService over gRPC and registers its address.

Built from the user's Agent and the pipeline's tools (shipped pickled, see portable.py). Its Ray
methods are for lifecycle and traces only (TracedActor); messages arrive over gRPC.
"""

from __future__ import annotations

import logging

import ray

from kvmesh.v1 import agent_pb2, agent_pb2_grpc

from . import portable
from .agent_runner import AgentRunner
from .agent_service import AgentServicer
from .config import RuntimeConfig
from .grpc_server import start_server
from .registry import NAMESPACE, registry_name
from .tracing import TracedActor, install

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


class AgentActor(TracedActor):
    def __init__(
        self, payload: bytes, group: str, workflow: str, session_id: str, config: RuntimeConfig, driver_key: str
    ) -> None:
        """payload: portable.dumps((agent, {tool name: Tool})) of the tools this agent's template uses;
        driver_key: the session driver's own secret, without which START and CANCEL are refused."""
        logging.basicConfig(level=logging.WARNING)
        agent, tools = portable.loads(payload)
        install(config, f"agent {group}/{agent.name}")
        registry = ray.get_actor(registry_name(session_id), namespace=NAMESPACE)
        self._address = ""
        runner = AgentRunner(agent, tools, group, workflow, registry, config)
        self.servicer = AgentServicer(runner, lambda: self._address, driver_key)
        self.server = start_server(
            config,
            {AGENT_SERVICE: lambda server: agent_pb2_grpc.add_AgentServiceServicer_to_server(self.servicer, server)},
            f"agent-{agent.name}",
        )
        self._address = self.server.address
        ray.get(registry.register_agent.remote(runner.key(agent.name), self._address))

    def ready(self) -> str:
        return self._address

    def node_id(self) -> str:
        """The Ray node this agent runs on (tests and benchmarks check placement with it)."""
        return ray.get_runtime_context().get_node_id()
