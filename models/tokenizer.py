"""LLaMA tokenizer for LLaVA-1.5: tokenizer.json via `tokenizers`, or tokenizer.model via `sentencepiece`.

Added tokens such as <image> and <pad> always map to a single id. Decoding follows the LLaMA
decoder chain (▁ -> space, byte fallback, strip one leading space), and `IncrementalDecoder`
(models/stream_decode.py) streams text without ever emitting half of a multi-byte character.
This file holds the shared base and the tokenizer.json backend; the sentencepiece backend is
models/sp_tokenizer.py, imported only when a directory has no tokenizer.json.
"""

from __future__ import annotations

import operator
from pathlib import Path

# Re-exported: callers import IncrementalDecoder and REPLACEMENT_CHAR from here.
from models.chat_template import llava_chat_prompt
from models.jsonfile import read_json_object
from models.stream_decode import REPLACEMENT_CHAR, IncrementalDecoder

__all__ = ["IMAGE_TOKEN", "REPLACEMENT_CHAR", "SPIECE_UNDERLINE", "IncrementalDecoder", "Tokenizer", "TokenizerError"]

IMAGE_TOKEN = "<image>"
SPIECE_UNDERLINE = "▁"


class TokenizerError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    return read_json_object(path, TokenizerError, missing_ok=True)


def _content(value, where: str) -> str | None:
    """A special token's text: configs store either "<s>" or {"content": "<s>", ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")
    return value


class Tokenizer:
    """Text <-> token ids, built with `Tokenizer.from_dir(model_dir)`."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    image_token_id: int | None
    vocab_size: int  # every id, added tokens included (like len(hf_tokenizer))
    special_ids: frozenset[int]  # ids that decode(skip_special_tokens=True) drops

    @classmethod
    def from_dir(cls, model_dir) -> Tokenizer:
        """Load tokenizer.json (preferred) or tokenizer.model plus the json side files from model_dir."""
        d = Path(model_dir)
        if not d.is_dir():
            raise TokenizerError(f"{d}: tokenizer directory does not exist")
        config = _read_json(d / "tokenizer_config.json")
        special_map = _read_json(d / "special_tokens_map.json")
        if (d / "tokenizer.json").is_file():
            tok = _JsonTokenizer(d, config, special_map)
        elif (d / "tokenizer.model").is_file():
            # Imported here: models.sp_tokenizer subclasses Tokenizer, so a top-level import would be circular.
            from models.sp_tokenizer import _SentencePieceTokenizer

            tok = _SentencePieceTokenizer(d, config, special_map)
        else:
            raise TokenizerError(f"{d}: no tokenizer.json or tokenizer.model found")
        tok._resolve_special_ids(d, config, special_map)
        return tok

    def _resolve_special_ids(self, d: Path, config: dict, special_map: dict) -> None:
        def lookup(field: str, default: str | None) -> int | None:
            source = config if field in config else special_map
            where = f"{d / ('tokenizer_config.json' if source is config else 'special_tokens_map.json')}: {field}"
            if field in source:
                name = _content(source[field], where)
            else:
                name = default if default is not None and self.token_to_id(default) is not None else None
            if name is None:
                return None
            token_id = self.token_to_id(name)
            if token_id is None:
                raise TokenizerError(f"{where}: token {name!r} is not in the vocabulary")
            return token_id

        self.bos_token_id = lookup("bos_token", "<s>")
        self.eos_token_id = lookup("eos_token", "</s>")
        self.pad_token_id = lookup("pad_token", None)
        self.unk_token_id = lookup("unk_token", "<unk>")
        self.image_token_id = self.token_to_id(IMAGE_TOKEN)
        named = {self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id} - {None}
        self.special_ids = frozenset(self._special_added_ids() | named)

    # --- implemented by the two backends ---
    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _special_added_ids(self) -> set[int]:
        raise NotImplementedError

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback token (<0x41>) stands for, else None."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    # --- public API ---
    def encode(self, text: str) -> list[int]:
        """Token ids for text, with BOS when the tokenizer adds one."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: text must be a str, got {type(text).__name__}")
        return self._encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for ids; special tokens are dropped unless skip_special_tokens=False."""
        out = []
        for i in ids:
            try:  # operator.index accepts numpy/torch integer scalars but not floats or strings
                j = operator.index(i)
            except TypeError:
                j = None
            if j is None or isinstance(i, bool) or not 0 <= j < self.vocab_size:
                raise TokenizerError(f"decode: token id {i!r} is not an int in [0, {self.vocab_size})")
            out.append(j)
        return self._decode(out, skip_special_tokens)

    def chat_prompt(self, question: str, num_images: int = 1) -> str:
        """LLaVA-1.5 (llava-hf) single-turn prompt: 'USER: <image>\\n... ASSISTANT:'."""
        # Without an <image> token (original LLaVA checkpoints) the tag is still the marker the
        # caller splits on, as LLaVA's tokenizer_image_token does.
        if not isinstance(question, str):
            raise TokenizerError(f"chat_prompt: question must be a str, got {type(question).__name__}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise TokenizerError(f"chat_prompt: num_images must be an int >= 0, got {num_images!r}")
        return llava_chat_prompt([("user", num_images, [question])])

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh IncrementalDecoder for one generated sequence."""
        return IncrementalDecoder(self, skip_special_tokens)


class _JsonTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library; its post-processor decides about BOS."""

    def __init__(self, d: Path, config: dict, special_map: dict):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        path = d / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust loader raises its own Exception type
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from e
        # A tokenizer.json may carry truncation/padding settings; a prompt must never be cut silently.
        self._tok.no_truncation()
        self._tok.no_padding()
        # Tokens the config declares but tokenizer.json lacks as added tokens (transformers adds them too).
        for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
            where = f"{d / 'tokenizer_config.json'}: added_tokens_decoder[{token_id}]"
            content = _content(entry, where)
            if any(t.content == content for t in self._tok.get_added_tokens_decoder().values()):
                continue
            e = entry if isinstance(entry, dict) else {}
            extra = {k: bool(e[k]) for k in ("lstrip", "rstrip", "single_word") if k in e}
            special = bool(e.get("special", True))
            token = AddedToken(content, normalized=False, special=special, **extra)
            if special:
                self._tok.add_special_tokens([token])
            else:
                self._tok.add_tokens([token])
            if str(self._tok.token_to_id(content)) != str(token_id).strip():
                raise TokenizerError(f"{where}: {content!r} has id {self._tok.token_to_id(content)} in {path}")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _special_added_ids(self) -> set[int]:
        return {int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def byte_value(self, token_id: int) -> int | None:
        # Same test as the ByteFallback decoder: any token spelled exactly "<0xHH>".
        piece = self._tok.id_to_token(token_id)
        if piece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return int(piece[3:5], 16)
            except ValueError:
                return None
        return None

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            # Also drop config-named specials (e.g. a <pad> not flagged special in tokenizer.json).
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
