"""The methods `kvmesh bench fidelity` can put side by side: a reuse mode and the worker settings it runs with.

A variant is named by what it is, so the names on the command line, in the JSON and on the frontier plot
are the same:

- `auto`, `dense`, `prefix`, `kvcomm`, `blend`: the reuse modes users may ask for, as shipped (their default settings);
- `kvcomm_d<X>`: kvcomm whose nearest anchor may be up to X away (normalized distance; shipped: 0.5);
- `kvcomm_ref`: KVCOMM's decision as the reference makes it: the entropy test over the anchors that cover
  the whole segment, no distance bound, no spread amendment;
- `kvcomm_any`: kvcomm vouching whenever two anchors cover a segment (no distance, entropy or spread test);
- `blend_<P>`: blend recomputing P% of the span by deviation; `blend_b<K>` / `blend_b<K>_<P>`: the first K
  tokens of every segment, plus P% of the rest by deviation; `blend_q<P>`: the P% of the span the question
  (the prompt's tokens after it) reads most over the reused KV;
- `<kvcomm variant>+blend_<P>` (or `+blend_b<K>[_<P>]`): kvcomm's corrected KV, then that blend pass on top.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.workers.blend import BlendConfig
from kvmesh.workers.vocabulary import REUSE_MODES
from kvmesh.workers.worker import WorkerConfig

# the frontier sweep: every method the issue names, a few settings each (dense is always first)
SWEEP = (
    "dense", "kvcomm", "kvcomm_d1", "kvcomm_d2", "kvcomm_ref", "kvcomm_any",
    "blend_15", "blend_30", "blend_50", "blend_b16", "blend_b16_15", "blend_q15", "blend_q30",
    "kvcomm_any+blend_15", "kvcomm_any+blend_b16",
)  # fmt: skip
_KVCOMM = re.compile(r"kvcomm(_d(?P<distance>\d+(\.\d+)?)|_(?P<rule>ref|any))?$")
_BLEND = re.compile(r"blend(_(?P<share>\d+)|_b(?P<boundary>\d+)(_(?P<extra>\d+))?|_q(?P<question>\d+))?$")


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # the reuse mode its calls ask for
    match: MatchConfig | None = None  # None: the worker's default
    blend: BlendConfig | None = None  # reuse="blend"'s pass
    kvcomm_repair: BlendConfig | None = None  # a blend pass over kvcomm-corrected KV

    def worker(self, base: WorkerConfig) -> WorkerConfig:
        """The worker settings this variant runs with, on top of `base`."""
        return replace(
            base,
            match=self.match or base.match,
            blend=self.blend or base.blend,
            kvcomm_repair=self.kvcomm_repair,
        )


def variant(name: str) -> Variant:
    """The variant a name describes (see the module's doc); ValueError naming the forms for any other."""
    if name in REUSE_MODES:
        return Variant(name, name)
    kvcomm_name, plus, blend_name = name.partition("+")
    if plus:
        kvcomm = _kvcomm(kvcomm_name)
        repair = _blend(blend_name)
        if kvcomm is None or repair is None:
            raise ValueError(_unknown(name))
        return Variant(name, "kvcomm", match=kvcomm, kvcomm_repair=repair)
    kvcomm = _kvcomm(name)
    if kvcomm is not None:
        return Variant(name, "kvcomm", match=kvcomm)
    blend = _blend(name)
    if blend is not None:
        return Variant(name, "blend", blend=blend)
    raise ValueError(_unknown(name))


def _kvcomm(name: str) -> MatchConfig | None:
    found = _KVCOMM.match(name)
    if found is None:
        return None
    if found["distance"] is not None:
        return MatchConfig(max_distance=float(found["distance"]))
    if found["rule"] == "ref":  # the reference: certain by entropy alone, covering anchors only
        return MatchConfig(max_distance=math.inf, max_spread=0.0, max_uncovered=0.0)
    if found["rule"] == "any":
        return MatchConfig(max_distance=math.inf, entropy_gamma=1.0, max_spread=math.inf)
    return MatchConfig()


def _blend(name: str) -> BlendConfig | None:
    found = _BLEND.match(name)
    if found is None:
        return None
    if found["share"] is not None:
        return BlendConfig(share=int(found["share"]) / 100)
    if found["boundary"] is not None:
        extra = int(found["extra"]) / 100 if found["extra"] else 0.0
        return BlendConfig(share=extra, selection="boundary", boundary_tokens=int(found["boundary"]))
    if found["question"] is not None:
        return BlendConfig(share=int(found["question"]) / 100, selection="question")
    return BlendConfig()


def _unknown(name: str) -> str:
    return (
        f"unknown variant {name!r}: use a mode ({', '.join(REUSE_MODES)}), kvcomm_d<X>, kvcomm_ref, kvcomm_any, "
        "blend_<P>, blend_b<K>[_<P>], blend_q<P>, or <kvcomm variant>+<blend variant> (bench/fidelity_variants.py)"
    )
