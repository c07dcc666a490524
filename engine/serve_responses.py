"""OpenAI response bodies for engine.serve: completions, stream chunks, logprobs, usage, metrics text."""
from __future__ import annotations

import json

from models.tokenizer import Tokenizer

from .outputs import CompletionOutput, RequestOutput

ST3_STATS = ("prompt_tokens", "visual_tokens", "visual_tokens_per_layer", "kv_peak_blocks", "kv_blocks_final",
             "preemptions", "ttft_s", "policy")


def usage(out: RequestOutput) -> dict:
    """The prompt counted once, the completion tokens summed over the n completions (as vLLM does)."""
    prompt, completion = out.stats.get("prompt_tokens", 0), sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure(out: RequestOutput) -> str | None:
    """The error message when any completion ended in an engine error, else None."""
    if any(c.finish_reason == "error" for c in out.outputs):
        return out.error or "internal error"
    return None


def st3_stats(out: RequestOutput) -> dict:
    """The request's visual-token and KV figures: an extra field that OpenAI clients ignore."""
    return {k: out.stats.get(k) for k in ST3_STATS}


class LogprobFormatter:
    """Per-token logprobs in the chat (`content` list) or legacy completions layout."""

    def __init__(self, tokenizer: Tokenizer, top: int):
        self.tok, self.top = tokenizer, top

    def token(self, token_id: int) -> str:
        if token_id >= self.tok.vocab_size:  # lm_head padding rows have no text
            return ""
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _pairs(self, token_id: int, entry: dict[int, float]) -> tuple[float, list[tuple[int, float]]]:
        # LLM.step writes the sampled token first, then the top ones best first (the sampled token
        # keeps its first place when it is one of them).
        items = list(entry.items())
        alts = items[1:] if len(items) > self.top else sorted(items, key=lambda kv: -kv[1])
        return entry[token_id], alts

    def chat(self, token_ids: list[int], entries: list[dict]) -> dict:
        content = []
        for t, e in zip(token_ids, entries):
            lp, alts = self._pairs(t, e)
            s = self.token(t)
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace")),
                            "top_logprobs": [{"token": self.token(i), "logprob": v,
                                              "bytes": list(self.token(i).encode("utf-8", "replace"))}
                                             for i, v in alts]})
        return {"content": content}

    def legacy(self, token_ids: list[int], entries: list[dict], offset: int = 0) -> dict:
        tokens = [self.token(t) for t in token_ids]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(token_ids, entries)],
                "top_logprobs": [{self.token(i): v for i, v in self._pairs(t, e)[1]}
                                 for t, e in zip(token_ids, entries)],
                "text_offset": offsets}


def chat_response(rid: str, created: int, model: str, out: RequestOutput, lp: LogprobFormatter | None) -> dict:
    """A chat.completion body: one choice per completion, in index order."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": lp.chat(c.token_ids, c.logprobs) if lp else None,
                         "finish_reason": c.finish_reason} for c in out.outputs],
            "usage": usage(out), "st3": st3_stats(out)}


def completion_response(rid: str, created: int, model: str, out: RequestOutput, lp: LogprobFormatter | None) -> dict:
    """A text_completion body: one choice per completion, in index order."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text,
                         "logprobs": lp.legacy(c.token_ids, c.logprobs) if lp else None,
                         "finish_reason": c.finish_reason} for c in out.outputs],
            "usage": usage(out), "st3": st3_stats(out)}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ChunkWriter:
    """Stream chunks for one request, chat or completions, with n completions.

    As in OpenAI's and vLLM's streams, every chunk carries one choice whose `index` says which completion
    it extends; each completion gets its own role chunk (chat) and its own finish_reason, once.
    """

    def __init__(self, chat: bool, rid: str, created: int, model: str, include_usage: bool,
                 lp: LogprobFormatter | None, n: int = 1):
        self.chat, self.include_usage, self.lp, self.n = chat, include_usage, lp, n
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                     "model": model}
        self.sent_tokens, self.text_offset, self.finish_sent = [0] * n, [0] * n, [False] * n

    def _body(self, choice: dict) -> dict:
        body = {**self.head, "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def first(self) -> str:
        if not self.chat:
            return ""
        return "".join(sse(self._body({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None})) for i in range(self.n))

    def _choice(self, c: CompletionOutput) -> dict | None:
        """Completion c's next choice (None when it adds neither text, logprobs nor its finish)."""
        i = c.index
        new_ids = c.token_ids[self.sent_tokens[i]:]
        logprobs = None
        if self.lp and new_ids:
            entries = c.logprobs[self.sent_tokens[i]:]
            logprobs = self.lp.chat(new_ids, entries) if self.chat else \
                self.lp.legacy(new_ids, entries, self.text_offset[i])
            self.sent_tokens[i] = len(c.token_ids)
        finishing = c.finished and not self.finish_sent[i]
        if not c.delta and logprobs is None and not finishing:
            return None
        self.finish_sent[i] |= finishing
        self.text_offset[i] += len(c.delta)
        text = {"delta": {"content": c.delta} if c.delta else {}} if self.chat else {"text": c.delta}
        return {"index": i, **text, "logprobs": logprobs, "finish_reason": c.finish_reason if finishing else None}

    def update(self, out: RequestOutput) -> str:
        """The chunks for an output, one per completion it moved; the request's last carries "st3"."""
        bodies = [self._body(ch) for ch in map(self._choice, out.outputs) if ch is not None]
        if out.finished and bodies:
            bodies[-1]["st3"] = st3_stats(out)
        return "".join(map(sse, bodies))

    def last(self, out: RequestOutput) -> str:
        if not self.include_usage:
            return ""
        return sse({**self.head, "choices": [], "usage": usage(out)})


def prometheus(m: dict) -> str:
    """engine metrics in the Prometheus text exposition format."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP st3_{name} {help_}", f"# TYPE st3_{name} {kind}"])
        lines.extend(f"st3_{name}{labels} {value}" for labels, value in samples)

    kv = m["kv"]
    metric("requests_running", "gauge", "Requests holding KV cache and being decoded.", [("", m["running"])])
    metric("requests_waiting", "gauge", "Requests queued for prefill (new or preempted).", [("", m["waiting"])])
    metric("kv_blocks_used", "gauge", "KV cache blocks in use (a block = block_size tokens of one layer).",
           [("", kv["used_blocks"])])
    metric("kv_blocks_free", "gauge", "KV cache blocks free.", [("", kv["free_blocks"])])
    metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.", [("", kv["total_blocks"])])
    metric("visual_tokens_kept_mean", "gauge", "Visual tokens kept per decoder layer, mean over finished image "
           f"requests (policy {m['policy']}).",
           [(f'{{layer="{i}"}}', f"{v:.6g}") for i, v in enumerate(m["visual_tokens_kept_mean"])])
    metric("preemptions_total", "counter", "Preemptions (a request's KV freed and recomputed later).",
           [("", m["preemptions_total"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted, visual tokens included.",
           [("", m["prompt_tokens_total"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m["generation_tokens_total"])])
    metric("requests_finished_total", "counter", "Requests finished, by reason (n > 1: once per completion).",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(m["finished_total"].items())])
    return "\n".join(lines) + "\n"
