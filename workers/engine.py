"""The inference engine: requests in, tokens out, one batched forward per `step()`.

Lifecycle of a request: `add_request` validates it and queues it; the scheduler admits it (loading
whatever prefix of its prompt the prefix cache holds), prefills the rest in chunks beside running
decodes, then decodes one token per step until EOS, a stop string, max_tokens or the context ends.
On finish its KV goes into the prefix cache for later requests. Not thread-safe: one thread drives it
(see EngineLoop for concurrent callers).

Speculation (EngineConfig.speculation, on by default): a decoding request may run its pending token plus
a draft from the suffix trees (speculation.py) as one tree-masked chunk; the accepted path's tokens are
then emitted one by one through the same stop logic as plain decoding, and its KV is cut back to them.

Faults: what is done for one request alone (admission and its prefix-cache load, a splice or CacheBlend
pass, the reuse hooks, sampling, draft verification, stop strings) fails that request alone: it ends with
finish_reason "error" and TokenEvent.error, its slot is freed and its KV never enters the prefix cache,
while the rest of the batch goes on. A failed batched forward fails the requests of that step. Drafting is
only an offer: when it fails the step runs without drafts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from .forward_batch import ForwardBatch, SequenceChunk
from .kv_slots import KVSlots, SlotKVCache, shared_prefix
from .linear import QUANTIZED_FORMATS, WeightFormat
from .llama import LlamaModel
from .model_config import ModelConfig
from .model_files import DEFAULT_MODEL, load_raw_model
from .prefix_cache import PrefixCache, PrefixCacheConfig, PrefixMatch
from .prompt_reuse import PromptReuse
from .sampling import InvalidRequestError, SamplingParams, make_generator, sample
from .scheduler import PARTNER_WINDOW, ScheduledChunk, Scheduler, SchedulerConfig
from .sequence import RequestStats, Sequence, Status
from .shared_prefix import SharedPrefix
from .speculation import SpeculationConfig, Speculator, tree_inputs, verify
from .suffix_cache import Draft
from .text_stream import TextStream
from .tokenizer import Tokenizer
from .vocabulary import EngineFinish

log = logging.getLogger(__name__)


def _common_head(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect with C-speed slice comparisons
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _reads_exact_prefix(seq: Sequence) -> bool:
    """Whether a request's prompt is served from the exact prefix cache with no splice: only such a request can
    read a prefix in place, and only its prompt's KV enters that cache whole."""
    return seq.reuse.use_prefix_cache and seq.reuse.splice_at is None


def validate_prompt(prompt: Seq[int], config: ModelConfig) -> None:
    """Refuse what no engine step could serve, with what to do about it."""
    if not prompt:
        raise InvalidRequestError("the prompt is empty: give at least one token (or a non-empty text)")
    if len(prompt) >= config.max_context:
        raise InvalidRequestError(
            f"the prompt has {len(prompt)} tokens but the model's context is {config.max_context}: "
            "shorten the prompt so at least one token can be generated"
        )
    if min(prompt) < 0 or max(prompt) >= config.vocab_size:
        raise InvalidRequestError(
            f"prompt token ids must lie in [0, {config.vocab_size}), got {min(prompt)}..{max(prompt)}"
        )


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_cache: PrefixCacheConfig | None = field(default_factory=PrefixCacheConfig)  # None disables it
    # tokens per KV slot (one slot per running request); None: the model's context on CPU, where the
    # buffer is only reserved address space, and at most 4096 on GPUs, where it is allocated memory
    kv_slot_tokens: int | None = None
    # SuffixDecoding speculation; None disables it. On by default: it drafts only where its cost model
    # expects a gain, so a request whose output repeats nothing runs (almost) as plain decoding
    speculation: SpeculationConfig | None = field(default_factory=SpeculationConfig)
    # a prefix-cache hit at least this long is read in place by the sequences holding it (shared_prefix.py):
    # agents fanning out over one context hold and read it once, not once each (float models, when at least two
    # requests read it: Engine._shareable); None: every hit is copied
    shared_prefix_min_tokens: int | None = 256

    def __post_init__(self) -> None:
        if self.kv_slot_tokens is not None and self.kv_slot_tokens < 1:
            raise ValueError(f"kv_slot_tokens must be >= 1 or None, got {self.kv_slot_tokens}")
        if self.shared_prefix_min_tokens is not None and self.shared_prefix_min_tokens < 1:
            raise ValueError(f"shared_prefix_min_tokens must be >= 1 or None, got {self.shared_prefix_min_tokens}")


