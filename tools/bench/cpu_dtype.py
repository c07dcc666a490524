"""Is half precision faster than fp32 for decode on this CPU? (dtype="auto" on CPU rests on the answer.)

  OMP_NUM_THREADS=1 python -m tools.bench.cpu_dtype [--layers 8 --hidden 1024 --batch 1 --tokens 32 --rounds 8]

Runs the same greedy decode (text prompts) and the same prefill (one 336 px image: 576 visual tokens)
through the engine in each dtype, rounds interleaved so drifts in machine speed hit every dtype alike,
and prints ms per decode step and per prefill: the minimum (the least disturbed by other load on a
shared machine) and the median. One thread gives the steadiest numbers on a busy machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from engine import LLM, SamplingParams
from tools.bench.decode import decode_step_times, model_dir


def step_times(llm: LLM, batch: int, tokens: int) -> list[float]:
    """ms of every decode step of `batch` greedy text requests run together."""
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    reqs = [f"Tell me a long story about the number {i}, please." for i in range(batch)]
    return [1000 * t for t in decode_step_times(llm, reqs, sp)]


def prefill_ms(llm: LLM) -> float:
    """ms of the prefill step of one request with a 336 px image."""
    prompt = llm.tokenizer.chat_prompt("Describe the picture.", 1)
    llm.add_request({"prompt": prompt, "image": Image.new("RGB", (336, 336), (120, 80, 200))},
                    SamplingParams(max_tokens=1, temperature=0))
    t0 = time.perf_counter()
    llm.step()
    ms = 1000 * (time.perf_counter() - t0)
    while llm.has_unfinished():
        llm.step()
    return ms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in [("--layers", 8), ("--hidden", 1024), ("--intermediate", 2816), ("--heads", 16),
                          ("--kv-heads", 16), ("--batch", 1), ("--tokens", 32), ("--rounds", 8)]:
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = ap.parse_args(argv)
    path, dtypes = model_dir(args), args.dtypes.split(",")
    engines = {dt: LLM(path, dtype=dt, max_num_seqs=args.batch, num_kv_blocks=(args.batch + 40) * 8 * args.layers)
               for dt in dtypes}
    for llm in engines.values():
        step_times(llm, 1, 4)  # warm-up
    samples: dict[str, list[float]] = {dt: [] for dt in dtypes}
    prefills: dict[str, list[float]] = {dt: [] for dt in dtypes}
    for _ in range(args.rounds):
        for dt, llm in engines.items():
            samples[dt] += step_times(llm, args.batch, args.tokens)
            prefills[dt].append(prefill_ms(llm))
    print(f"{args.layers} layers x {args.hidden} hidden, vocab 32000, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} interleaved rounds of {args.tokens} tokens")
    for what, data in (("decode step", samples), ("image prefill", prefills)):
        print(f"{what:14s} {'dtype':10s} {'min ms':>9s} {'median ms':>10s} {'median vs ' + dtypes[0]:>18s}")
        base = statistics.median(data[dtypes[0]])
        for dt, v in data.items():
            print(f"{'':14s} {dt:10s} {min(v):9.1f} {statistics.median(v):10.1f} {statistics.median(v) / base:17.2f}x")


if __name__ == "__main__":
    main()
