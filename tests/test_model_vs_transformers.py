"""Our loaders, tokenizer and forward against transformers' own loaders as the oracle.

The GGUF half uses the real SmolLM2-135M file (transformers dequantizes it itself and undoes llama.cpp's Q/K
row permutation itself); the HF-directory half saves small random transformers models and loads them back.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub; set before transformers loads

import pytest
import torch
import transformers
from tiny_model import TINY_CHAT_TEMPLATE, randomize_hf_model_, tiny_vocab

from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_files import load_raw_model, resolve_model_path
from kvmesh.workers.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "1234567890 3.14159 -42 1,000,000 2024-11-28",
    "naïve café — Grüße, 日本語のテキスト, emoji 🤖🎉👍🏽 and ∑ x² ≤ ∞",
    'def area(r: float) -> float:\n    """Circle."""\n    return 3.14159 * r ** 2  # πr²\n\n\tprint(area(2))\n',
    "  leading spaces,\ttabs\n\nand <|im_end|> a control token in the middle",
]


def _logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    return model.forward(ForwardBatch.single(model.new_cache(), ids, all_logits=True))  # [T, V]


# -- the real GGUF ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_gguf_model():
    path = resolve_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf.eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    path = resolve_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.render_chat(CHAT))


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(raw_model, hf_gguf_model):
    """Same dequantized values under the same names; Q/K rows un-permuted exactly as transformers does."""
    hf_state = hf_gguf_model.state_dict()
    assert set(raw_model.weights) == set(hf_state) - {"lm_head.weight"}
    assert raw_model.config.tie_word_embeddings and hf_gguf_model.config.tie_word_embeddings
    for name, weight in raw_model.weights.items():
        assert torch.equal(weight, hf_state[name]), name


@pytest.mark.slow
def test_config_matches_transformers(raw_model, hf_gguf_model):
    ours, theirs = raw_model.config, hf_gguf_model.config
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (49152, 576, 1536)
    assert ours.vocab_size == theirs.vocab_size and ours.hidden_size == theirs.hidden_size
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.num_layers == theirs.num_hidden_layers == 30
    assert ours.num_heads == theirs.num_attention_heads == 9
    assert ours.num_kv_heads == theirs.num_key_value_heads == 3
    assert ours.head_dim == 64 and ours.rope.theta == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert ours.bos_token_id == 1 and 2 in ours.eos_token_ids


@pytest.mark.slow
def test_chat_prompt_logits_match_transformers(model, hf_gguf_model, chat_ids):
    ours = _logits(model, chat_ids)
    with torch.no_grad():
        theirs = hf_gguf_model(torch.tensor([chat_ids])).logits[0].float()
    assert ours.shape == theirs.shape == (len(chat_ids), 49152)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, f"max |logit diff| vs transformers = {diff:.3g} (logit scale {theirs.abs().max():.3g})"
    mismatched = (ours.argmax(-1) != theirs.argmax(-1)).nonzero().flatten().tolist()
    assert not mismatched, f"argmax differs at positions {mismatched}"


@pytest.mark.slow
def test_greedy_answer_is_paris(model, tokenizer, chat_ids):
    """A language-level check on top of the numerics: greedy decoding answers the question."""
    cache = model.new_cache()
    logits = model.forward(ForwardBatch.single(cache, chat_ids))
    out: list[int] = []
    for _ in range(10):
        token = int(logits[-1].argmax())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        logits = model.forward(ForwardBatch.single(cache, [token]))
    assert "Paris" in tokenizer.decode(out)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(TEXTS) + 1))
def test_tokenizer_ids_equal_transformers(tokenizer, hf_gguf_tokenizer, index):
    text = tokenizer.render_chat(CHAT) if index == len(TEXTS) else TEXTS[index]
    ids = tokenizer.encode(text)
    assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_chat_prompt_tokens(tokenizer, chat_ids):
    assert len(chat_ids) == 37
    assert chat_ids[0] == tokenizer.bos_token_id == tokenizer.token_id("<|im_start|>") == 1
    assert chat_ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> ass istant \n
    assert chat_ids.count(tokenizer.token_id("<|im_end|>")) == 2


@pytest.mark.slow
def test_render_chat_matches_transformers_template(tokenizer, hf_gguf_tokenizer):
    messages = [*CHAT, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    for conversation in (CHAT, messages, [{"role": "system", "content": "Be brief."}, *CHAT]):
        expected = hf_gguf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert tokenizer.render_chat(conversation) == expected


@pytest.mark.slow
def test_render_chat_rejects_messages_without_role_or_content(tokenizer):
    for bad in ({"role": "user"}, {"content": "hi", "name": "bob"}, {}):
        with pytest.raises(ValueError, match="'role' and 'content'"):
            tokenizer.render_chat([bad])


# -- HF directories (safetensors + config.json + tokenizer.json) -----------------------------------------
def _tiny_tokenizer_backend():
    tokens, merges, types = tiny_vocab()
    return Tokenizer.from_bpe(
        tokens=tokens, merges=merges, token_types=types, chat_template=None, bos_token_id=1, eos_token_ids=(2,)
    ).backend


def _save_hf_model(directory, hf_config, seed: int, backend=None, chat_template: str | None = None):
    hf = transformers.LlamaForCausalLM(hf_config)
    randomize_hf_model_(hf, seed)
    if hf_config.tie_word_embeddings:
        hf.tie_weights()
    hf.eval()
    hf.save_pretrained(directory, safe_serialization=True)
    (backend or _tiny_tokenizer_backend()).save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return hf


HF_VARIANTS = {
    "tied-gqa": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
    "untied-mha": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "untied-gqa4-llama3-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_directory_logits_match_transformers(tmp_path, variant):
    tokens, _, _ = tiny_vocab()
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        **HF_VARIANTS[variant],
    )
    hf = _save_hf_model(tmp_path, hf_config, seed=3, chat_template=TINY_CHAT_TEMPLATE)

    raw = load_raw_model(tmp_path)
    c = raw.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, hf_config.num_key_value_heads, 16)
    assert c.tie_word_embeddings == hf_config.tie_word_embeddings
    assert c.rope.theta == hf_config.rope_parameters["rope_theta"]  # transformers 5 nests it in rope_parameters
    assert c.rms_norm_eps == 1e-6 and c.max_context == 512 and c.eos_token_ids == (2,)
    assert ("lm_head.weight" in raw.weights) == (not hf_config.tie_word_embeddings)

    ids = raw.tokenizer.encode(raw.tokenizer.render_chat([{"role": "user", "content": "hello there, hell"}]))
    ids += list(range(3, 3 + 40))  # longer than the llama3 variant's original context: scaling must matter
    ours = _logits(LlamaModel(c, raw.weights), ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert theirs.abs().max() > 1.0  # O(1) logits, so the tolerance below is meaningful
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| = {diff:.3g}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_hf_directory_tokenizer_and_template(tmp_path):
    tokens, _, _ = tiny_vocab()
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=1,
        eos_token_id=[2, 0],
    )
    _save_hf_model(tmp_path, hf_config, seed=0, chat_template=TINY_CHAT_TEMPLATE)
    raw = load_raw_model(tmp_path)
    tok = raw.tokenizer
    assert tok.bos_token_id == tokens.index("<|im_start|>") == 1
    assert raw.config.eos_token_ids == tok.eos_token_ids == (2, 0)
    prompt = tok.render_chat([{"role": "user", "content": "hello"}])
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(2) == 1 and tok.token_id("hell") in ids  # control tokens + merges apply
    assert tok.decode(ids) == prompt


@pytest.mark.slow
def test_hf_directory_with_smollm2_tokenizer(tmp_path, tokenizer, chat_ids):
    """A directory carrying the real 49152-token tokenizer.json: same ids as the GGUF tokenizer."""
    hf_config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = _save_hf_model(tmp_path, hf_config, seed=1, backend=tokenizer.backend, chat_template=tokenizer.chat_template)
    raw = load_raw_model(tmp_path)
    assert raw.tokenizer.render_chat(CHAT) == tokenizer.render_chat(CHAT)
    assert raw.tokenizer.encode(tokenizer.render_chat(CHAT)) == chat_ids
    ours = _logits(LlamaModel(raw.config, raw.weights), chat_ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([chat_ids])).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-4
