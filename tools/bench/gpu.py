"""The measurement part of tools/gpu_check.py: every policy at LLaVA-1.5-7B geometry, in one run.

32 decoder layers (hidden 4096, intermediate 11008, 32 heads, vocab 32064), a CLIP-L/336 tower (24
layers x 1024, 576 visual tokens), bf16, random weights drawn on the device (`load_format="dummy"`:
writing and reading a 14 GB checkpoint would eat the time budget). For full, FastV, PVTP and ST3:
  prefill ms at batch 1 and 16 (vision tower included),
  decode ms/step with CUDA graphs at batch 1, 16 and 64 (prefill excluded; 64-token answers),
  serving output tok/s through tools.bench's runner: 64 requests arriving at once, 128-token answers,
  under a KV pool that holds about 16 full-LLaVA requests,
and full's batch-1 graph replay against the HBM floor ((decoder + head bytes) / read bandwidth); for ST3,
where its graph step goes (decode replay with and without score rows, the eviction replay).
`smoke=True` runs the same code at tiny widths (still 576 visual tokens) on any device, to test it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from engine import LLM, SamplingParams
from tools.bench.report import summarize
from tools.bench.runner import run_engine
from tools.bench.workload import BenchRequest, build_workload
from tools.fixtures.make_tiny_model import make_tiny_model

POLICIES = ("full", "fastv", "pvtp", "st3")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_bandwidth(device: str) -> float:
    """Bytes/s for reading a large tensor on the device (best of 10 passes)."""
    x = torch.ones(1 << 28, device=device, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def geometry(work: Path, smoke: bool) -> Path:
    """Config and tokenizer only (weights are drawn on the device)."""
    d = work / ("geometry-smoke" if smoke else "geometry-7b")
    if not (d / "config.json").exists():
        if smoke:
            make_tiny_model(d, text_layers=8, image_size=336, patch_size=14, text_vocab=32000, weights=False)
        else:
            make_tiny_model(d, preset="llava-1.5-7b", dtype="bfloat16", weights=False)
    return d


def prefill_ms(llm: LLM, req: dict, batch: int, device: str) -> float:
    """One prefill step of `batch` requests together (second of two rounds)."""
    for _ in range(2):
        for _ in range(batch):
            llm.add_request(req, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        sync(device)
        t0 = time.perf_counter()
        llm.step()
        sync(device)
        ms = 1000 * (time.perf_counter() - t0)
        assert not llm.scheduler.waiting, "the prefill did not take the whole batch"
        while llm.has_unfinished():
            llm.step()
    return ms


def decode_ms(llm: LLM, req: dict, batch: int, tokens: int, device: str) -> float:
    """Mean decode step for `batch` requests running together (prefill excluded; second of two rounds)."""
    for _ in range(2):
        for _ in range(batch):
            llm.add_request(req, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        while llm.scheduler.waiting:
            llm.step()
        sync(device)
        t0, steps = time.perf_counter(), 0
        while llm.has_unfinished():
            llm.step()
            steps += 1
        sync(device)
        ms = 1000 * (time.perf_counter() - t0) / steps
    return ms


def _device_ms(fn: Callable[[], object], n: int) -> float:
    """Mean device ms of fn (a graph replay), n back to back with no host work between them."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / n


