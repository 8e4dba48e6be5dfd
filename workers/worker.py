"""An inference worker's parts, built one way for every user: the runtime's actor, the benchmarks, the tests.

WorkerConfig says what a worker runs (model, device, weight format, CPU threads, the engine's budgets and
speculation, KVCOMM's match and CacheBlend's settings); build_worker loads the model (or shares one already
loaded) and puts the engine and the reuse planner together over it. CallStats is what one call of it cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.kvcomm.store import Store

from .blend import BlendConfig
from .engine import Engine, EngineConfig
from .linear import WEIGHT_FORMATS, WeightFormat
from .llama import LlamaModel
from .model_files import DEFAULT_MODEL
from .reuse_guard import GuardConfig
from .reuse_planner import ReusePlanner, ReuseStats
from .sampling import SamplingParams
from .sequence import RequestStats
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class WorkerConfig:
    model: str = DEFAULT_MODEL  # 'smollm2' (bundled), a .gguf file or an HF directory
    device: str | None = None  # 'cpu', 'cuda' or 'cuda:N'; None: cuda where available
    weights: WeightFormat | None = None  # None: fp32 on CPU, bf16 on CUDA
    # torch's CPU threads; None: the caller's choice (the runtime shares a node's cores among its workers;
    # in-process, torch's default: every core). Set before the model computes: torch keeps it per thread.
    threads: int | None = None
    # CPU fp32: decode steps as one onnxruntime graph (~2x faster decode, a second copy of the weights)
    decode_graph: bool = True
    engine: EngineConfig = field(default_factory=EngineConfig)  # budgets, prefix cache, speculation
    match: MatchConfig = field(default_factory=MatchConfig)  # when KVCOMM's anchors vouch for a segment
    blend: BlendConfig = field(default_factory=BlendConfig)  # CacheBlend's recompute share
    kvcomm_repair: BlendConfig | None = None  # a blend pass over kvcomm-corrected KV (None: none)
    guard: GuardConfig = field(default_factory=GuardConfig)  # when auto may reuse (workers/reuse_guard.py)
    warm_up: bool = True  # two short calls before serving, so the first real call is not the slow one

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("WorkerConfig.model must name a model: 'smollm2', a .gguf file or an HF directory")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = ""
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"WorkerConfig.device={self.device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"WorkerConfig.weights={self.weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
        if not isinstance(self.decode_graph, bool):
            raise ValueError(f"WorkerConfig.decode_graph must be True or False, got {self.decode_graph!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"WorkerConfig.threads must be an int >= 1 or None, got {self.threads!r}")


@dataclass(frozen=True)
class CallStats:
    """What one call cost and what served its prompt: the one record of a call that users read (PipelineResult's
    calls, the OpenAI door's `kvmesh`, spans). Built once per call by the worker (`of`), it is worker.proto's
    CallStats on the wire (runtime/wire.py converts it, once each way); the engine's RequestStats and the
    planner's ReuseStats are what it is built from."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # served by the exact prefix cache
    reused_tokens: int = 0  # served from segments' KV (kvcomm, blend)
    recomputed_tokens: int = 0  # prefilled
    output_tokens: int = 0
    ttft_s: float = 0.0  # from the call's arrival at the worker: planning included
    decode_tok_s: float = 0.0  # 0 when fewer than 2 tokens were decoded
    drafted_tokens: int = 0  # speculative draft tokens verified
    accepted_tokens: int = 0  # of those, accepted
    reuse_mode: str = "dense"  # what served the prompt, as observed (vocabulary.SERVED_MODES)
    model: str = ""
    worker: str = ""  # the worker's address
    anchors_consulted: int = 0  # KVCOMM: anchors compared against the call's segments
    segment_modes: dict[str, str] = field(default_factory=dict)  # segment id -> what served its KV
    segment_reasons: dict[str, str] = field(default_factory=dict)  # segment id -> why (what held reuse back)
    degradations: tuple[str, ...] = ()  # what went wrong and was survived (e.g. "KV store unavailable: ...")

    @classmethod
    def of(cls, engine: RequestStats, reuse: ReuseStats, model: str = "", worker: str = "") -> CallStats:
        """The engine's counts with the planner's decision: what served the prompt as observed (a plan that
        reused nothing reports prefix or dense, by its cache hits), tokens by where their KV came from, and TTFT
        from the call's arrival (planning included)."""
        cached, reused = engine.prefix_hit_tokens, engine.reused_tokens
        mode = reuse.mode if reused or reuse.mode == "dense" else ("prefix" if cached else "dense")
        return cls(
            prompt_tokens=engine.prompt_tokens,
            cached_tokens=cached,
            reused_tokens=reused,
            recomputed_tokens=engine.prompt_tokens - cached - reused,
            output_tokens=engine.output_tokens,
            ttft_s=reuse.preprocess_s + (engine.ttft_s or 0.0),
            decode_tok_s=engine.decode_tok_s or 0.0,
            drafted_tokens=engine.drafted_tokens,
            accepted_tokens=engine.accepted_tokens,
            reuse_mode=mode,
            model=model,
            worker=worker,
            anchors_consulted=reuse.anchors_consulted,
            segment_modes=dict(reuse.segment_modes),
            segment_reasons=dict(reuse.segment_reasons),
            degradations=tuple(reuse.degradations),
        )


@dataclass
class Worker:
    """The engine and the reuse planner over one model; callers drive the engine (directly or in a loop)."""

    engine: Engine
    planner: ReusePlanner


def build_worker(
    config: WorkerConfig,
    store: Store | None,
    *,
    model: LlamaModel | None = None,
    tokenizer: Tokenizer | None = None,
) -> Worker:
    """Load `config.model` (or share an already loaded `model` and `tokenizer`: benchmarks run several
    workers over one copy of the weights) and put a worker together; `store` holds KVCOMM's anchors and
    segments (None: no cross-agent reuse)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # this thread's; other threads read OMP_NUM_THREADS
    if (model is None) != (tokenizer is None):
        raise ValueError("build_worker: give both a loaded model and its tokenizer, or neither")
    if model is None or tokenizer is None:
        engine = Engine.load(
            config.model,
            device=config.device,
            weight_format=config.weights,
            config=config.engine,
            decode_graph=config.decode_graph,
        )
    else:
        engine = Engine(model, tokenizer, config.engine)
    planner = ReusePlanner(
        engine.model, engine.tokenizer, store, config.match, config.blend, config.kvcomm_repair, config.guard
    )
    if config.warm_up:
        _warm_up(engine)
    return Worker(engine, planner)


def _warm_up(engine: Engine) -> None:
    """Two short calls before serving: the first calls after a load run several times slower (kernel
    set-up per shape), which would otherwise land on the first agents' TTFT. The prefix cache is then
    emptied, so no call reports hits it did not earn."""
    prompt = engine.tokenizer.encode("Warm-up: count from one to twenty, then name the colours of a rainbow.")
    for _ in range(2):
        engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()
