"""The sentencepiece (tokenizer.model) backend of `Tokenizer`; `Tokenizer.from_dir` picks it
when a model directory has no tokenizer.json."""

from __future__ import annotations

import re
from pathlib import Path

from models.stream_decode import _bytes_to_text
from models.tokenizer import SPIECE_UNDERLINE, Tokenizer, TokenizerError, _content, _read_json


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
