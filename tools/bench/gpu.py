"""The decode-speed part of tools/gpu_check.py: engine (eager, CUDA graphs; full, ST3), transformers, HBM floor.

Ms per decode step at LLaVA-1.5-7B width (random weights, fewer decoder layers), prefill excluded,
beside transformers' `generate`, a bare transformers forward loop, and the weight-bandwidth floor
(decoder + lm_head bytes / HBM read bandwidth measured in the same run).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from engine import LLM, SamplingParams
from tools.fixtures.make_tiny_model import make_tiny_model


def hbm_read_bw() -> float:
    x = torch.ones(1 << 30, device="cuda", dtype=torch.float32)
    x.sum()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        x.sum()
    torch.cuda.synchronize()
    return 10 * x.numel() * 4 / (time.perf_counter() - t0)


def replay_ms(llm: LLM, n: int = 50) -> float:
    """Device time of one batch-1 decode graph at the bench's width (no host work between replays)."""
    need = -(-700 // llm.cache.block_size)  # the bench's contexts: ~650 prompt + 64 generated tokens
    key = (1, min(w for w in llm.runner.widths if w >= need), bool(llm.runner.decode_score_layers))
    llm.runner.graphs.replay(*key)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        llm.runner.graphs.replay(*key)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / n


def engine_ms_per_step(llm: LLM, req: dict, batch: int, tokens: int = 64) -> float:
    """Decode ms per step for `batch` requests running together (prefill excluded; second of two rounds)."""
    for _ in range(2):  # the first round warms up
        for _ in range(batch):
            llm.add_request(req, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        while llm.scheduler.waiting:  # prefill every request before the clock starts
            llm.step()
        torch.cuda.synchronize()
        t0, steps = time.perf_counter(), 0
        while llm.has_unfinished():
            llm.step()
            steps += 1
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t0) / steps
    return ms


def decode_speed(work: Path, layers: int, img: Image.Image, out: dict, progress: Callable[[], None]) -> dict:
    """Fill `out` with decode ms/step (engine eager and graphs, full and ST3), transformers and the floor."""
    from transformers import LlavaForConditionalGeneration
    d = work / "wide"
    if not (d / "config.json").exists():
        make_tiny_model(d, preset="llava-1.5-7b", text_layers=layers, vision_layers=2, dtype="bfloat16")
    out.update({"layers": layers, "dtype": "bfloat16", "visual_tokens": 576, "tokens_per_request": 64})
    for policy in ("full", "st3"):
        for label, eager in (("eager", True), ("graphs", False)):
            t0 = time.perf_counter()
            llm = LLM(d, device="cuda", dtype="bfloat16", policy=policy, num_kv_blocks=8000, max_num_seqs=16,
                      enforce_eager=eager)
            out[f"start-up s ({policy}, {label})"] = round(time.perf_counter() - t0, 1)
            out["engine uses triton"] = llm.runner.use_triton
            req = {"prompt": llm.tokenizer.chat_prompt("Describe the image.", 1), "image": img}
            for batch in (1, 16):
                out[f"engine {policy} {label} bs{batch} ms/step"] = round(engine_ms_per_step(llm, req, batch), 3)
            if not eager:
                out["graphs captured"] = len(llm.runner.graphs.graphs)
                out[f"graph replay only {policy} bs1 ms (device time of the step)"] = round(replay_ms(llm), 3)
            weight_bytes = sum(p.numel() * p.element_size() for n, p in llm.model.language_model.named_parameters()
                               if "embed_tokens" not in n)
            del llm
            torch.cuda.empty_cache()
            progress()
    hf = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(d, device="cuda", dtype="bfloat16", num_kv_blocks=200, max_num_seqs=1, enforce_eager=True)
    p = llm.processor.process({"prompt": llm.tokenizer.chat_prompt("Describe the image.", 1), "image": img})
    ids = torch.tensor([p.prompt_ids], device="cuda")
    pix = p.pixel_values.cuda().bfloat16()

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=hf.config.pad_token_id)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    gen(4)
    out["transformers generate bs1 ms/token"] = round(1000 * (gen(65) - gen(1)) / 64, 3)

    @torch.inference_mode()
    def forward_loop(n):  # transformers without generate()'s bookkeeping: a bare greedy loop
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = hf(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids), use_cache=True)
        past, tok, mask = o.past_key_values, o.logits[:, -1:].argmax(-1), torch.ones_like(ids)
        for _ in range(n):
            mask = torch.cat([mask, mask[:, :1]], 1)
            o = hf(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True)
            past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    forward_loop(4)
    out["transformers forward loop bs1 ms/token"] = round(1000 * (forward_loop(65) - forward_loop(1)) / 64, 3)
    del hf, llm
    torch.cuda.empty_cache()
    bw = hbm_read_bw()
    out["hbm_read_GBps"] = round(bw / 1e9)
    out["floor bs1 ms/token (decoder+head bytes / read bandwidth)"] = round(1000 * weight_bytes / bw, 3)
    return out
