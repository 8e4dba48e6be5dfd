"""llama.cpp itself on the same GGUF, through llama-cpp-python in a child process: `kvmesh bench engine`'s
comparison column.

It is the CPU user's alternative, measured as that user would run it: llama.cpp computes with the GGUF's
own quantized weights (Q4_1 for the bundled SmolLM2) and its own kernels, while kvmesh dequantizes them at
load (fp32 on CPU by default). So this compares two engines on one file, not two kernels on the same numbers.

Each round measures both engines at every length back to back, the one to go first alternating, so that
both see the same load on this shared machine; a figure is the median over rounds, with its spread
(max - min) / median. llama.cpp runs in a child process: in one process, two OpenMP runtimes (torch's and
llama.cpp's) keep their idle threads spinning against each other's work, which made our decode 10x slower in
this section than alone (1.2 s/token against 0.13 s). Both processes keep the same wait policy (this one's
environment, libgomp's brief spin by default): a passive policy for the child alone handicapped llama.cpp,
whose decode crosses a barrier per operation (bench/NOTES.md).

Optional: llama-cpp-python compiles llama.cpp when installed (~11 minutes of CPU), so it is no dependency of
kvmesh; without it the section is skipped with a note saying how to get it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bench_common import Json, log, median_spread, random_ids
from .llama_cpp_server import missing_note

# One engine's measurement: prompt ids [n], decode steps after it (0: none) ->
# (prefill seconds, decode ms/token after the prompt, or None without decode steps).
Measure = Callable[[torch.Tensor, int], tuple[float, float | None]]

LLAMA, OURS = "llama_cpp", "ours"
WARMUP_TOKENS = 32  # the warm-up prompt's length, as bench_prefill's

DEFINITIONS = {
    "prefill_speedup": "ours prefill tok/s / llama.cpp's at the same length: how many times faster kvmesh is "
    "(> 1: kvmesh faster)",
    "decode_speedup": "llama.cpp decode ms/token / ours at the same context: how many times faster kvmesh is "
    "(> 1: kvmesh faster)",
    "spread": "(max - min) / median over the rounds",
}


@dataclass(frozen=True)
class Sizes:
    prefill_lengths: tuple[int, ...]  # prompt tokens; prefill tok/s at each
    decode_contexts: tuple[int, ...]  # cached tokens; decode ms/token at each (each is also a prefill length)
    decode_tokens: int  # timed single-token steps per measurement (median), after one untimed step
    rounds: int  # interleaved repeats of every measurement

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.prefill_lengths) | set(self.decode_contexts)))


class LlamaCpp:
    """A llama_cpp.Llama over `gguf` with room for the longest prompt plus its decode steps; `vocab` is the
    model's, for the decode steps' random tokens."""

    def __init__(self, gguf: Path, threads: int, sizes: Sizes, vocab: int) -> None:
        import llama_cpp

        self.vocab = vocab
        n_ctx = max(*sizes.lengths, WARMUP_TOKENS) + sizes.decode_tokens + 8  # the longest prompt and its steps
        self.llm: Any = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_threads=threads,  # decode
            n_threads_batch=threads,  # prefill
            n_batch=n_ctx,  # a prompt in one eval call; llama.cpp computes it in n_ubatch (<= 512) pieces
            logits_all=False,  # only the last position's logits, as our prefill computes
            verbose=False,
        )

    def measure(self, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float | None]:
        """The `Measure` of llama.cpp: eval of the prompt into an emptied cache, then single-token evals."""
        prompt = ids.tolist()
        # The same decode tokens as bench_common.decode_ms (seeded by the context), outside the timing.
        steps = random_ids(decode_tokens + 1, self.vocab, seed=len(prompt)).tolist() if decode_tokens else []
        self.llm.reset()  # n_tokens = 0: eval drops the cached KV from there on
        start = time.perf_counter()
        self.llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        times = []
        for i, token in enumerate(steps):
            start = time.perf_counter()
            self.llm.eval([token])
            if i:  # the first step after a prefill is a warm-up, as in decode_ms
                times.append(time.perf_counter() - start)
        return prefill_s, (1000 * statistics.median(times) if times else None)

    def weights(self) -> str | None:
        """The GGUF's weight type as llama.cpp names it (Q4_1, ...), from the file's general.file_type."""
        import gguf

        value = self.llm.metadata.get("general.file_type")
        try:
            return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
        except (TypeError, ValueError):
            return None

    def close(self) -> None:
        self.llm.close()


def _library_info() -> Json:
    """llama-cpp-python's version and the CPU features its llama.cpp was compiled for (what its kernels use)."""
    import llama_cpp

    info: Json = {"version": getattr(llama_cpp, "__version__", None), "system_info": None}
    print_info = getattr(llama_cpp, "llama_print_system_info", None)
    if print_info is not None:
        found = print_info()
        info["system_info"] = (found.decode() if isinstance(found, bytes) else str(found)).strip()
    return info


