"""LLaMA tokenizer for LLaVA-1.5: tokenizer.json via `tokenizers`, or tokenizer.model via `sentencepiece`.

Added tokens such as <image> and <pad> always map to a single id. Decoding follows the LLaMA
decoder chain (▁ -> space, byte fallback, strip one leading space), and `IncrementalDecoder`
streams text without ever emitting half of a multi-byte character.
"""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path

IMAGE_TOKEN = "<image>"
SPIECE_UNDERLINE = "▁"
REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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
        return "USER: " + f"{IMAGE_TOKEN}\n" * num_images + question + " ASSISTANT:"

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


class _SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through `sentencepiece`, matching transformers' slow LlamaTokenizer.

    Added tokens are split out of the text first; each text chunk in between is encoded on its
    own. With legacy=True (the default) every chunk gets sentencepiece's dummy "▁" prefix, so
    "<image>\\nWhat" encodes as <image>, ▁, <0x0A>, ... as in LLaVA-1.5 training; with
    legacy=False only a chunk at the very start of the text gets it.
    """

    def __init__(self, d: Path, config: dict, special_map: dict):
        import sentencepiece as spm

        path = d / "tokenizer.model"
        try:
            proto = path.read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
            # Same model with normalizer_spec.add_dummy_prefix=false: a repeated occurrence of an
            # embedded protobuf message merges into the first one, so no protobuf dependency is needed.
            self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto + b"\x1a\x02\x18\x00")
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(f"{path}: cannot load sentencepiece model ({e})") from e
        sp = self._sp
        self._base = sp.get_piece_size()
        # Models trained without add_dummy_prefix must not lose a real leading space on decode.
        self._dummy_prefix = sp.encode("x", out_type=str)[0].startswith(SPIECE_UNDERLINE)
        self._legacy = bool(config.get("legacy", True))
        self._add_bos = bool(config.get("add_bos_token", True))
        self._add_eos = bool(config.get("add_eos_token", False))

        # content -> (id, lstrip, rstrip, special) for every token split out of the text.
        self._added: dict[str, tuple[int, bool, bool, bool]] = {}

        def add(content: str, token_id: int | None, where: str, lstrip=False, rstrip=False, special=True) -> None:
            if token_id is None:
                token_id = self._added[content][0] if content in self._added else self._piece_id(content)
                if token_id is None:
                    raise TokenizerError(f"{where}: token {content!r} is neither a piece of {path} nor an added token")
            if token_id < 0 or (token_id < self._base and sp.id_to_piece(token_id) != content):
                raise TokenizerError(f"{where}: id {token_id} for {content!r} clashes with piece "
                                     f"{sp.id_to_piece(token_id) if token_id >= 0 else None!r} of {path}")
            prev = self._added.get(content)
            if prev is not None and prev[0] != token_id:
                raise TokenizerError(f"{where}: {content!r} has id {token_id} but id {prev[0]} elsewhere")
            self._added[content] = (token_id, lstrip, rstrip, special)

        for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
            where = f"{d / 'tokenizer_config.json'}: added_tokens_decoder[{token_id}]"
            try:
                token_id = int(token_id)
            except ValueError:
                raise TokenizerError(f"{where}: id is not an integer") from None
            e = entry if isinstance(entry, dict) else {}
            add(_content(entry, where), token_id, where, bool(e.get("lstrip")), bool(e.get("rstrip")),
                bool(e.get("special", True)))
        added_json = _read_json(d / "added_tokens.json")
        for content, token_id in added_json.items():
            where = f"{d / 'added_tokens.json'}: {content!r}"
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise TokenizerError(f"{where}: id must be an int, got {token_id!r}")
            if content not in self._added:
                add(content, token_id, where)
            elif self._added[content][0] != token_id:
                raise TokenizerError(f"{where}: id {token_id} disagrees with tokenizer_config.json")
        for source, name in ((config, "tokenizer_config.json"), (special_map, "special_tokens_map.json")):
            for field in ("bos_token", "eos_token", "unk_token", "pad_token"):
                content = _content(source.get(field), f"{d / name}: {field}")
                if content is not None and content not in self._added:
                    add(content, None, f"{d / name}: {field}")
            for key in ("additional_special_tokens", "extra_special_tokens"):  # the latter is the v5 name
                extra = source.get(key) or []
                for i, value in enumerate(extra.values() if isinstance(extra, dict) else extra):
                    where = f"{d / name}: {key}[{i}]"
                    content = _content(value, where)
                    if content not in self._added:
                        add(content, None, where)
        # sentencepiece's own <unk>/<s>/</s> are split out of the text even without any config.
        for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()):
            if 0 <= i < self._base and sp.id_to_piece(i) not in self._added:
                add(sp.id_to_piece(i), i, str(path))

        self._id_to_added = {v[0]: c for c, v in self._added.items()}
        ids = sorted(self._id_to_added)
        self.vocab_size = max([self._base - 1, *ids]) + 1
        # Longest first, so the regex alternation prefers "<image>" over a shorter token it contains.
        names = sorted(self._added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def token_to_id(self, token: str) -> int | None:
        return self._added[token][0] if token in self._added else self._piece_id(token)

    def _special_added_ids(self) -> set[int]:
        return {v[0] for v in self._added.values() if v[3]}

    def byte_value(self, token_id: int) -> int | None:
        if 0 <= token_id < self._base and self._sp.is_byte(token_id):
            return int(self._sp.id_to_piece(token_id)[3:5], 16)
        return None

    def _encode(self, text: str) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        # parts alternates text, token, text, ...; honour lstrip/rstrip like transformers does.
        for i in range(1, len(parts), 2):
            _, lstrip, rstrip, _ = self._added[parts[i]]
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
            if rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
        ids = [self.bos_token_id] if self._add_bos and self.bos_token_id is not None else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._added[part][0])
            elif part:
                sp = self._sp if self._legacy or i == 0 else self._sp_no_prefix
                ids += sp.encode(part)
        if self._add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Same chain as the LLaMA tokenizer.json decoder: ▁ -> " ", byte fallback (a run of
        # <0x..> pieces that is not valid UTF-8 becomes one U+FFFD per byte), strip one space.
        sp, out, run = self._sp, [], bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            b = self.byte_value(i)
            if b is not None:
                run.append(b)
                continue
            if run:
                out.append(_bytes_to_text(run))
                run.clear()
            if i in self._id_to_added:
                out.append(self._id_to_added[i])
            elif i >= self._base:
                raise TokenizerError(f"decode: token id {i} is in no piece and no added token")
            else:
                out.append(sp.id_to_piece(i).replace(SPIECE_UNDERLINE, " "))
        if run:
            out.append(_bytes_to_text(run))
        text = "".join(out)
        return text[1:] if self._dummy_prefix and text.startswith(" ") else text


def _bytes_to_text(run: bytes) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return REPLACEMENT_CHAR * len(run)


class IncrementalDecoder:
    """Streams text deltas for generated ids; the deltas (plus flush()) join to decode(all ids).

    Each step decodes a short window from `prefix_offset` twice, without and with the unread
    tokens, and emits the difference. Decoding both from the same start keeps SentencePiece's
    leading-space handling consistent, and text ending in U+FFFD (an unfinished UTF-8 character
    from byte-fallback tokens) is held back until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # ids before this have been emitted

    def _window(self, end: int | None) -> str:
        return self.tokenizer.decode(self.ids[self.prefix_offset:end], self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly '')."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # dropping them here keeps a skipped token from ever starting a window
        self.ids.append(token_id)
        try:
            return self._emit(force=False)
        except ValueError:
            self.ids.pop()  # a bad id must not poison the stream
            raise

    def _emit(self, force: bool) -> str:
        prefix = self._window(self.read_offset)
        text = self._window(None)
        if not force and (len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHAR) and self._unfinished_char()):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def _unfinished_char(self) -> bool:
        """Do the trailing byte-fallback tokens form a valid but incomplete UTF-8 character?"""
        tail = []
        for i in reversed(self.ids[-4:]):  # a UTF-8 character is at most 4 bytes
            b = self.tokenizer.byte_value(i)
            if b is None:
                break
            tail.append(b)
        tail.reverse()
        for k in range(len(tail) - 1, -1, -1):
            b = tail[k]
            if b & 0xC0 == 0x80:
                continue  # continuation byte: keep looking for the lead byte
            need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return len(tail) - k < need
        return False  # no lead byte in reach: invalid bytes, their U+FFFD is final

    def flush(self) -> str:
        """Text still held back (an unfinished character at the end of the stream)."""
        return self._emit(force=True) if self.read_offset < len(self.ids) else ""
