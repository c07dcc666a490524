"""AsyncLLM: one background thread owns an LLM and steps it; any thread or event loop submits to it.

    engine = AsyncLLM(LLM(model_dir))
    async for out in engine.generate({"prompt": ..., "image": ...}, SamplingParams(max_tokens=32)):
        print(out.delta, end="")

Every touch of the LLM happens on the engine thread: submissions, aborts and stats requests are
commands it runs between steps, and outputs travel back through loop.call_soon_threadsafe into a
per-request asyncio queue. A consumer that stops iterating (break + aclose, cancellation, a client
that disconnects) aborts its request, so its KV blocks return to the pool at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from .errors import EngineError, QueueFullError, RequestError
from .llm import LLM
from .outputs import RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("st3")


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tokens: int = 0  # generated so far, summed over the n completions


@dataclass
class Counters:
    """Totals since start, kept on the engine thread (read them through AsyncLLM.metrics())."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)   # finish_reason -> completions (n per request)
    visual_kept_sum: list[int] = field(default_factory=list)  # per layer, over finished image requests
    visual_requests: int = 0


class AsyncLLM:
    """An LLM driven by its own thread, with an asyncio streaming API that any thread may call."""

    def __init__(self, llm: LLM, max_waiting: int | None = None):
        self.llm = llm
        self.max_waiting = max_waiting
        self._requests: dict[str, _Request] = {}
        self._commands: list[tuple[Callable, concurrent.futures.Future]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._counters = Counters()
        self._thread = threading.Thread(target=self._loop, name="st3-engine", daemon=True)
        self._thread.start()

    # ---- the public API (any thread) ----------------------------------------------------------
    async def generate(self, request: dict | str, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive; the last one has finish_reason set.

        Bad requests raise RequestError at the first iteration; a full queue raises QueueFullError.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = f"async-{next(self._ids)}" if request_id is None else str(request_id)
        finished = False
        try:
            await asyncio.wrap_future(self._submit(lambda: self._add(request, params, rid, loop, queue)))
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._abort_soon(rid, queue)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (runs on the engine thread; returns at once)."""
        self._abort_soon(str(request_id))

    def _abort_soon(self, rid: str, owner: asyncio.Queue | None = None) -> None:
        try:
            self._submit(lambda: self._abort(rid, owner))
        except EngineError:  # shut down: nothing is running any more
            pass

    def kv_stats(self) -> dict:
        """The LLM's kv_stats(), taken on the engine thread after every command submitted before it."""
        return self._submit(self.llm.kv_stats).result()

    def metrics(self) -> dict:
        """A consistent snapshot: queue lengths, KV occupancy and the running totals."""
        return self._submit(self._metrics).result()

    async def metrics_async(self) -> dict:
        """metrics() without blocking the event loop."""
        return await asyncio.wrap_future(self._submit(self._metrics))

    def shutdown(self) -> None:
        """Abort what is in flight (consumers get finish_reason "abort"), stop the thread and wait for it."""
        with self._wake:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- commands (run on the engine thread) --------------------------------------------------
    def _submit(self, fn: Callable) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping:
                raise EngineError("AsyncLLM has been shut down")
            self._commands.append((fn, fut))
            self._wake.notify()
        return fut

    def _add(self, request, params, rid: str, loop, queue) -> None:
        if rid in self._requests:
            raise RequestError(f"request id {rid!r} is already in use")
        if self.max_waiting is not None and len(self.llm.scheduler.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self.llm.add_request(request, params, rid)
        self._requests[rid] = _Request(loop, queue)
        self._counters.prompt_tokens += self.llm._seqs[rid].prompt_len

    def _abort(self, rid: str, owner: asyncio.Queue | None = None) -> None:
        req = self._requests.get(rid)
        if req is not None and (owner is None or req.queue is owner):  # a consumer aborts only its own request
            if owner is None:  # someone else aborted it: its consumer still waits for a last output
                self._end(rid, "abort")
            else:
                del self._requests[rid]
                reasons = self._reasons(rid, "abort")
                self.llm.abort(rid)
                self._count_finish(reasons)

    def _metrics(self) -> dict:
        c, sched = self._counters, self.llm.scheduler
        kept = [s / c.visual_requests for s in c.visual_kept_sum] if c.visual_requests else []
        return {"running": len(sched.running), "waiting": len(sched.waiting), "kv": self.llm.kv_stats(),
                "prompt_tokens_total": c.prompt_tokens, "generation_tokens_total": c.generation_tokens,
                "preemptions_total": c.preemptions, "finished_total": dict(c.finished),
                "visual_tokens_kept_mean": kept, "policy": self.llm.policy.name}

    # ---- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self._stopping and not self.llm.has_unfinished():
                    self._wake.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for fn, fut in commands:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            if stopping:
                self._stop_all()
                return
            if self.llm.has_unfinished():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.llm.step()
        except Exception as e:  # noqa: BLE001 - LLM.step isolates forward failures; this is the last guard
            log.exception("engine step failed outside the forward; failing every request in flight")
            for rid in list(self._requests):
                self._end(rid, "error", f"internal error: {type(e).__name__}: {e}")
            return
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            tokens = sum(len(c.token_ids) for c in out.outputs)
            self._counters.generation_tokens += max(tokens - req.tokens, 0)
            req.tokens = tokens
            if out.finished:
                del self._requests[out.request_id]
                self._count_finish([c.finish_reason for c in out.outputs], out.stats)
            self._deliver(req, out)

    def _reasons(self, rid: str, live: str) -> list[str]:
        """Each of a request's n completions' finish reasons, with `live` for those not finished (or not begun)."""
        seq = self.llm._seqs.get(rid)
        if seq is None:
            return [live]
        reasons = [m.finish_reason or live for m in self.llm._families.members(rid, self.llm._seqs)]
        return reasons + [live] * (seq.params.n - len(reasons))

    def _count_finish(self, reasons: list[str], stats: dict | None = None) -> None:
        # Per completion, as vLLM's metrics count each of the n as a child request.
        c = self._counters
        for reason in reasons:
            c.finished[reason] = c.finished.get(reason, 0) + 1
        if stats:
            c.preemptions += stats.get("preemptions", 0)
            kept = stats.get("visual_tokens_per_layer") or []
            if stats.get("visual_tokens") and kept:
                if len(c.visual_kept_sum) < len(kept):
                    c.visual_kept_sum += [0] * (len(kept) - len(c.visual_kept_sum))
                c.visual_kept_sum = [a + b for a, b in zip(c.visual_kept_sum, kept)]
                c.visual_requests += 1

    def _deliver(self, req: _Request, out: RequestOutput) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this request
            if not out.finished and self._requests.pop(out.request_id, None) is not None:
                reasons = self._reasons(out.request_id, "abort")
                self.llm.abort(out.request_id)
                self._count_finish(reasons)

    def _end(self, rid: str, reason: str, error: str | None = None) -> None:
        """Abort a request in the LLM and hand its consumer a final output with `reason`.

        With n > 1, completions that had finished keep their own reason; the others get `reason`.
        """
        req, seq = self._requests.pop(rid), self.llm._seqs.get(rid)
        if seq is None:
            self.llm.abort(rid)
            self._count_finish([reason])
            self._deliver(req, RequestOutput(rid, "", [], reason, error=error))
            return
        fam = self.llm._families.of(rid)  # taken before the abort forgets it
        members = fam.members if fam is not None else [seq]
        live = [m for m in members if not m.is_finished] or [seq]
        never_begun = seq.params.n - len(members)  # siblings not yet forked
        self.llm.abort(rid)
        for m in live:
            m.finish_reason = reason
        out = self.llm._families.output(self.llm, seq, "", None, fam) if fam is not None else \
            self.llm._single_output(seq)
        out.error = error
        self._count_finish([m.finish_reason for m in members] + [reason] * never_begun, out.stats)
        self._deliver(req, out)

    def _stop_all(self) -> None:
        for rid in list(self._requests):
            self._end(rid, "abort")
        with self._wake:  # commands that raced with shutdown
            late, self._commands = self._commands, []
        for _, fut in late:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineError("AsyncLLM has been shut down"))