IDLE_PAUSE_S = 0.5


def interleaved_rounds(engines: dict[str, Measure], sizes: Sizes, vocab: int) -> dict[str, Json]:
    """Every engine at every length, round by round; per engine: median prefill tok/s and decode ms/token,
    each with its spread."""
    samples: dict[str, dict[int, list[tuple[float, float | None]]]] = {
        name: {n: [] for n in sizes.lengths} for name in engines
    }
    for round_ in range(sizes.rounds):
        order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]  # neither always runs on a cold cache
        for n in sizes.lengths:
            ids = random_ids(n, vocab, seed=n)  # [n] token ids, the same for every engine
            tokens = sizes.decode_tokens if n in sizes.decode_contexts else 0
            for name in order:
                log(
                    f"llama.cpp round {round_ + 1}/{sizes.rounds}: {name} prefill {n}"
                    + (f", {tokens} decode steps" if tokens else "")
                )
                samples[name][n].append(engines[name](ids, tokens))
                time.sleep(IDLE_PAUSE_S)  # the other engine's idle threads stop spinning before its turn
    return {name: _summarize(by_length, sizes) for name, by_length in samples.items()}


def _summarize(by_length: dict[int, list[tuple[float, float | None]]], sizes: Sizes) -> Json:
    result: Json = {"prefill_tok_s": {}, "prefill_spread": {}, "decode_ms_per_token": {}, "decode_spread": {}}
    for n, runs in by_length.items():
        if n in sizes.prefill_lengths:
            tok_s, spread = median_spread([n / prefill_s for prefill_s, _ in runs])
            result["prefill_tok_s"][str(n)], result["prefill_spread"][str(n)] = tok_s, spread
        if n in sizes.decode_contexts:
            ms, spread = median_spread([ms for _, ms in runs if ms is not None])
            result["decode_ms_per_token"][str(n)], result["decode_spread"][str(n)] = ms, spread
    return result


def bench_llamacpp(gguf: Path, threads: int, sizes: Sizes, vocab: int, ours: Measure) -> Json:
    """llama.cpp's prefill tok/s and decode ms/token on `gguf`, interleaved round by round with `ours`.

    Skipped (a "skipped" note, no figures) without llama-cpp-python, or when the model is no GGUF file.
    """
    note = missing_note(server=False)
    if note is None and gguf.suffix.lower() != ".gguf":
        note = f"{gguf} is no GGUF file: llama.cpp reads GGUF only"
    if note is not None:
        log(f"llama.cpp: skipped: {note}")
        return {"skipped": note}
    log(f"llama.cpp: loading {gguf.name} through llama-cpp-python ({threads} threads, a child process)")
    start = time.perf_counter()
    with LlamaCppProcess(gguf, threads, sizes, vocab) as llama:
        info = llama.info()
        load_s = time.perf_counter() - start
        for measure in (llama.measure, ours):  # warm-up: first-call allocations, and a warm cache for both
            measure(random_ids(WARMUP_TOKENS, vocab, seed=0), 2)
        engines = interleaved_rounds({LLAMA: llama.measure, OURS: ours}, sizes, vocab)
    weights = info["weights"]
    return {
        **info["library"],
        "weights": weights,
        "note": f"llama.cpp computes with the GGUF's own {weights or 'quantized'} weights and its own kernels",
        "load_s": load_s,
        "settings": info["settings"],
        "rounds": sizes.rounds,
        "decode_tokens": sizes.decode_tokens,
        **engines[LLAMA],
        "ours": engines[OURS],
        "definitions": DEFINITIONS,
    }


