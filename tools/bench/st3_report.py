"""KV blocks and time of one request under each policy: what ST3 saves, measured in one run.

  python -m tools.bench.st3_report [--model DIR | --preset cpu-32l] [--answer 96] [--policies full,fastv,pvtp,st3]

For a single image request (~60 text tokens) it reports, per policy: KV blocks held at the end of
prefill and after the answer, their ratio to full, visual tokens kept per layer, prefill time and
batch-1 decode ms/token (medians of repeated runs), and the ratios of those times to full's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from engine import LLM, SamplingParams
from tools.bench.workload import preset_model_dir

QUESTION = ("Look carefully at this picture and describe every object you can see, its colour, its shape, and "
            "its size, and where exactly it is placed in the picture.")


def measure(llm: LLM, answer: int, repeats: int) -> dict:
    img = Image.new("RGB", (336, 336), (90, 140, 200))
    req = {"prompt": llm.tokenizer.chat_prompt(QUESTION, 1), "image": img}
    prefill_s, decode_ms, prefill_blocks, final_blocks, visual = [], [], 0, 0, []
    for _ in range(repeats):
        rid = llm.add_request(req, SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True))
        seq = llm._seqs[rid]
        t0 = time.perf_counter()
        llm.step()
        prefill_s.append(time.perf_counter() - t0)
        prefill_blocks = llm.cache.blocks_held(seq.seat)
        t0 = time.perf_counter()
        steps, last = 0, None
        while llm.has_unfinished():
            out = llm.step()
            steps += 1
            last = out[-1] if out else last
        decode_ms.append(1000 * (time.perf_counter() - t0) / steps)
        final_blocks, visual = last.stats["kv_blocks_final"], last.stats["visual_tokens_per_layer"]
        text_tokens = last.stats["text_prompt_tokens"]
    return {"prefill_blocks": prefill_blocks, "final_blocks": final_blocks, "visual": visual,
            "prefill_s": statistics.median(prefill_s), "decode_ms": statistics.median(decode_ms),
            "text_tokens": text_tokens}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--preset", default="cpu-32l")
    ap.add_argument("--answer", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="full,fastv,pvtp,st3")
    args = ap.parse_args(argv)
    path = args.model or preset_model_dir(args.preset)
    rows = {}
    for policy in args.policies.split(","):
        llm = LLM(path, policy=policy, num_kv_blocks=20000, max_num_seqs=1)
        measure(llm, 4, 1)  # warm-up
        rows[policy] = measure(llm, args.answer, args.repeats)
        del llm
    base = rows.get("full") or next(iter(rows.values()))
    r = next(iter(rows.values()))
    print(f"{len(r['visual'])} layers, {r['visual'][0]} visual + {r['text_tokens']} text prompt tokens, "
          f"{args.answer}-token answer, torch threads {torch.get_num_threads()}")
    print(f"{'policy':8s} {'KV@prefill':>10s} {'ratio':>6s} {'KV@end':>7s} {'ratio':>6s} {'prefill s':>9s} "
          f"{'ratio':>6s} {'decode ms/tok':>13s} {'ratio':>6s}  visual tokens per layer at the end")
    for name, m in rows.items():
        print(f"{name:8s} {m['prefill_blocks']:10d} {m['prefill_blocks'] / base['prefill_blocks']:6.2f} "
              f"{m['final_blocks']:7d} {m['final_blocks'] / base['final_blocks']:6.2f} {m['prefill_s']:9.3f} "
              f"{m['prefill_s'] / base['prefill_s']:6.2f} {m['decode_ms']:13.1f} {m['decode_ms'] / base['decode_ms']:6.2f}"
              f"  {','.join(map(str, m['visual']))}")


if __name__ == "__main__":
    main()
