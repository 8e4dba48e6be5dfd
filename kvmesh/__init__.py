"""kvmesh: multi-agent LLM pipelines on Ray, with KV caches shared across agents."""

__version__ = "0.1.0"
