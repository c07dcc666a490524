"""Decode speed against the weight-bandwidth limit and transformers, measured in one run.

  python -m tools.bench.decode [--layers 16 --hidden 1024 ...] [--batch 1,16] [--policies full,st3] [--hf]

Builds (once, cached) a random-weight LLaVA with 576 visual tokens per image, then reports ms per
decode step for the engine under each policy and batch size, transformers' generate at batch 1,
and the floor set by memory bandwidth: (decoder + lm_head bytes) / read bandwidth, where the
bandwidth is measured here, now, by streaming a large tensor. Ratios within one run are what count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from engine import LLM, SamplingParams
from engine.config import DTYPES
from tools.fixtures.make_tiny_model import make_tiny_model


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes per second for reading a large fp32 tensor (best of a few passes)."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def model_dir(args) -> Path:
    root = Path(os.environ.get("ST3_CACHE_DIR", Path.home() / ".cache" / "st3-engine"))
    out = root / f"decode-{args.layers}l-{args.hidden}h-{args.kv_heads}kv"
    if not (out / "config.json").exists():
        make_tiny_model(out, text_layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                        heads=args.heads, kv_heads=args.kv_heads, text_vocab=32000, image_size=336, patch_size=14,
                        vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=2)
    return out


def image_requests(llm: LLM, batch: int) -> list[dict]:
    img = Image.new("RGB", (336, 336), (120, 80, 200))
    q = "Describe the picture in as much detail as you can, please."
    return [{"prompt": llm.tokenizer.chat_prompt(q, 1), "image": img}] * batch


def engine_step_ms(llm: LLM, batch: int, tokens: int) -> float:
    """Median ms of a decode step with `batch` image requests running together."""
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    return 1000 * statistics.median(decode_step_times(llm, image_requests(llm, batch), sp))


def decode_step_times(llm: LLM, requests: list, params: SamplingParams) -> list[float]:
    """Seconds of every decode step while `requests` run together (prefill steps excluded)."""
    return interleaved_step_times({"": llm}, requests, params)[""]


def interleaved_step_times(engines: dict[str, LLM], requests: list, params: SamplingParams
                           ) -> dict[str, list[float]]:
    """Seconds of every decode step of each engine, the engines taking turns step by step.

    Every engine runs the same requests; once all have prefilled, they decode in alternation, so a
    change in machine speed (other load, clocks) falls on all of them alike, step for step.
    """
    for llm in engines.values():
        for r in requests:
            llm.add_request(r, params)
        while llm.scheduler.waiting:
            llm.step()
    times: dict[str, list[float]] = {name: [] for name in engines}
    while any(llm.has_unfinished() for llm in engines.values()):
        for name, llm in engines.items():
            if llm.has_unfinished():
                t0 = time.perf_counter()
                llm.step()
                times[name].append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def bare_matmul_ms(lm, repeats: int = 10) -> float:
    """Median ms of only the decode step's weight matmuls at batch 1: every layer's (fused) projections
    and the head on a random row, nothing else; how close PyTorch's GEMV itself gets to the floor."""
    hidden = lm.model.embed_tokens.weight.shape[1]
    x = torch.randn(1, hidden, dtype=lm.lm_head.weight.dtype)
    xi = torch.randn(1, lm.model.layers[0].mlp.down_proj.weight.shape[1], dtype=x.dtype)

    def run():  # the engine's models are loaded fused (models.loader), as the decode step runs them
        for layer in lm.model.layers:
            a, m = layer.self_attn, layer.mlp
            F.linear(x, *a.qkv)
            a.o_proj(x)
            F.linear(x, *m.gate_up)
            m.down_proj(xi)
        lm.lm_head(x)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def load_hf(path: Path):
    """transformers' LLaVA on the same weights, fp32, or None where transformers is not installed."""
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:
        return None
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def hf_step_ms(hf, llm: LLM, tokens: int) -> float:
    """transformers' generate at batch 1: (time for N tokens - time for 1) / (N - 1)."""
    p = llm.processor.process({"prompt": llm.tokenizer.chat_prompt("Describe the picture.", 1),
                               "image": Image.new("RGB", (336, 336), (120, 80, 200))})
    ids = torch.tensor([p.prompt_ids])

    def run(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, pixel_values=p.pixel_values, attention_mask=torch.ones_like(ids),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0
    run(2)
    one = min(run(1) for _ in range(2))
    return 1000 * (run(tokens) - one) / (tokens - 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--policies", default="full,st3")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (batch 1, fp32)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    args = ap.parse_args(argv)
    path = model_dir(args)
    batches = list(map(int, args.batch.split(",")))
    engines = {}
    for dtype in args.dtypes.split(","):
        for policy in args.policies.split(","):
            # Room for the largest batch at its longest (~640 prompt entries per layer + the answer), no more:
            # three engines of a 20k-block pool each did not fit a 24 GB machine beside other work.
            blocks = max(batches) * args.layers * -(-(700 + args.tokens) // 16)
            llm = LLM(path, policy=policy, dtype=dtype, max_num_seqs=max(batches), num_kv_blocks=blocks)
            engine_step_ms(llm, 1, 4)  # warm-up
            engines[f"engine {policy} {dtype}"] = llm
    text = next(iter(engines.values())).model.language_model
    weight_bytes = {dt: sum(p.numel() * DTYPES[dt].itemsize for n, p in text.named_parameters()
                            if "embed_tokens" not in n) for dt in args.dtypes.split(",")}
    hf = load_hf(path) if args.hf else None
    weight_bytes.setdefault("float32", sum(p.numel() * 4 for n, p in text.named_parameters() if "embed_tokens" not in n))
    # Engines take turns step by step (interleaved_step_times), and rounds repeat the whole comparison.
    samples: dict[tuple[str, int], list[float]] = {}
    bws = []
    for _ in range(args.rounds):
        bws.append(read_bandwidth())
        for dtype in args.dtypes.split(","):
            lm = next(llm for name, llm in engines.items() if name.endswith(dtype)).model.language_model
            samples.setdefault((f"bare weight matmuls {dtype}", 1), []).append(bare_matmul_ms(lm))
        for b in batches:
            sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
            times = interleaved_step_times(engines, image_requests(next(iter(engines.values())), b), sp)
            for name, t in times.items():  # the mean step over the whole answer: what a token costs
                samples.setdefault((name, b), []).append(1000 * statistics.mean(t))
        if hf is not None:
            samples.setdefault(("transformers generate float32", 1), []).append(
                hf_step_ms(hf, next(iter(engines.values())), args.tokens))
    bw = statistics.median(bws)
    rows = [(name, b, statistics.median(v), 1000 * weight_bytes[name.split()[-1]] / bw) for (name, b), v in samples.items()]
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (median of {len(bws)}); torch threads {torch.get_num_threads()}; "
          f"engines take turns step by step; ms/step = mean step over the {args.tokens}-token answer, "
          f"median of {args.rounds} rounds")
    first = {}  # (batch, dtype) -> ms of the first policy listed: the ratios' reference
    print(f"{'path':34s} {'batch':>5s} {'ms/step':>9s} {'floor ms':>9s} {'x floor':>8s} {'x first policy':>15s}")
    for name, b, ms, floor in rows:
        ref = first.setdefault((b, name.split()[-1]), ms) if name.startswith("engine") else None
        ratio = f"{ms / ref:15.3f}" if ref else ""
        print(f"{name:34s} {b:5d} {ms:9.1f} {floor:9.1f} {ms / floor:8.2f} {ratio}")


if __name__ == "__main__":
    main()
