"""AsyncLLM and failure isolation on a tiny random model: concurrent streams from one event loop and
from OS threads equal solo runs, a consumer that stops frees its blocks, a fault injected into the
model runner fails only the requests of that step, and LLM refuses a second thread with a clear error.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import aclosing
from types import SimpleNamespace

import pytest
from PIL import Image

from engine import LLM, AsyncLLM, ConcurrentUseError, RequestError, SamplingParams
from tools.fixtures.make_tiny_model import make_tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("async")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=4, image_size=32)
    img = tmp / "a.png"
    Image.effect_noise((40, 36), 70).convert("RGB").save(img)
    llm = LLM(model, num_kv_blocks=1024)
    ask = llm.tokenizer.chat_prompt
    reqs = [{"prompt": ask("Describe the image.", 1), "image": str(img)}, {"prompt": ask("Tell a story.", 0)},
            {"prompt": "Once upon a time"}, {"prompt": ask("What colour is it?", 1), "image": str(img)}]
    longest = 24
    solo = [llm.generate(r, SamplingParams(max_tokens=longest, **GREEDY))[0].token_ids for r in reqs]
    return SimpleNamespace(model=model, reqs=reqs, solo=solo, longest=longest)


def assert_all_free(stats: dict) -> None:
    assert stats["free_blocks"] == stats["total_blocks"], stats


async def collect(engine: AsyncLLM, req, n: int) -> list[int]:
    outs = [o async for o in engine.generate(req, SamplingParams(max_tokens=n, **GREEDY))]
    assert outs[-1].finish_reason == "length" and all(not o.finished for o in outs[:-1])
    assert [len(o.token_ids) for o in outs] == list(range(1, n + 1))  # one output per token, in order
    return outs[-1].token_ids


def test_concurrent_streams_from_a_loop_and_threads_match_solo(env):
    engine = AsyncLLM(LLM(env.model, num_kv_blocks=1024))
    jobs = [(i % 4, 4 + (5 * i) % (env.longest - 3)) for i in range(36)]  # (request, max_tokens)
    results: dict[int, list[int]] = {}

    def in_thread(k):
        r, n = jobs[k]
        results[k] = asyncio.run(collect(engine, env.reqs[r], n))  # each thread has its own event loop

    async def main():
        threads = [threading.Thread(target=in_thread, args=(k,)) for k in range(32, 36)]
        for t in threads:
            t.start()
        got = await asyncio.gather(*(collect(engine, env.reqs[r], n) for r, n in jobs[:32]))
        results.update(enumerate(got))
        for t in threads:
            await asyncio.to_thread(t.join)

    try:
        asyncio.run(main())
        for k, (r, n) in enumerate(jobs):
            assert results[k] == env.solo[r][:n], k
        m = engine.metrics()
        assert m["finished_total"] == {"length": 36} and m["running"] == m["waiting"] == 0
        assert m["generation_tokens_total"] == sum(n for _, n in jobs)
        assert_all_free(engine.kv_stats())
    finally:
        engine.shutdown()


def test_consumer_that_stops_frees_its_blocks(env):
    engine = AsyncLLM(LLM(env.model, num_kv_blocks=1024))

    async def stop_early():
        async with aclosing(engine.generate(env.reqs[0], SamplingParams(max_tokens=500, **GREEDY))) as stream:
            async for out in stream:
                if len(out.token_ids) == 3:
                    assert engine.kv_stats()["used_blocks"] > 0
                    break

    async def cancel_task():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(env.reqs[1], SamplingParams(max_tokens=500, **GREEDY)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(stop_early())
        assert_all_free(engine.kv_stats())  # the abort ran on the engine thread before this snapshot
        asyncio.run(cancel_task())
        assert_all_free(engine.kv_stats())
        assert engine.metrics()["finished_total"] == {"abort": 2}
    finally:
        engine.shutdown()


def test_shutdown_ends_streams_and_refuses_new_work(env):
    engine = AsyncLLM(LLM(env.model, num_kv_blocks=1024))

    async def main():
        outs = []
        async for out in engine.generate(env.reqs[2], SamplingParams(max_tokens=500, **GREEDY)):
            outs.append(out)
            if len(outs) == 2:
                await asyncio.to_thread(engine.shutdown)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) >= 2
    with pytest.raises(Exception, match="shut down"):
        engine.kv_stats()


def test_n3_counts_every_completion_and_an_outside_abort_ends_all_three(env):
    engine = AsyncLLM(LLM(env.model, num_kv_blocks=1024))
    params = SamplingParams(n=3, max_tokens=500, temperature=1.0, seed=3, ignore_eos=True)

    async def main():
        outs = []
        async for out in engine.generate(env.reqs[1], params, request_id="fam"):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("fam")  # as another task would: the consumer still gets a last output
        return outs

    try:
        last = asyncio.run(main())[-1]
        assert [c.index for c in last.outputs] == [0, 1, 2] and last.finished
        assert all(c.finish_reason == "abort" and len(c.token_ids) >= 2 for c in last.outputs)
        assert_all_free(engine.kv_stats())
        m = engine.metrics()
        assert m["finished_total"] == {"abort": 3} and m["running"] == 0
        assert m["generation_tokens_total"] == sum(len(c.token_ids) for c in last.outputs)
    finally:
        engine.shutdown()


def test_bad_request_raises_at_first_iteration(env):
    with AsyncLLM(LLM(env.model, num_kv_blocks=1024)) as engine:
        async def main():
            async for _ in engine.generate({"prompt": "caf\udce9"}):
                pass
        with pytest.raises(RequestError, match="'prompt' is not valid Unicode"):
            asyncio.run(main())
        assert_all_free(engine.kv_stats())


def _fail_once(monkeypatch, llm: LLM, name: str):
    real = getattr(llm.runner, name)
    calls = []

    def flaky(seqs, *args):
        calls.append(len(seqs))
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(seqs, *args)
    monkeypatch.setattr(llm.runner, name, flaky)
    return calls


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_fault_in_a_step_fails_only_that_step(env, monkeypatch, caplog, where):
    llm = LLM(env.model, num_kv_blocks=1024)
    calls = _fail_once(monkeypatch, llm, where)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (6, 9, 7)]
    with caplog.at_level(logging.ERROR, logger="st3"):
        outs = llm.generate(env.reqs[:3], params)
    assert calls[0] == 3  # the three requests shared the failing step
    assert [o.finish_reason for o in outs] == ["error"] * 3
    assert all("injected fault" in o.error for o in outs)
    assert any("injected fault" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert_all_free(llm.kv_stats())
    again = llm.generate(env.reqs, [SamplingParams(max_tokens=8, **GREEDY)] * 4)  # the engine still serves
    assert [o.token_ids for o in again] == [s[:8] for s in env.solo]
    assert_all_free(llm.kv_stats())


def test_fault_under_async_llm(env, monkeypatch):
    llm = LLM(env.model, num_kv_blocks=1024)
    _fail_once(monkeypatch, llm, "decode")
    engine = AsyncLLM(llm)

    async def run_all():
        async def last(req, n):
            outs = [o async for o in engine.generate(req, SamplingParams(max_tokens=n, **GREEDY))]
            return outs[-1]
        return await asyncio.gather(*(last(r, 10) for r in env.reqs[:2]))

    try:
        failed = asyncio.run(run_all())
        assert [o.finish_reason for o in failed] == ["error", "error"] and "injected fault" in failed[0].error
        assert_all_free(engine.kv_stats())
        served = asyncio.run(run_all())
        assert [o.token_ids for o in served] == [s[:10] for s in env.solo[:2]]
        assert engine.metrics()["finished_total"] == {"error": 2, "length": 2}
    finally:
        engine.shutdown()


def test_llm_refuses_a_second_thread(env, monkeypatch):
    llm = LLM(env.model, num_kv_blocks=1024)
    inside, release = threading.Event(), threading.Event()
    real = llm.runner.prefill

    def slow_prefill(seqs, *args):
        inside.set()
        release.wait(60)
        return real(seqs, *args)
    monkeypatch.setattr(llm.runner, "prefill", slow_prefill)
    first = threading.Thread(target=llm.generate, args=(env.reqs[2], SamplingParams(max_tokens=3, **GREEDY)))
    first.start()
    try:
        assert inside.wait(60)
        for call in (lambda: llm.add_request(env.reqs[1]), llm.step, lambda: llm.abort("0"),
                     lambda: llm.generate(env.reqs[1]), lambda: next(llm.stream(env.reqs[1]))):
            with pytest.raises(ConcurrentUseError, match="AsyncLLM"):
                call()
    finally:
        release.set()
        first.join()
    assert_all_free(llm.kv_stats())
    assert llm.generate(env.reqs[2], SamplingParams(max_tokens=3, **GREEDY))[0].token_ids == env.solo[2][:3]