def replay_ms(llm: LLM, context: int, n: int = 50) -> float:
    """Device time of the batch-1 full-policy decode graph at this context (no host work between replays)."""
    need = -(-context // llm.cache.block_size)
    key = (1, min(w for w in llm.runner.widths if w >= need), False)
    return _device_ms(lambda: llm.runner.graphs.replay(*key), n)


def st3_step_parts(llm: LLM, batches: tuple[int, ...], context: int, n: int = 20) -> dict:
    """Where ST3's graph step goes, replays only: the decode graph without and with score rows at about
    `context` entries per layer, and the eviction graph with the longest move lists captured for that batch.

    Replays after the run reuse its last (stale) buffers, which only touch freed blocks.
    """
    r = llm.runner
    if r.graphs is None:
        return {}
    width = min(w for w in r.widths if w >= -(-context // llm.cache.block_size))
    out = {}
    for b in batches:
        rows = min(x for x in r.buckets if x >= b)
        out[f"bs{b} decode replay ms"] = round(_device_ms(lambda: r.graphs.replay(rows, width, False), n), 3)
        out[f"bs{b} decode replay with score rows ms"] = round(_device_ms(lambda: r.graphs.replay(rows, width, True),
                                                                          n), 3)
        keys = [k for k in r.evict_graphs.graphs if k[0] == rows]
        if keys:
            key = max(keys, key=lambda k: (k[2], k[1]))
            out[f"bs{b} eviction replay ms (width {key[1]}, cap {key[2]})"] = round(
                _device_ms(r.evict_graphs.graphs[key].replay, n), 3)
    return out


def measure(work: Path, out: dict, progress: Callable[[], None], device: str = "cuda", smoke: bool = False) -> dict:
    """Fill `out` as it goes (a run cut short still reports what it measured)."""
    d = geometry(work, smoke)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    batches, n_req, out_len, tokens = ((1, 16, 64), 64, 128, 64) if not smoke else ((1, 4), 8, 8, 6)
    engine = dict(device=device, dtype=dtype, load_format="dummy", max_model_len=1024, max_num_batched_tokens=16384)
    out.update({"model": "LLaVA-1.5-7B geometry, random weights" if not smoke else "smoke geometry",
                "dtype": dtype, "visual_tokens": 576})
    weights = None
    for policy in POLICIES:
        t0 = time.perf_counter()
        llm = LLM(d, policy=policy, max_num_seqs=max(batches), **engine)
        res = out[policy] = {"start-up s": round(time.perf_counter() - t0, 1),
                             "graphs": llm.runner.graphs is not None,
                             "triton attention": llm.runner.attention.use_triton}
        evict_graphs = llm.runner.evict_graphs
        req = {"prompt": llm.tokenizer.chat_prompt("Describe the image in detail.", 1),
               "image": _image()}
        for b in (1, 16) if not smoke else (1, 4):
            res[f"prefill bs{b} ms"] = round(prefill_ms(llm, req, b, device), 2)
        for b in batches:
            res[f"decode bs{b} ms/step"] = round(decode_ms(llm, req, b, tokens, device), 3)
        if evict_graphs is not None:
            res["eviction graphs captured"] = len(evict_graphs.graphs)
            res["eviction graph failure"] = evict_graphs.failed
            try:  # a diagnostic: it must not cost the run its other figures
                res["step parts"] = st3_step_parts(llm, batches, 700)
            except Exception as e:  # noqa: BLE001
                res["step parts"] = f"failed: {type(e).__name__}: {e}"
        if policy == "full" and llm.runner.graphs is not None:
            res["graph replay bs1 ms"] = round(replay_ms(llm, 700), 3)
            weights = sum(p.numel() * p.element_size() for n, p in llm.model.language_model.named_parameters()
                          if "embed_tokens" not in n)
        prompt_len = len(llm.processor.process(req).prompt_ids)
        per_request = llm.cache.blocks_for([prompt_len + out_len] * llm.model_config.text.num_hidden_layers)
        del llm
        free_memory(device)
        # Serving: a pool that holds about 16 full-LLaVA requests at their longest.
        llm = LLM(d, policy=policy, max_num_seqs=64, num_kv_blocks=16 * per_request, **engine)
        workload = build_workload(llm.tokenizer, 336, n_req, (out_len, out_len), 32, float("inf"), 0)
        warm = BenchRequest(-1, 0.0, "", req["prompt"], req["image"], 2, 0)
        run = summarize(run_engine(llm, policy, workload, warm, progress=False))
        res["serving"] = {k: _round(run.get(k)) for k in ("output_tok_per_s", "req_per_s", "ttft_p50_s", "tpot_p50_s",
                                                          "decode_step_mean_s", "kv_request_peak_blocks_mean",
                                                          "mean_running", "visual_tokens_kept_mean", "preemptions")}
        res["serving"]["pool blocks"] = 16 * per_request
        del llm
        free_memory(device)
        progress()
    if weights is not None:
        bw = read_bandwidth(device)
        out["hbm read GB/s"] = round(bw / 1e9)
        out["HBM floor bs1 ms (decoder + head bytes / read bandwidth)"] = round(1000 * weights / bw, 3)
    return out


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def _image():
    from PIL import Image
    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(336, 336, 3, generator=g) * 255).to(torch.uint8).numpy())


def free_memory(device: str) -> None:
    """Hand cached device memory back between engines (a no-op on CPUs)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def table(out: dict) -> str:
    """The README's GPU table (markdown) from measure()'s results: every policy, ratios to full."""
    policies = [p for p in POLICIES if p in out]
    if "full" not in policies:
        return ""
    rows = [k for k in out["full"] if k.endswith(" ms") or k.endswith(" ms/step")]

    def cell(policy: str, value, ref) -> str:
        if value is None:
            return "—"
        return f"{value:.2f}" if policy == "full" or not ref else f"{value:.2f} ({value / ref:.2f}×)"
    lines = ["| | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    for key in rows:
        ref = out["full"].get(key)
        lines.append(f"| {key} | " + " | ".join(cell(p, out[p].get(key), ref) for p in policies) + " |")
    key = "output_tok_per_s"
    ref = out["full"].get("serving", {}).get(key)
    lines.append("| serving output tok/s | " + " | ".join(cell(p, out[p].get("serving", {}).get(key), ref)
                                                       for p in policies) + " |")
    floor = out.get("HBM floor bs1 ms (decoder + head bytes / read bandwidth)")
    replay = out["full"].get("graph replay bs1 ms")
    if floor and replay:
        lines.append(f"\nfull's batch-1 graph replay {replay:.2f} ms = {replay / floor:.2f}× "
                     f"the HBM floor ({floor:.2f} ms)")
    return "\n".join(lines)