class LlamaCppProcess:
    """A LlamaCpp in a child process, driven by one JSON line per request."""

    def __init__(self, gguf: Path, threads: int, sizes: Sizes, vocab: int) -> None:
        spec = {
            "gguf": str(gguf),
            "threads": threads,
            "vocab": vocab,
            "lengths": list(sizes.lengths),
            "decode_tokens": sizes.decode_tokens,
        }
        self.child = subprocess.Popen(
            [sys.executable, "-m", __name__, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def _ask(self, request: Json) -> Json:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(json.dumps(request) + "\n")
        self.child.stdin.flush()
        answer = self.child.stdout.readline()
        if not answer:
            raise RuntimeError(f"llama.cpp's process exited (code {self.child.wait()}); its error is above")
        return json.loads(answer)

    def info(self) -> Json:
        return self._ask({"info": True})

    def measure(self, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float | None]:
        """The `Measure` of llama.cpp, computed in the child."""
        found = self._ask({"ids": ids.tolist(), "decode_tokens": decode_tokens})
        return found["prefill_s"], found["decode_ms"]

    def __enter__(self) -> LlamaCppProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()  # end of requests: the child returns
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()


def _serve_requests(spec: Json) -> None:
    """The child: a LlamaCpp answering LlamaCppProcess's requests on stdin, one JSON line each, until EOF."""
    lengths = tuple(spec["lengths"])
    sizes = Sizes(prefill_lengths=lengths, decode_contexts=(), decode_tokens=spec["decode_tokens"], rounds=1)
    llama = LlamaCpp(Path(spec["gguf"]), spec["threads"], sizes, spec["vocab"])
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("info"):
                context = llama.llm.context_params
                answer: Json = {"library": _library_info(), "weights": llama.weights(), "settings": {
                    "n_ctx": llama.llm.n_ctx(), "n_batch": context.n_batch, "n_ubatch": context.n_ubatch,
                    "n_threads": spec["threads"]}}  # fmt: skip
            else:
                prefill_s, decode_ms = llama.measure(torch.tensor(request["ids"]), request["decode_tokens"])
                answer = {"prefill_s": prefill_s, "decode_ms": decode_ms}
            print(json.dumps(answer), flush=True)
    finally:
        llama.close()


def speedups(result: Json, main: int) -> Json:
    """The issue's `vs_llamacpp`: how many times faster kvmesh is (> 1: kvmesh faster), at `main` tokens and
    at each measured length."""
    if "skipped" in result:
        return {"skipped": result["skipped"]}
    ours = result["ours"]
    prefill = {n: ours["prefill_tok_s"][n] / tok_s for n, tok_s in result["prefill_tok_s"].items()}
    decode = {c: ms / ours["decode_ms_per_token"][c] for c, ms in result["decode_ms_per_token"].items()}
    return {
        "context": main,
        "decode_speedup": decode.get(str(main)),
        "prefill_speedup": prefill.get(str(main)),
        "decode_speedup_by_context": decode,
        "prefill_speedup_by_length": prefill,
        "definitions": {k: v for k, v in DEFINITIONS.items() if k.endswith("_speedup")},
    }


if __name__ == "__main__":
    _serve_requests(json.loads(sys.argv[1]))
