"""Benchmark driver for a running OpenAI-compatible server (python -m engine.serve): the same workload,
sent as streaming chat requests over HTTP, timed from the client (needs httpx, in the serve extra).

Each request is one user turn, image first, so engine.serve renders the very prompt the in-process
run uses (Tokenizer.chat_prompt). TTFT is the first content chunk after the scheduled arrival, ITL the
gaps between content chunks, TPOT (e2e - ttft) / (tokens - 1) with the token count from `usage`.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

from tools.bench.runner import BenchError, Progress, ReqRecord, RunRecord
from tools.bench.workload import BenchRequest


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes the very pixels the in-process run sees
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(model: str, r: BenchRequest, n: int) -> dict:
    return {"model": model, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(r.image)}},
                                                      {"type": "text", "text": r.question}]}]}


async def _one(client, url: str, model: str, r: BenchRequest, n: int, start: float) -> tuple[ReqRecord, str]:
    chunk_times, usage, st3, finish = [], None, {}, None
    async with client.stream("POST", url + "/v1/chat/completions", json=_body(model, r, n)) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise BenchError(f"server answered HTTP {resp.status_code}: {text[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BenchError(f"server error mid-stream: {chunk['error'].get('message')}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunk_times.append(now)
                finish = choice.get("finish_reason") or finish
            st3 = chunk.get("st3") or st3
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens", len(chunk_times))
    ttft = chunk_times[0] - start if chunk_times else None
    e2e = end - start
    tpot = (e2e - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    prompt = (usage or {}).get("prompt_tokens", 0)
    visual = st3.get("visual_tokens") or 0
    return ReqRecord(r.index, [], tokens, prompt, prompt - visual, visual, ttft, tpot, itl, e2e,
                     st3.get("kv_peak_blocks"), list(st3.get("visual_tokens_per_layer") or []),
                     st3.get("preemptions") or 0, finish), st3.get("policy") or "?"


def server_model(url: str, timeout: float = 10.0) -> str:
    """The model name a server serves (GET /v1/models); BenchError when it cannot be reached."""
    import httpx
    try:
        data = httpx.get(url + "/v1/models", timeout=timeout).json()["data"]
        return data[0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise BenchError(f"no OpenAI-compatible server at {url} ({type(e).__name__}: {e})") from None


def run_openai(url: str, workload: list[BenchRequest], warmup: BenchRequest, progress: bool = True,
               timeout: float = 3600.0) -> RunRecord:
    """Replay the workload's arrivals against the server, all requests concurrently as they arrive."""
    import httpx
    url = url.rstrip("/")
    model = server_model(url)

    async def main() -> tuple[list[ReqRecord], str, float]:
        limits = httpx.Limits(max_connections=len(workload) + 1, max_keepalive_connections=len(workload) + 1)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            _, policy = await _one(client, url, model, warmup, 2, time.perf_counter())
            bar = Progress("openai", len(workload), progress)
            done: list[ReqRecord] = []
            t0 = time.perf_counter()

            async def timed(r: BenchRequest) -> ReqRecord:
                await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
                rec, _ = await _one(client, url, model, r, r.output_len, t0 + r.arrival_s)
                done.append(rec)
                bar.update(len(done), sum(d.generated_tokens for d in done))
                return rec

            recs = await asyncio.gather(*(timed(r) for r in workload))
            duration = time.perf_counter() - t0
            bar.update(len(done), sum(d.generated_tokens for d in done), "done", force=True)
            bar.close()
            return list(recs), policy, duration

    recs, policy, duration = asyncio.run(main())
    layers = max((len(rec.visual_tokens_per_layer) for rec in recs), default=0)
    return RunRecord(f"http-{policy}", duration, sorted(recs, key=lambda rec: rec.index), [], num_layers=layers,
                     note=f"over HTTP ({url}, model {model!r})")
