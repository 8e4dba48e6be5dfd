"""Placement: what an actor asks of the node it runs on. Plain data; the runtime turns it into Ray options.

    Pipeline("qa", agents, agent_placement=Placement(resources={"cpu-pool": 0.01}))   # this pipeline's agents
    RuntimeConfig(worker_placement=Placement(num_gpus=1, memory_bytes=8 << 30))       # a session's workers

A field left None is not said here: the next level decides (a pipeline's agent placement, then the
session's RuntimeConfig, then what the cluster offers; see kvmesh.runtime.placement). Custom resources
are how a node is selected: a node started with `--resources='{"cpu-pool": 100}'` hosts only the actors
that ask for "cpu-pool", up to 100 units of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Placement:
    num_cpus: float | None = None  # logical CPUs reserved (Ray packs by them; torch uses the cores it finds)
    num_gpus: float | None = None  # GPUs reserved (Ray sets CUDA_VISIBLE_DEVICES to them)
    memory_bytes: int | None = None  # memory reserved for scheduling (Ray's `memory`)
    resources: Mapping[str, float] | None = None  # custom resources: node selection

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value >= 0):
                raise ValueError(f"Placement.{name} must be a number >= 0 (or None: the default), got {value!r}")
        if self.memory_bytes is not None and not (
            isinstance(self.memory_bytes, int) and not isinstance(self.memory_bytes, bool) and self.memory_bytes > 0
        ):
            raise ValueError(f"Placement.memory_bytes must be a positive int (bytes), got {self.memory_bytes!r}")
        if self.resources is not None:
            if not isinstance(self.resources, Mapping):
                raise ValueError(f"Placement.resources must be a mapping name -> amount, got {self.resources!r}")
            for key, amount in self.resources.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"Placement.resources: resource names must be non-empty strings, got {key!r}")
                if key in ("CPU", "GPU", "memory"):
                    raise ValueError(f"Placement.resources: set {key!r} with num_cpus / num_gpus / memory_bytes")
                if not (_number(amount) and amount > 0):
                    raise ValueError(f"Placement.resources[{key!r}] must be a positive number, got {amount!r}")
            # a read-only copy: the caller's dict may change later, a frozen placement may not
            object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))

    def over(self, default: Placement) -> Placement:
        """This placement, with the fields it leaves None taken from `default`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Placement(**{k: v if v is not None else getattr(default, k) for k, v in values.items()})

    @classmethod
    def of(cls, value: Placement | Mapping[str, Any] | None) -> Placement | None:
        """A Placement from itself, a plain dict of its fields, or None."""
        if value is None or isinstance(value, Placement):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(
                    f"unknown placement field(s) {sorted(unknown)}: use num_cpus, num_gpus, memory_bytes, resources"
                )
            return cls(**value)
        raise ValueError(f"a placement is a kvmesh Placement or a dict of its fields, got {type(value).__name__}")

    def __hash__(self) -> int:  # resources is a mapping: hash it as sorted pairs
        resources = tuple(sorted(self.resources.items())) if self.resources is not None else None
        return hash((self.num_cpus, self.num_gpus, self.memory_bytes, resources))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        mine = dict(self.resources) if self.resources is not None else None
        theirs = dict(other.resources) if other.resources is not None else None
        same = (self.num_cpus, self.num_gpus, self.memory_bytes) == (other.num_cpus, other.num_gpus, other.memory_bytes)
        return same and mine == theirs

    def __repr__(self) -> str:
        resources = dict(self.resources) if self.resources is not None else None
        return (
            f"Placement(num_cpus={self.num_cpus!r}, num_gpus={self.num_gpus!r}, "
            f"memory_bytes={self.memory_bytes!r}, resources={resources!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # MappingProxyType does not pickle; the config travels to actors
        resources = dict(self.resources) if self.resources is not None else None
        return (Placement, (self.num_cpus, self.num_gpus, self.memory_bytes, resources))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
