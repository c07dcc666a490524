"""Streaming detokenization: `IncrementalDecoder` turns generated ids into text deltas that are
never taken back: the deltas always join to `decode(ids)`."""

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
    leading-space handling consistent.

    Byte-fallback pieces (<0x0A>, the bytes of an emoji) are decoded a whole run at a time, and a
    run that is not valid UTF-8 becomes one U+FFFD per byte, so a later byte can turn text that
    already decoded cleanly ("\n") into U+FFFD. Hence nothing is emitted while the newest id is a
    byte piece: the run is emitted once a non-byte id closes it (or at flush()). Long byte runs
    (text in a script the vocabulary lacks) therefore arrive a run at a time.
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
        """Add one generated id; return the newly final text (possibly '')."""
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
        # The byte test comes after decoding, which has validated the id.
        if not force and (len(text) <= len(prefix) or self.tokenizer.byte_value(self.ids[-1]) is not None):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Text still held back (an open byte run at the end of the stream)."""
        return self._emit(force=True) if self.read_offset < len(self.ids) else ""
