"""Streaming detokenization: `IncrementalDecoder` turns generated ids into text deltas without
ever emitting half of a multi-byte character."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # models.tokenizer imports this module, so only for annotations
    from models.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


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
