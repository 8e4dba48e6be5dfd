"""Tokenizer and chat template: a byte-level BPE (from GGUF tokens+merges or a tokenizer.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

_CONTROL_TOKEN_TYPE = 3  # GGUF token_type for control tokens such as <|im_start|>
_META_FILE = "kvmesh_tokenizer.json"


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self._template = _compile(chat_template) if chat_template else None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_bpe(
        cls,
        *,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
    ) -> Tokenizer:
        """Byte-level BPE as llama.cpp's "gpt2" tokenizer model: no prefix space, control tokens special."""
        vocab = {token: index for index, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if token_types is not None:
            special = [tokens[i] for i, kind in enumerate(token_types) if kind == _CONTROL_TOKEN_TYPE]
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(backend, chat_template=chat_template, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids)

    @classmethod
    def from_hf_dir(cls, directory: Path, eos_token_ids: Sequence[int]) -> Tokenizer:
        backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()
        bos = config.get("bos_token")
        bos_text = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = backend.token_to_id(bos_text) if bos_text else None
        return cls(backend, chat_template=template, bos_token_id=bos_id, eos_token_ids=eos_token_ids)

    def save(self, directory: Path) -> None:
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {
            "chat_template": self.chat_template,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
        }
        (directory / _META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        meta = json.loads((directory / _META_FILE).read_text())
        backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(backend, **meta)

    # -- text <-> ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone: no BOS added; special tokens written in the text map to their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    # -- chat -------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, through the model's own chat template."""
        if self._template is None:
            raise ValueError("this model has no chat template; pass a raw prompt instead of chat messages")
        for message in messages:
            if not {"role", "content"} <= set(message):
                raise ValueError(f"chat messages need 'role' and 'content' keys, got {sorted(message)}")
        bos = self.decode([self.bos_token_id]) if self.bos_token_id is not None else ""
        eos = self.decode([self.eos_token_ids[0]])
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )


def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Each push decodes only a short window (a few already-emitted ids as context, so decoders that strip
    a leading space from a lone token stay right, plus the ids not yet emitted): O(1) per token.
    """

    _CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._context: list[int] = []
        self._pending: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self._pending.append(token_id)
        window = self._tokenizer.decode(self._context + self._pending)
        if window.endswith("\ufffd"):  # a multi-byte character is split across tokens: wait for the rest
            return ""
        piece = window[len(self._tokenizer.decode(self._context)) :]
        self._context = (self._context + self._pending)[-self._CONTEXT :]
        self._pending = []
        self.text += piece
        return piece
