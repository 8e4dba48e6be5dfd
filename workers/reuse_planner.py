"""The reuse planner: a prompt's parts in, an engine request out — token ids plus how to serve them.

Modes (`reuse=` per call):
- `dense`: no reuse at all; `prefix`: the exact prefix cache, then prefill.
- `kvcomm`: prefix, then every segment's base KV corrected by its slot's anchors when the pool vouches
  for all of them; else a dense call whose real KV becomes new anchors.
- `blend`: prefix, then the segments' base KV moved into place and repaired by a CacheBlend pass
  (blend.py) that recomputes the tokens deviating most.
- `auto` (the default): exact prefix; kvcomm where the anchors vouch for every segment and the template's
  guard (reuse_guard.py) is open: audits of its own dense calls showed reuse keeping dense's reply; dense
  otherwise (recording anchors and auditing, after the reply has started). No approximate mode joins `auto`
  until `kvmesh bench fidelity` shows it keeps dense's answers: blend lost them on held-out traffic, so it
  runs only when asked for.
- `naive`: every segment's base KV moved into place, uncorrected: the baseline the others are measured
  against, for benchmarks; never a good idea in production.
After every call the response is published as a segment (its KV from this decode, normalized), so a
downstream agent's worker finds it. Anchor recording and publishing run on a background thread: the
engine thread only copies the KV they need.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from kvmesh.kvcomm.anchor_match import Match, MatchConfig
from kvmesh.kvcomm.kv_cache import KVCache, KVLayout
from kvmesh.kvcomm.kvcomm_reuse import PromptLayout, TokenSpan, assemble, make_anchors, mark_used, naive
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import Store, StoredSegment, StoreError, StoreUnavailable

from .blend import BlendConfig, blend
from .chat_frame import ChatFramer
from .engine import validate_prompt
from .llama import LlamaModel
from .prompt_reuse import PromptReuse
from .reuse_guard import GuardConfig, ReuseGuard, audit_reuse
from .sampling import InvalidRequestError
from .segment_base import base_alone, base_from_decode
from .tokenizer import Tokenizer
from .vocabulary import REUSE_MODES, WORKER_MODES

log = logging.getLogger(__name__)
_PREFIX_BUDGET_BYTES = 256 << 20


@dataclass(frozen=True)
class PromptPart:
    """One part of a prompt, as the planner takes it (worker.proto's PromptPart: literal text or a segment)."""

    text: str
    segment_id: str | None = None  # None: literal template text
    placeholder: str | None = None  # a segment's placeholder in the template (names its anchor slot)


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation after the system message: its role and its content as parts."""

    role: str  # user | assistant | system (as the model's chat template names them)
    parts: Sequence[PromptPart]


@dataclass
class ReuseStats:
    """The planner's decision for one call, filled in as it plans: its share of the call's CallStats (worker.py),
    plus what benchmarks study (matches, blend_recomputed, preprocess_s)."""

    mode: str = "dense"  # what the plan serves the prompt with (vocabulary.SERVED_MODES)
    reused_tokens: int = 0  # prompt tokens whose KV came from segments and anchors (before any blend repair)
    blend_recomputed: int = 0  # of those, recomputed by the blend pass (known once the engine ran it)
    anchors_consulted: int = 0
    preprocess_s: float = 0.0  # base KVs, matching and assembly, before the engine saw the request
    # per segment: (nearest anchor distance, weight entropy in bits, deviation spread) where matched
    matches: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # per segment: what served its KV: kvcomm, blend (repaired from its base), naive, dense
    segment_modes: dict[str, str] = field(default_factory=dict)
    # per segment: why it was served that way (what held reuse back, or what vouched for it)
    segment_reasons: dict[str, str] = field(default_factory=dict)
    # what went wrong with the KV store during the call, one short line each (the call's answer is still right:
    # it served those segments dense): "KV store unavailable: ...", "dropped a tampered segment ... (bad HMAC)"
    degradations: list[str] = field(default_factory=list)

    def serve_all(self, segments: Iterable[str], mode: str, reason: str) -> None:
        """Every segment served one way, for one reason."""
        for key in segments:
            self.segment_modes[key], self.segment_reasons[key] = mode, reason

    def degrade(self, line: str) -> None:
        if line not in self.degradations:  # a store that is down fails every request of the call alike
            self.degradations.append(line)


@dataclass
class PlannedCall:
    token_ids: list[int]
    reuse: PromptReuse
    stats: ReuseStats
    layout: PromptLayout | None


class ReusePlanner:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        store: Store | None,
        config: MatchConfig | None = None,
        blend_config: BlendConfig | None = None,
        kvcomm_repair: BlendConfig | None = None,
        guard: GuardConfig | None = None,
    ) -> None:
        """kvcomm_repair: a blend pass over kvcomm-corrected KV when the anchors vouch (kvcomm+blend);
        None: corrected KV is used as it is."""
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.config = config or MatchConfig()
        if store is not None:  # what the store's records must fit: decoded as this model's KV, never as they say
            c = model.config
            store.bind_layout(
                KVLayout(
                    c.num_layers,
                    c.num_kv_heads,
                    c.head_dim,
                    model.dtype,
                    c.vocab_size,
                    len(self.config.signature_layers(c.num_layers)),
                )
            )
        self.blend_config = blend_config or BlendConfig()
        self.kvcomm_repair = kvcomm_repair
        self.guard = ReuseGuard(guard or GuardConfig())
        # the chat frame a query or tool output is prefilled behind (then dropped) for its base KV: the model's
        # default one, so the segment is seen as message content, as it will be in real prompts
        user_turn = tokenizer.render_chat([{"role": "user", "content": "\x00"}], add_generation_prompt=False)
        self._user_header = tokenizer.encode(user_turn.split("\x00")[0])
        self.framer = ChatFramer(tokenizer)
        self._prefixes: OrderedDict[bytes, KVCache] = OrderedDict()  # exact KV of template heads, LRU
        self._prefix_bytes = 0
        self._lock = threading.RLock()  # planning and the background jobs share the store and the model
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-kvcomm")
        self._pending: list[Future[None]] = []
        self._warned = False

    def plan(self, system: str | None, parts: list[PromptPart], agent: str, mode: str) -> PlannedCall:
        """The call's ids (the model's chat frame around the user message's parts, each tokenized alone)
        and how to serve them. Thread-safe: concurrent calls plan one at a time."""
        return self.plan_conversation(system, [ChatTurn("user", parts)], agent, mode)

    def plan_conversation(self, system: str | None, turns: Sequence[ChatTurn], agent: str, mode: str) -> PlannedCall:
        """plan() for a whole conversation: the model's chat frame around every turn's parts, each tokenized
        alone, the assistant's turn opened at the end. Raises InvalidRequestError / ValueError."""
        if mode not in WORKER_MODES:  # (naive is for benchmarks: not offered)
            raise InvalidRequestError(f"reuse mode {mode!r} is not one of {', '.join(REUSE_MODES)}")
        started = time.perf_counter()  # before the lock: time waiting for another call's planning counts too
        frames = self.framer.frames(system, [turn.role for turn in turns])
        with self._lock:
            return self._plan(frames, turns, agent, mode, started)

    def _plan(
        self, frames: list[list[int]], turns: Sequence[ChatTurn], agent: str, mode: str, started: float
    ) -> PlannedCall:
        stats = ReuseStats(mode="dense" if mode == "dense" else "prefix")
        reuse = PromptReuse(use_prefix_cache=mode != "dense")
        ids, layout, segment_tokens, stored, template = self._layout(frames, turns, agent, stats)
        unstored: dict[str, str] = {}  # segment id -> why the store did not keep its base KV
        validate_prompt(ids, self.model.config)  # before any base KV is computed for it
        reuse.on_finished = self._publisher(agent, len(ids))
        if mode in ("dense", "prefix"):
            stats.serve_all(segment_tokens, "dense", f"reuse={mode!r} was asked: segments are prefilled")
        elif self.store is None:
            stats.serve_all(segment_tokens, "dense", "this worker has no KV store")
        elif layout is not None and mode == "auto" and not (admitted := self.guard.admit(template)).reuse:
            stats.serve_all(segment_tokens, "dense", admitted.reason)  # nothing on the critical path
            if admitted.audit:
                reuse.on_prefilled = self._auditor(layout, ids, segment_tokens, stored, template)
        elif layout is not None:
            try:
                bases, unstored = self._bases(segment_tokens, stored, stats)
                if mode in ("naive", "blend"):
                    kv = naive(layout, bases, self._text_bases(layout, ids, stats), self.model.config.rope)
                    if mode == "naive":
                        reuse.splice_at, reuse.splice_kv = layout.reuse_start, kv
                        stats.mode, stats.reused_tokens = "naive", kv.length
                        stats.serve_all(segment_tokens, "naive", "reuse='naive': base KV moved into place, uncorrected")
                    else:
                        self._plan_blend(layout, ids, kv, reuse, stats)
                        stats.serve_all(
                            segment_tokens,
                            "blend",
                            f"reuse='blend': base KV moved into place, ~{self.blend_config.share:.0%} of it recomputed",
                        )
                else:
                    self._plan_kvcomm(layout, ids, bases, reuse, stats)
                    if stats.mode != "kvcomm" and mode == "auto":  # an open template whose anchors fell short
                        reuse.on_prefilled = self._auditor(layout, ids, segment_tokens, stored, template)
            except StoreError as exc:  # nothing was spliced yet: the call runs dense
                stats.serve_all(segment_tokens, "dense", self._store_failed(exc, stats))
        for key, why in unstored.items():
            stats.segment_reasons[key] += f"; its base KV was not stored: {why}"
        if self.store is not None:
            for rejection in self.store.take_rejections():
                stats.degrade(rejection.line())
        if layout is not None and mode != "dense":
            self._with_known_prefix(ids[: layout.reuse_start], reuse)
        stats.preprocess_s = time.perf_counter() - started
        return PlannedCall(ids, reuse, stats, layout)

    def _with_known_prefix(self, prefix: list[int], reuse: PromptReuse) -> None:
        """The text before the first segment (system prompt, template head) is the same in every call of an
        agent. Its exact KV, kept from an earlier call, goes in ahead of the splice, which then starts at 0:
        the engine is spared a forward over the few tokens the block-aligned prefix cache leaves out."""
        key = hashlib.sha256(repr(prefix).encode()).digest()
        known = self._prefixes.get(key)
        if known is not None and reuse.splice_at == len(prefix):
            self._prefixes.move_to_end(key)
            if reuse.splice_kv is not None:  # appended after the prefix in the engine: no concatenated copy
                reuse.splice_kv, reuse.splice_fn = None, _appending(reuse.splice_kv)
            if reuse.splice_fn is not None:
                compute = reuse.splice_fn

                def splice(cache: KVCache) -> tuple[int, int]:
                    cache.append(known)
                    added, recomputed = compute(cache)
                    return len(prefix) + added, recomputed

                reuse.splice_fn = splice
            reuse.splice_at, reuse.splice_exact = 0, len(prefix)
            return
        if known is None:
            then = reuse.on_prefilled

            def remember(cache: KVCache) -> None:  # the engine thread: a copy, then the bookkeeping
                kv = cache.slice(0, len(prefix))
                with self._lock:
                    self._prefixes[key] = kv
                    self._prefix_bytes += kv.nbytes()
                    while self._prefix_bytes > _PREFIX_BUDGET_BYTES and len(self._prefixes) > 1:
                        self._prefix_bytes -= self._prefixes.popitem(last=False)[1].nbytes()
                if then is not None:
                    then(cache)

            reuse.on_prefilled = remember

    def prefill_segments(self, segments: list[tuple[str, str]]) -> int:
        """Compute and store the base KV of (segment id, text) pairs not stored yet, e.g. a document store's
        chunks ahead of the questions that will cite them; returns how many were computed."""
        if self.store is None:
            raise ValueError("this planner has no KV store to prefill into")
        with self._lock:
            stats = ReuseStats()  # no call to report to: faults are warned about in the log
            missing = {
                key: self.tokenizer.encode(text) for key, text in segments if self._get_segment(key, stats) is None
            }
            self._bases(missing, {}, stats)
            self.store.take_rejections()
        return len(missing)

    def drain(self) -> None:
        """Wait for the background recording and publishing (tests and benchmarks call this)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self._background.shutdown(wait=True)

    # -- internals ---------------------------------------------------------------------------------
    def _layout(
        self, frames: list[list[int]], turns: Sequence[ChatTurn], agent: str, stats: ReuseStats
    ) -> tuple[list[int], PromptLayout | None, dict[str, list[int]], dict[str, StoredSegment], str]:
        """Token ids part by part, the spans, each segment's token ids, the segments the store knows, and the
        template's key (the agent and its template text: the prefix of its slots' names)."""
        parts = [part for turn in turns for part in turn.parts]
        # (one user message: frames are its head and tail, the key as it always was)
        template = hashlib.sha256(repr((*frames, [p.text for p in parts if p.segment_id is None])).encode())
        slot_prefix = f"{agent}|{template.hexdigest()[:16]}|"
        ids: list[int] = []
        spans: list[TokenSpan] = []
        segment_tokens: dict[str, list[int]] = {}
        stored: dict[str, StoredSegment] = {}
        seen: Counter[str] = Counter()  # segments per placeholder so far: a list-returning tool fills one with many
        for frame, turn in zip(frames[:-1], turns, strict=True):  # the chat frame's text before each message
            spans.append(TokenSpan(len(ids), len(ids) + len(frame)))
            ids.extend(frame)
            for part in turn.parts:
                part_ids = self.tokenizer.encode(part.text) if part.text else []
                if part.segment_id is not None and self.store is not None:
                    found = self._get_segment(part.segment_id, stats)
                    if found is not None and self.tokenizer.decode(found.token_ids) == part.text:
                        part_ids, stored[part.segment_id] = found.token_ids, found  # the ids its KV belongs to
                if not part_ids:
                    continue
                if part.segment_id is not None:
                    segment_tokens[part.segment_id] = part_ids
                slot = None
                if part.segment_id is not None:  # the n-th segment of a placeholder has its own pool: what comes
                    name = part.placeholder or ""  # before and after it (the text its anchors hold) is its own
                    slot = slot_prefix + name + (f"#{seen[name]}" if seen[name] else "")
                    seen[name] += 1
                spans.append(TokenSpan(len(ids), len(ids) + len(part_ids), part.segment_id, slot))
                ids.extend(part_ids)
        spans.append(TokenSpan(len(ids), len(ids) + len(frames[-1])))
        ids.extend(frames[-1])
        layout = PromptLayout(_merge_texts(spans))
        return ids, layout if layout.segments() else None, segment_tokens, stored, slot_prefix

    def _plan_kvcomm(
        self, layout: PromptLayout, ids: list[int], bases: dict[str, KVCache], reuse: PromptReuse, stats: ReuseStats
    ) -> None:
        """kvcomm and auto: every segment corrected by its slot's anchors when they vouch for all of them; else
        dense, and the call's real KV becomes anchors for the segments they did not vouch for."""
        assert self.store is not None
        outcome = assemble(layout, bases, self.store, self.model.config.rope, self.config)
        stats.anchors_consulted = outcome.anchors_consulted
        stats.matches = {key: (m.nearest, m.entropy_bits, m.spread) for key, m in outcome.matches.items()}
        if outcome.kv is not None:
            try:
                mark_used(self.store, layout, outcome)
            except StoreError as exc:  # usage counts only steer eviction: the reuse stands
                self._store_failed(exc, stats)
            served = "kvcomm"
            if self.kvcomm_repair is None:
                reuse.splice_at, reuse.splice_kv = layout.reuse_start, outcome.kv
                stats.mode, stats.reused_tokens = "kvcomm", outcome.kv.length
            else:
                self._plan_blend(layout, ids, outcome.kv, reuse, stats, self.kvcomm_repair)
                stats.mode = served = "kvcomm+blend"
            for key in bases:
                stats.segment_modes[key], stats.segment_reasons[key] = served, _vouched(outcome.matches[key])
            return
        for key in bases:
            stats.segment_modes[key] = "dense"
            stats.segment_reasons[key] = outcome.reasons.get(key) or (
                f"{_vouched(outcome.matches[key])}, but another segment was not: the call ran dense"
            )
        unvouched = {key for key in bases if key in outcome.reasons}
        reuse.on_prefilled = self._recorder(layout, bases, unvouched)

    def _plan_blend(
        self,
        layout: PromptLayout,
        ids: list[int],
        kv: KVCache,
        reuse: PromptReuse,
        stats: ReuseStats,
        config: BlendConfig | None = None,
    ) -> None:
        """The span's KV as given, repaired by a CacheBlend pass once the exact prefix is in the cache."""
        span_ids = ids[layout.reuse_start : layout.reuse_end]
        config = config or self.blend_config
        start = layout.reuse_start
        segments = [(s.start - start, s.end - start) for s in layout.segments()]

        def splice(cache: KVCache) -> tuple[int, int]:
            readers = ids[layout.reuse_end :]
            stats.blend_recomputed = blend(
                self.model, cache, span_ids, kv, config, segments=segments, readers=readers
            ).recomputed_tokens
            return len(span_ids), stats.blend_recomputed

        reuse.splice_at, reuse.splice_fn = layout.reuse_start, splice
        stats.mode, stats.reused_tokens = "blend", kv.length

    def _text_bases(self, layout: PromptLayout, ids: list[int], stats: ReuseStats) -> dict[int, KVCache]:
        """The base KV (alone) of each template text span between segments, by start; cached as segments."""
        texts: dict[int, KVCache] = {}
        for span in layout.spans:
            if span.is_segment or not layout.reuse_start < span.start < layout.reuse_end:
                continue
            text_ids = ids[span.start : span.end]
            key = segment_id("template-text", repr(text_ids))
            texts[span.start] = self._bases({key: text_ids}, {}, stats)[0][key]
        return texts

    def _bases(
        self,
        segment_tokens: dict[str, list[int]],
        stored: dict[str, StoredSegment],
        stats: ReuseStats,
        store_lock: AbstractContextManager[object] | None = None,
    ) -> tuple[dict[str, KVCache], dict[str, str]]:
        """Each segment's base KV: stored (a response, or computed before), else prefilled alone now and
        stored; and, by segment, why the store did not keep one. store_lock: held around the store only (the
        background passes the planning lock; planning already holds it)."""
        assert self.store is not None
        store_lock = store_lock or contextlib.nullcontext()
        bases: dict[str, KVCache] = {}
        unstored: dict[str, str] = {}
        missing: dict[str, list[int]] = {}
        with store_lock:
            for key, token_ids in segment_tokens.items():
                found = stored.get(key) or self._get_segment(key, stats)
                if found is not None and found.token_ids == token_ids:
                    bases[key] = found.kv
                else:
                    missing[key] = token_ids
        for key, token_ids in missing.items():
            bases[key] = base_alone(self.model, self._user_header, token_ids)
        with store_lock:
            for key, token_ids in missing.items():
                why_not = self.store.put_segment(key, StoredSegment(token_ids, bases[key]))
                if why_not is not None:
                    unstored[key] = why_not
        return bases, unstored

    def _auditor(
        self,
        layout: PromptLayout,
        ids: list[int],
        segment_tokens: dict[str, list[int]],
        stored: dict[str, StoredSegment],
        template: str,
    ) -> Callable[[KVCache], None]:
        """For auto's dense calls: after the prefill (engine thread: one copy), in the background, the
        segments' base KV, the audit of what kvcomm would have served (the template's guard hears it), and
        anchors for the segments the anchors did not vouch for."""
        store, rope, config = self.store, self.model.config.rope, self.config
        assert store is not None

        def on_prefilled(cache: KVCache) -> None:
            real = cache.slice(0, len(ids))  # a copy: the engine goes on using its cache

            def job() -> None:
                bases, _ = self._bases(segment_tokens, stored, ReuseStats(), store_lock=self._lock)
                with self._lock:
                    outcome = assemble(layout, bases, store, rope, config)
                audit = None
                if outcome.kv is not None:
                    audit = audit_reuse(self.model, real, ids, layout.reuse_start, layout.reuse_end, outcome.kv)
                self.guard.record(template, audit)
                self._record_anchors(layout, real, bases, {key for key in bases if key in outcome.reasons})

            self._submit(job)

        return on_prefilled

    def _recorder(
        self, layout: PromptLayout, bases: dict[str, KVCache], segment_ids: set[str]
    ) -> Callable[[KVCache], None]:
        def on_prefilled(cache: KVCache) -> None:
            real = cache.slice(0, layout.reuse_end)  # a copy: the engine goes on using its cache
            self._submit(lambda: self._record_anchors(layout, real, bases, segment_ids))

        return on_prefilled

    def _record_anchors(
        self, layout: PromptLayout, real: KVCache, bases: dict[str, KVCache], segment_ids: set[str]
    ) -> None:
        """In the background: the segments' deviations in this call's real KV, as anchors of their slots."""
        assert self.store is not None
        anchors = make_anchors(layout, real, bases, self.model.config.rope, self.config, segment_ids)  # no lock
        with self._lock:
            for slot, anchor in anchors:
                self.store.add_anchor(slot, anchor)

    def _publisher(self, agent: str, prompt_length: int) -> Callable[[KVCache, list[int]], None]:
        def on_finished(cache: KVCache, output_ids: list[int]) -> None:
            if self.store is None:
                return
            tokens = [t for t in output_ids if t not in self.tokenizer.eos_token_ids]
            have = min(cache.length - prompt_length, len(tokens))
            if have <= 0:
                return
            kv = cache.slice(prompt_length, prompt_length + have)  # a copy, before the engine frees the slot
            self._submit(lambda: self.publish(agent, tokens, kv, prompt_length))

        return on_finished

    def publish(self, agent: str, tokens: list[int], kv: KVCache, start: int) -> None:
        """Store an agent's response as a segment: `kv` holds its tokens' KV at positions start.. of its prompt
        (the last token's may be missing; it is computed). Blocking; the engine path calls it in the background."""
        assert self.store is not None
        text = self.tokenizer.decode(tokens)
        kv.shift(-start, self.model.config.rope)
        base = base_from_decode(self.model, kv, 0, tokens)  # a forward, outside the lock: planning goes on
        with self._lock:
            self.store.put_segment(segment_id(agent, text), StoredSegment(tokens, base))

    def _submit(self, job: Callable[[], object]) -> None:
        def run() -> None:  # jobs take the planning lock only around the store
            try:
                job()
            except StoreError as exc:  # recording and publishing are best effort: no call waits on them
                self._warn_store(exc)

        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._background.submit(run))

    def _get_segment(self, key: str, stats: ReuseStats) -> StoredSegment | None:
        assert self.store is not None
        try:
            return self.store.get_segment(key)
        except StoreError as exc:
            self._store_failed(exc, stats)
            return None

    def _store_failed(self, exc: StoreError, stats: ReuseStats) -> str:
        """Warn (once per planner) and tell the call; returns the line, a reason for the segments it made dense."""
        self._warn_store(exc)
        line = f"KV store unavailable: {exc}" if isinstance(exc, StoreUnavailable) else f"KV store failed: {exc}"
        stats.degrade(line)
        return line

    def _warn_store(self, exc: StoreError) -> None:
        if not self._warned:
            log.warning("KV store failed, serving calls with dense prefill: %s", exc)
            self._warned = True


def _vouched(found: Match) -> str:
    return (
        f"vouched for by {len(found.anchors)} anchors (nearest {found.nearest:.2f} away, "
        f"entropy {found.entropy_bits:.2f} bits)"
    )


def _merge_texts(spans: list[TokenSpan]) -> tuple[TokenSpan, ...]:
    """Adjacent template-text spans become one (the anchors store one KV per text gap)."""
    merged: list[TokenSpan] = []
    for span in spans:
        if span.end == span.start:
            continue
        if merged and not span.is_segment and not merged[-1].is_segment:
            merged[-1] = TokenSpan(merged[-1].start, span.end)
        else:
            merged.append(span)
    return tuple(merged)


def _appending(kv: KVCache) -> Callable[[KVCache], tuple[int, int]]:
    """A splice that appends `kv` as it is: (tokens added, none recomputed)."""

    def splice(cache: KVCache) -> tuple[int, int]:
        cache.append(kv)
        return kv.length, 0

    return splice
