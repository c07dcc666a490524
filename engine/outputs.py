"""What a request gives back: RequestOutput, its stats, and the incremental text with stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass

from models.tokenizer import Tokenizer

from scheduler.sequence import Sequence


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's CompletionOutput); `index` is its place among the n."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    delta: str = ""  # text added since this completion's previous output (streaming)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    """A request's result so far (or in full once `finished`), shaped like vLLM's RequestOutput.

    `outputs` holds the n completions; `text`, `token_ids`, `finish_reason`, `logprobs` and `delta`
    are shortcuts to outputs[0], so the one-completion case reads as before. `prompt` is None for a
    request given as prompt_token_ids; `prompt_token_ids` has one id per visual token, as the model saw it.
    """

    def __init__(self, request_id: str, text: str = "", token_ids: list[int] | None = None,
                 finish_reason: str | None = None, logprobs: list[dict[int, float]] | None = None,
                 stats: dict | None = None, delta: str = "", error: str | None = None, *,
                 outputs: list[CompletionOutput] | None = None, prompt: str | None = None,
                 prompt_token_ids: list[int] | None = None):
        self.request_id = request_id
        self.outputs = outputs if outputs is not None else [
            CompletionOutput(0, text, token_ids if token_ids is not None else [], finish_reason, logprobs, delta)]
        self.stats = stats if stats is not None else {}
        self.error = error  # set when finish_reason == "error"
        self.prompt, self.prompt_token_ids = prompt, prompt_token_ids

    text = property(lambda self: self.outputs[0].text, doc="outputs[0].text")
    token_ids = property(lambda self: self.outputs[0].token_ids, doc="outputs[0].token_ids")
    finish_reason = property(lambda self: self.outputs[0].finish_reason, doc="outputs[0].finish_reason")
    logprobs = property(lambda self: self.outputs[0].logprobs, doc="outputs[0].logprobs")
    delta = property(lambda self: self.outputs[0].delta, doc="outputs[0].delta")

    @property
    def finished(self) -> bool:
        """Every completion has finished."""
        return all(o.finished for o in self.outputs)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, outputs={self.outputs!r}, "
                f"finished={self.finished}, error={self.error!r})")


def request_stats(seq: Sequence, blocks_now: int, policy: str) -> dict:
    """Token counts, latencies and KV figures of one request."""
    end = seq.finish_time or time.perf_counter()
    gaps, times = seq.itl, seq.token_times
    return {
        "prompt_tokens": seq.prompt_len, "visual_tokens": seq.num_visual,
        "text_prompt_tokens": seq.prompt_len - seq.num_visual, "generated_tokens": len(seq.output_ids),
        "ttft_s": None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
        "e2e_s": end - seq.arrival_time, "tpot_s": (times[-1] - times[0]) / len(gaps) if gaps else None,
        "itl_s": list(gaps),
        "kv_peak_blocks": seq.kv_peak_blocks,
        "kv_blocks_final": seq.kv_blocks_final if seq.is_finished else blocks_now,
        "visual_tokens_per_layer": list(seq.visual_per_layer), "preemptions": seq.num_preemptions,
        "policy": policy,
    }


class TextState:
    """A request's detokenized text: grows a token at a time, finds stop strings, never takes text back.

    seq.text is always a prefix of decode(output ids) (cut before the first stop string, if any).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.decoder = tokenizer.stream_decoder()
        self.vocab_size = tokenizer.vocab_size
        self.sent = 0

    def append(self, seq: Sequence, tok: int) -> bool:
        """Add a token's text to seq.text; True if a stop string now ends it (text cut before it)."""
        # lm_head is often padded past the tokenizer (llava-hf: 32064 rows, 32002 tokens): no text for those.
        return self._add(seq, self.decoder.feed(tok) if tok < self.vocab_size else "")

    def flush(self, seq: Sequence) -> bool:
        """Add the text the decoder still holds (an open byte run); True if it completes a stop string."""
        return self._add(seq, self.decoder.flush())

    def _add(self, seq: Sequence, delta: str) -> bool:
        seq.text += delta
        if not seq.params.stop or not delta:
            return False
        # Only the tail can hold a new match: the longest stop string plus this step's text.
        tail_from = max(0, len(seq.text) - len(delta) - max(map(len, seq.params.stop)))
        hits = [i for i in (seq.text.find(s, tail_from) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
        return bool(hits)

    def delta(self, seq: Sequence) -> str:
        """Text not yet handed out, holding back what could still start a stop string."""
        visible = len(seq.text)
        if not seq.is_finished and seq.params.stop:
            visible = max(self.sent, visible - max(map(len, seq.params.stop)) + 1)
        out, self.sent = seq.text[self.sent:visible], visible
        return out