class RequestFailed(RuntimeError):
    """The engine failed while serving this request alone (its sampling, a reuse hook, ...); others went on."""


@dataclass
class TokenEvent:
    """One streamed step of a request: a token (and the text it completes), or its end."""

    request_id: str
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: EngineFinish | None = None  # on the end: "stop" (EOS or a stop string), "length", ...
    stats: RequestStats | None = None
    error: str | None = None  # with finish_reason "error": what failed ("ExceptionType: message")


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: RequestStats
    error: str | None = None  # with finish_reason "error"


class Engine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config.scheduler)
        self.prefix_cache = PrefixCache(self.config.prefix_cache) if self.config.prefix_cache else None
        self.kv_slots = self._make_slots()
        self.speculator = Speculator(self.config.speculation) if self.config.speculation else None
        self._ids = itertools.count()
        self._pending_events: list[TokenEvent] = []
        self._awaited: set[str] = set()  # prefilling requests whose prompt's KV waiting requests will read

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        weight_format: WeightFormat | None = None,
        config: EngineConfig | None = None,
        decode_graph: bool = True,
    ) -> Engine:
        """Load a model ('smollm2', a .gguf file or an HF directory): fp32 on CPU, bf16 on CUDA;
        `decode_graph`: see LlamaModel."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = torch.device(device).type == "cuda"
        raw = load_raw_model(model)
        llama = LlamaModel(
            raw.config,
            raw.weights,
            device=device,
            dtype=torch.bfloat16 if on_gpu else torch.float32,
            weight_format=weight_format or ("bf16" if on_gpu else "fp32"),
            decode_graph=decode_graph,
        )
        return cls(llama, raw.tokenizer, config)

    # -- requests ---------------------------------------------------------------------------------
    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}
        ]
        return self.tokenizer.encode(self.tokenizer.render_chat(messages))

    def add_request(
        self,
        prompt_ids: Seq[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        role: str | None = None,
        reuse: PromptReuse | None = None,
    ) -> str:
        """Queue a request; `role` (an agent role) picks the suffix tree its outputs share for speculation;
        `reuse` (from the reuse planner) splices precomputed KV into the prompt and sets hooks. Raises
        InvalidRequestError for a request no step could serve, EngineOverloaded when the queue is full."""
        sampling = sampling or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        validate_prompt(prompt, self.model.config)
        context = self.model.config.max_context
        if reuse is not None:
            reuse.validate(len(prompt))
        request_id = request_id or f"req-{next(self._ids)}"
        if self.scheduler.find(request_id) is not None:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt,
            sampling=sampling,
            cache=self.model.new_cache(capacity=1),  # a slot is taken at admission, not while queued
            text=TextStream(self.tokenizer, sampling.stop),
            generator=make_generator(sampling),
            max_tokens=min(sampling.max_tokens, context - len(prompt)),
            role=role,
            reuse=reuse or PromptReuse(),
        )
        seq.stats.prompt_tokens = len(prompt)
        self.scheduler.add(seq)
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a request; its end is reported by the next `step()`. False if it is not known."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        with self._fails_alone(seq, self._pending_events):
            self._finish(seq, "cancelled")
            self._pending_events.append(self._end_event(seq, ""))
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending_events)

    # -- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One forward over the scheduled chunks; returns the tokens and endings it produced."""
        chunks = self.scheduler.schedule(self._admit, self._ready, self._partner)
        events, self._pending_events = self._pending_events, []  # (admissions that failed included)
        if not chunks:
            return events
        drafts = self._propose(chunks)
        try:
            batch = self._forward_batch(chunks, drafts)
            started = time.perf_counter()
            logits = self.model.forward(batch)  # [M, V]: a row per completing chunk, 1 + draft per verify
        except Exception as exc:  # the shared part: every request in it fails; those waiting go on
            log.exception("engine step failed: the %d request(s) in it fail", len(chunks))
            for chunk in chunks:
                events.append(self._fail(chunk.seq, exc))
            return events
        now = time.perf_counter()
        if self.speculator is not None:
            self.speculator.observe_step(len(batch.token_ids), now - started)
        row = 0
        for chunk in chunks:
            draft = drafts.get(chunk.seq.request_id)
            rows = 1 + len(draft) if draft is not None else int(chunk.completes_prompt)
            with self._fails_alone(chunk.seq, events):
                self._advance(chunk, draft, logits[row : row + rows] if rows else None, now, events)
            row += rows
        return events

    def stream(
        self, prompt_ids: Seq[int], sampling: SamplingParams | None = None, role: str | None = None
    ) -> Iterator[TokenEvent]:
        """Run one request to its end (other queued requests advance too), yielding its events."""
        request_id = self.add_request(prompt_ids, sampling, role=role)
        while True:
            for event in self.step():
                if event.request_id == request_id:
                    yield event
                    if event.finished:
                        return

    def generate(
        self, prompts: Seq[Seq[int]], sampling: SamplingParams | None = None, role: str | None = None
    ) -> list[Completion]:
        """Run several requests together (continuously batched) and return their completions in order (one
        that failed has finish_reason "error" and says why in `error`; the others are unaffected)."""
        ids = [self.add_request(prompt, sampling, role=role) for prompt in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        texts: dict[str, list[str]] = {i: [] for i in ids}
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for event in self.step():
                if event.request_id not in tokens:
                    continue
                if event.token_id is not None:
                    tokens[event.request_id].append(event.token_id)
                texts[event.request_id].append(event.text)
                if event.finished:
                    done[event.request_id] = Completion(
                        event.request_id,
                        tokens[event.request_id],
                        "".join(texts[event.request_id]),
                        event.finish_reason or "",
                        event.stats or RequestStats(),
                        event.error,
                    )
        return [done[i] for i in ids]

    # -- internals ------------------------------------------------------------------------------------
    def _advance(
        self,
        chunk: ScheduledChunk,
        draft: Draft | None,
        logits: torch.Tensor | None,
        now: float,
        events: list[TokenEvent],
    ) -> None:
        """One request's part of a step, after the forward: logits [its rows, V] (None: a chunk mid-prompt)."""
        seq = chunk.seq
        if draft is None:
            completes = chunk.completes_prompt  # (before num_computed moves)
            seq.num_computed += chunk.num_tokens
            self._splice_if_due(seq)
            if not completes:
                return
            if not seq.output_ids and seq.request_id in self._awaited:  # requests wait to read its prompt's KV
                self._awaited.discard(seq.request_id)
                self._cache_exact(seq)
            if not seq.output_ids and seq.reuse.on_prefilled is not None:
                seq.reuse.on_prefilled(seq.cache)  # the whole prompt's KV, before decoding appends to it
        assert logits is not None  # a chunk that reaches its last known token, or verifies a draft, has rows
        if draft is not None:
            self._accept(seq, draft, logits, now, events)
        else:
            events.append(self._append_token(seq, sample(logits[0], seq.sampling, seq.generator), now))

    @contextlib.contextmanager
    def _fails_alone(self, seq: Sequence, events: list[TokenEvent]) -> Iterator[None]:
        """What raises inside ends `seq` alone with finish_reason "error" (its end event goes to `events`)."""
        try:
            yield
        except Exception as exc:
            log.warning("request %s failed (the others go on)", seq.request_id, exc_info=exc)
            events.append(self._fail(seq, exc))

    def _fail(self, seq: Sequence, exc: Exception) -> TokenEvent:
        if seq.status is not Status.FINISHED:
            self._finish(seq, "error")
        seq.finish_reason = "error"  # also when a hook of an ending that was under way raised
        return TokenEvent(seq.request_id, None, "", True, "error", seq.stats, error=f"{type(exc).__name__}: {exc}")

    def _make_slots(self) -> KVSlots:
        c, model = self.model.config, self.model
        tokens = self.config.kv_slot_tokens or (
            c.max_context if model.device.type == "cpu" else min(c.max_context, 4096)
        )
        return KVSlots(
            num_layers=c.num_layers,
            num_slots=self.config.scheduler.max_running,
            num_kv_heads=c.num_kv_heads,
            capacity=tokens,
            head_dim=c.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    def _admit(self, seq: Sequence) -> bool:
        """Give a waiting request its KV; False if that failed (the request has then ended with an error)."""
        with self._fails_alone(seq, self._pending_events):
            slot = self.kv_slots.acquire()  # (not `or`: an empty cache is falsy)
            seq.cache = slot if slot is not None else self.model.new_cache(capacity=len(seq.prompt_ids) + 64)
            if self.prefix_cache is not None and seq.reuse.use_prefix_cache:
                # the last prompt token is always computed: its logits give the first output token; and the
                # exact cache never serves past a splice point
                limit = seq.reuse.splice_at if seq.reuse.splice_at is not None else len(seq.prompt_ids) - 1
                seq.prefix_match = match = self.prefix_cache.match(seq.prompt_ids, max_tokens=limit)  # pinned
                prefix = self._shareable(seq, match)
                if prefix is not None:
                    assert isinstance(seq.cache, SlotKVCache)
                    seq.cache.share(prefix)
                else:
                    self.prefix_cache.load(match, seq.cache)
                seq.num_computed = match.num_tokens
                seq.stats.prefix_hit_tokens = match.num_tokens
            self._splice_if_due(seq)
        return seq.status is not Status.FINISHED

    def _shareable(self, seq: Sequence, match: PrefixMatch) -> SharedPrefix | None:
        """The hit `seq` reads in place instead of copying, or None. A hit is shared when another running
        request reads it in place or a waiting one starts with it (a lone reader's two-part step costs ~15% more
        than its copy's over 2K tokens, two break even: bench/NOTES.md), when it is long enough, lands in a KV
        slot (the batched paths attend in two parts there), has no splice (a CacheBlend pass reads the cache's KV
        directly), and the model is a float one. Readers decode in the step graph (its prefix readers,
        step_graph.py): with 8 agents over 2K tokens 1.6x the copies' step (bench/NOTES.md). Quantized models
        copy: a reader's speculation tree runs through the layer graphs, whose other float sums (with int8
        activations) change tokens that a copy's tree in the step would keep."""
        least, hit = self.config.shared_prefix_min_tokens, match.num_tokens
        if (
            least is None
            or hit < least
            or not isinstance(seq.cache, SlotKVCache)
            or not _reads_exact_prefix(seq)
            or self.model.weight_format in QUANTIZED_FORMATS
        ):
            return None
        assert self.prefix_cache is not None
        prefix = self.prefix_cache.share(match)
        readers = (shared_prefix(other.cache) for other in self.scheduler.running)
        if any(reader is not None and reader.identity == prefix.identity for reader in readers):
            return prefix
        head = seq.prompt_ids[:hit]
        for other in itertools.islice(self.scheduler.waiting, PARTNER_WINDOW):
            if _reads_exact_prefix(other) and other.prompt_ids[:hit] == head:
                return prefix
        return None

    def _partner(self, seq: Sequence, other: Sequence) -> bool:
        """Whether waiting `other` would read in place the prefix that `seq` was just admitted reading."""
        prefix = shared_prefix(seq.cache)
        if prefix is None or not _reads_exact_prefix(other):
            return False
        return other.prompt_ids[: prefix.length] == seq.prompt_ids[: prefix.length]

    def _ready(self, seq: Sequence) -> bool:
        """Whether a waiting request may be admitted now. Not while a running request is prefilling a head it
        shares with it that is not cached yet (at least shared_prefix_min_tokens more than the cache serves):
        agents fanning out over a new context would each compute it; waiting, they compute it once, and read
        it from the prefix cache (in place, in float models) as soon as that prompt's prefill completes."""
        least = self.config.shared_prefix_min_tokens
        if least is None or self.prefix_cache is None or not seq.reuse.use_prefix_cache:
            return True
        ids, limit = seq.prompt_ids, (len(seq.prompt_ids) - 1 if seq.reuse.splice_at is None else seq.reuse.splice_at)
        cached: int | None = None
        for other in self.scheduler.running:
            if not other.in_prefill or not _reads_exact_prefix(other):
                continue  # (a splice's KV never enters the exact cache)
            if other.prompt_ids[:least] != ids[:least]:
                continue  # the cheap test first: most prompts part within their first blocks
            common = min(_common_head(other.prompt_ids, ids), limit)
            cached = self.prefix_cache.cached_tokens(ids, limit) if cached is None else cached
            if common - cached >= least:
                self._awaited.add(other.request_id)
                return False
        return True

    def _cache_exact(self, seq: Sequence) -> None:
        """Put the KV `seq` holds of its exact tokens (all, or those before a splice) into the prefix cache."""
        if self.prefix_cache is None:
            return
        exact = seq.num_computed if seq.reuse.splice_at is None else min(seq.num_computed, seq.reuse.splice_at)
        if exact:  # spliced KV is approximate: only what precedes it enters the exact cache
            prefix = shared_prefix(seq.cache)
            readable = 0 if prefix is None else prefix.length
            self.prefix_cache.insert(seq.all_ids[:exact], seq.cache, readable_from=readable)

    def held_kv_bytes(self) -> int:
        """Bytes of KV the running requests hold, a prefix they share counted once."""
        c = self.model.config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.model.dtype.itemsize
        shared: dict[object, int] = {}
        own = 0
        for seq in self.scheduler.running:
            prefix = shared_prefix(seq.cache)
            own += seq.cache.length - (prefix.length if prefix else 0)
            if prefix is not None:
                shared[prefix.identity] = prefix.length
        return (own + sum(shared.values())) * per_token

    def _splice_if_due(self, seq: Sequence) -> None:
        """Append (or compute) the planner's KV once the prompt before it is in the cache."""
        reuse = seq.reuse
        if seq.num_computed != reuse.splice_at or not reuse.splice_pending:
            return
        if reuse.splice_kv is not None:
            seq.cache.append(reuse.splice_kv)
            added, recomputed = reuse.splice_kv.length, 0
        else:
            assert reuse.splice_fn is not None
            added, recomputed = reuse.splice_fn(seq.cache)
        seq.num_computed += added
        seq.stats.prefix_hit_tokens += reuse.splice_exact
        seq.stats.reused_tokens = added - recomputed - reuse.splice_exact
        reuse.splice_kv = reuse.splice_fn = None  # done: free it, and never splice twice

    def _propose(self, chunks: list[ScheduledChunk]) -> dict[str, Draft]:
        """Drafts for this step's decoding requests (empty without speculation or where it does not pay)."""
        if self.speculator is None:
            return {}
        requests = [
            (c.seq.request_id, c.seq.all_ids, c.seq.max_tokens - len(c.seq.output_ids) - 1)
            for c in chunks
            if not c.seq.in_prefill  # a decode: the pending token is the last sampled one
        ]
        rows = sum(c.num_tokens for c in chunks)
        try:
            return self.speculator.propose(requests, rows, self.config.scheduler.max_batch_tokens - rows)
        except Exception:  # a draft is only an offer: without one each request decodes as plain decoding
            log.exception("drafting failed: this step runs without speculation")
            return {}

    def _forward_batch(self, chunks: list[ScheduledChunk], drafts: dict[str, Draft]) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        seq_chunks: list[SequenceChunk] = []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            draft = drafts.get(seq.request_id)
            if draft is not None:  # the pending token and the draft tree below it, all with logits
                tree_positions, mask = tree_inputs(draft, start, self.model.device)
                logit_rows.extend(range(len(ids), len(ids) + 1 + len(draft)))
                ids.append(seq.all_ids[start])
                ids.extend(draft.tokens)
                positions.extend(tree_positions.tolist())
                seq_chunks.append(SequenceChunk(seq.cache, 1 + len(draft), mask))
                continue
            ids.extend(seq.all_ids[start : start + chunk.num_tokens])
            positions.extend(range(start, start + chunk.num_tokens))
            if chunk.completes_prompt:
                logit_rows.append(len(ids) - 1)
            seq_chunks.append(SequenceChunk(seq.cache, chunk.num_tokens, prompt=seq.in_prefill))
        return ForwardBatch(
            token_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            chunks=seq_chunks,
            logit_rows=torch.tensor(logit_rows) if logit_rows else None,
        )

    def _accept(self, seq: Sequence, draft: Draft, logits: torch.Tensor, now: float, events: list[TokenEvent]) -> None:
        """Verify a draft (logits [1 + n, V]), keep the accepted path's KV, emit its tokens in order."""
        assert self.speculator is not None
        path, tokens = verify(draft, logits, seq.sampling, seq.generator)
        past = seq.num_computed  # the pending token's slot
        if path == list(range(len(path))):  # the accepted nodes already sit right after it
            seq.cache.truncate(past + 1 + len(path))
        else:
            seq.cache.keep(past + 1, [past + 1 + i for i in path])
        self.speculator.verified(seq.request_id, draft, len(path))
        seq.stats.verify_steps += 1
        seq.stats.drafted_tokens += len(draft)
        seq.stats.accepted_tokens += len(path)
        for n, token in enumerate(tokens, 1):
            seq.num_computed = past + 1 + min(n, len(path))  # tokens with KV once this one is appended
            events.append(self._append_token(seq, token, now))
            if seq.status is Status.FINISHED:
                break

    def _append_token(self, seq: Sequence, token: int, now: float) -> TokenEvent:
        seq.output_ids.append(token)
        if self.speculator is not None:  # verified: it may go into the suffix trees
            self.speculator.add_tokens(seq.request_id, seq.prompt_ids, seq.output_ids, 1, seq.role)
        seq.stats.output_tokens += 1
        if seq.stats.first_token_s is None:
            seq.stats.first_token_s = now
        eos = token in self.tokenizer.eos_token_ids and not seq.sampling.ignore_eos
        piece, stopped = ("", False) if eos else seq.text.push(token)
        if eos or stopped:
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= seq.max_tokens:
            self._finish(seq, "length")
        if seq.status is Status.FINISHED:
            return self._end_event(seq, piece + seq.text.flush(), token)
        return TokenEvent(seq.request_id, token, piece)

    def _end_event(self, seq: Sequence, text: str, token: int | None = None) -> TokenEvent:
        return TokenEvent(seq.request_id, token, text, True, seq.finish_reason, seq.stats)

    def _finish(self, seq: Sequence, reason: EngineFinish) -> None:
        """End a request and free its KV; a hook that raises does so after the KV is freed."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stats.finish_s = time.perf_counter()
        self.scheduler.remove(seq)
        try:
            if self.speculator is not None:
                self.speculator.finish(seq.request_id)
            if seq.reuse.on_finished is not None and reason in ("stop", "length"):
                seq.reuse.on_finished(seq.cache, list(seq.output_ids))
            if reason != "error":  # a failed request's KV is not trusted
                self._cache_exact(seq)
        finally:
            self._awaited.discard(seq.request_id)
            if self.prefix_cache is not None and seq.prefix_match is not None:
                self.prefix_cache.release(seq.prefix_match)
            if isinstance(seq.cache, SlotKVCache):
                seq.cache.free_slot()
            seq.cache = self.model.new_cache(capacity=1)  # free the KV now, not when the caller drops the seq
