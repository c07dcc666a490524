"""Serving benchmark: the same LLaVA workload through every policy (and optionally transformers).

    python -m tools.bench --preset cpu-32l --num-requests 16 --output-len 64 --policies full,st3 \\
        --num-kv-blocks 4000 --json-out out.json --plot out.png

Presets write a model with RANDOM weights (real shapes, meaningless outputs) into a cache directory
($ST3_CACHE_DIR or ~/.cache/st3-engine, as bench-<preset>) on first use and reuse it afterwards:
  tiny             8 decoder layers, 64 visual tokens; seconds on a CPU (tests, smoke runs)
  cpu-32l          32 decoder layers (hidden 256), 576 visual tokens (336 px / 14 px patches, 2-layer
                   narrow vision tower); a run takes minutes on 2 CPU cores
  llava-1.5-7b-4l  LLaVA-1.5-7B widths with 4 decoder and 4 vision layers (fp16 on disk); for GPUs
With --backend openai --url http://127.0.0.1:PORT the same workload goes to a running
`python -m engine.serve` (started on the same --model/--preset) as streaming chat requests, timed
from the client; the server's own --policy applies and --policies is ignored.
Random weights exercise exactly the compute and memory a trained model would, but say nothing about
answer quality. Every request is greedy with ignore_eos, so every policy generates the same number
of tokens. Arrivals, prompts, images and output lengths are drawn once from --seed and replayed
identically for each policy, all in one process on the same weights. Policies run one after
another, so anything else loading the machine in between skews the ratios: benchmark on an idle
machine (the report warns when the load average says otherwise), or rerun with the order reversed.

Policy knobs are the engine's flags (engine/policy_flags.py): each applies to every listed policy that
has it (`--ratio 0.5` sets FastV's and ST3's alike) and must apply to at least one of them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
from pathlib import Path

from engine.policy_flags import add_policy_arguments, policy_params_from_args
from tools.bench.report import format_table, plot, summarize
from tools.bench.runner import hf_available, run_engine, run_hf
from tools.bench.workload import (BENCH_PRESETS, BenchRequest, build_question, build_workload, parse_len_range,
                                  preset_model_dir, synthetic_image)

ENGINE_POLICIES = ("full", "fastv", "pvtp", "st3")
ALL_POLICIES = ENGINE_POLICIES + ("hf",)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--json PATH` must not pass silently for --json-out (engine.generate's --json is a flag).
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model").add_mutually_exclusive_group()
    m.add_argument("--model", metavar="DIR", help="a LLaVA-1.5 checkpoint directory")
    m.add_argument("--preset", choices=sorted(BENCH_PRESETS),
                   help="a random-weight bench model, written to the cache on first use (default: tiny)")
    ap.add_argument("--cache-dir", metavar="DIR", help="where presets live (default $ST3_CACHE_DIR or "
                                                       "~/.cache/st3-engine)")
    b = ap.add_argument_group("backend")
    b.add_argument("--backend", choices=["engine", "openai"], default="engine",
                   help="engine: in-process (default); openai: a running server at --url (needs httpx)")
    b.add_argument("--url", help="the server for --backend openai, e.g. http://127.0.0.1:8000")
    w = ap.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=16)
    w.add_argument("--output-len", default="64", metavar="N|A:B",
                   help="tokens generated per request: N, or uniform in [A, B] (default 64)")
    w.add_argument("--prompt-len", type=int, default=32, metavar="N",
                   help="text tokens around the image: the question is padded with words to about N (default 32)")
    w.add_argument("--image-dir", metavar="DIR", help="use these images (cycled) instead of seeded synthetic ones")
    w.add_argument("--request-rate", type=float, default=float("inf"), metavar="R",
                   help="Poisson arrivals at R requests/s; inf (default) = all at once")
    w.add_argument("--seed", type=int, default=0, help="workload seed (the preset weights have their own)")
    p = ap.add_argument_group("policies")
    p.add_argument("--policies", default="full,fastv,pvtp,st3",
                   help=f"comma list from {','.join(ALL_POLICIES)}; hf = transformers generate, fp32, one "
                        "request at a time (skipped when transformers is not importable)")
    add_policy_arguments(ap)
    e = ap.add_argument_group("engine")
    e.add_argument("--num-kv-blocks", type=int, help="KV pool size in blocks (a block = block-size tokens "
                                                     "of one layer); default: the engine's sizing")
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--dtype", default="float32", help="engine dtype (hf always runs fp32)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    o = ap.add_argument_group("output")
    o.add_argument("--json-out", metavar="PATH", help="write config, metrics and timelines as JSON")
    o.add_argument("--plot", metavar="PATH.png", help="KV blocks in use and running sequences over time "
                                                      "(needs matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    return ap


def check_output_path(path: str | None, option: str) -> None:
    """Before the run: a path the report can be written to (ValueError otherwise)."""
    if path is None:
        return
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{option} {path!r} is a directory; give a file name")
    if not parent.is_dir():
        raise ValueError(f"{option} {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path!r} is not writable")


def resolve(args, log) -> tuple[Path, list[str], tuple[int, int]]:
    """Check the arguments (ValueError on anything unusable) and find or write the model."""
    policies = [p.strip().lower() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in ALL_POLICIES]
    if bad or not policies:
        raise ValueError(f"unknown policy {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"choose from {','.join(ALL_POLICIES)}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"--policies lists a policy twice: {args.policies!r}")
    if args.backend == "openai" and not args.url:
        raise ValueError("--backend openai needs --url (e.g. http://127.0.0.1:8000)")
    if args.url and args.backend != "openai":
        raise ValueError("--url only applies with --backend openai")
    args.policy_params = policy_params_from_args(args, policies)
    check_output_path(args.json_out, "--json-out")
    check_output_path(args.plot, "--plot")
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {args.request_rate}")
    out_len = parse_len_range(args.output_len, "--output-len")
    if args.model:
        model = Path(args.model).expanduser()
        if not (model / "config.json").is_file():
            raise ValueError(f"--model {str(model)!r} is not a model directory (no config.json)")
    else:
        try:
            model = preset_model_dir(args.preset or "tiny", Path(args.cache_dir) if args.cache_dir else None,
                                     log=log)
        except ModuleNotFoundError as e:  # safetensors' writer needs numpy, which the engine itself does not
            raise ValueError(f"writing the random-weight preset needs {e.name} (pip install -e '.[bench]')") from None
    from models.config import load_config
    from scheduler.policy import make_policy
    layers = load_config(model).text.num_hidden_layers
    for name in policies:
        if name != "hf":
            make_policy(name, **args.policy_params[name]).validate(layers)
    return model, policies, out_len


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def engine_version() -> str | None:
    """`git describe`-style id of the engine source being measured (None outside a git checkout)."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    threads = None
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch
            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
        return _run(args, log)
    except ValueError as e:  # bad arguments, engine RequestError/ValueError, BenchError
        log(f"error: {e}")
        return 2
    finally:
        if threads is not None:  # main() may run inside a bigger process (tests)
            import torch
            torch.set_num_threads(threads)


def _run(args, log) -> int:
    model, policies, out_len = resolve(args, log)
    import torch

    from models.config import load_config
    from models.tokenizer import Tokenizer
    cfg = load_config(model)
    tok = Tokenizer.from_dir(model)
    workload = build_workload(tok, cfg.vision.image_size, args.num_requests, out_len, args.prompt_len,
                              args.request_rate, args.seed, args.image_dir)
    wrng = random.Random(args.seed + 7919)
    _, wprompt, _ = build_question(tok, wrng, None)
    warmup = BenchRequest(-1, 0.0, "", wprompt, synthetic_image(wrng, cfg.vision.image_size), 2, 0)
    config = {
        "model": str(model), "preset": None if args.model else (args.preset or "tiny"),
        "random_weights": not args.model, "policies": policies,
        "policy_params": {p: args.policy_params[p] for p in policies if p != "hf"},
        "num_requests": args.num_requests, "output_len": list(out_len), "prompt_len": args.prompt_len,
        "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate, "seed": args.seed,
        "image_dir": args.image_dir, "backend": args.backend, "url": args.url, "num_kv_blocks": args.num_kv_blocks,
        "max_num_seqs": args.max_num_seqs,
        "block_size": args.block_size, "dtype": args.dtype, "device": args.device,
        "decoder_layers": cfg.text.num_hidden_layers, "hidden_size": cfg.text.hidden_size,
        "visual_tokens_per_image": cfg.image_seq_length,
        "text_prompt_tokens_mean": sum(r.text_tokens for r in workload) / len(workload),
        "engine_version": engine_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"model {model} ({'random weights, ' if not args.model else ''}{cfg.text.num_hidden_layers} layers, "
          f"hidden {cfg.text.hidden_size}, {cfg.image_seq_length} visual tokens/image); {args.num_requests} requests, "
          f"output {args.output_len}, ~{config['text_prompt_tokens_mean']:.0f} text tokens, "
          f"rate {config['request_rate']} req/s, device {args.device}, {args.dtype}, torch threads "
          f"{config['torch_threads']}, engine {config['engine_version']}", flush=True)

    from engine import LLM
    records, loads = [], {}
    if args.backend == "openai":
        from tools.bench.openai_runner import run_openai
        load0 = load_average()
        records.append(run_openai(args.url, workload, warmup, not args.no_progress))
        loads[records[-1].policy] = (load0, load_average())
        policies = []
    for name in policies:
        load0 = load_average()
        if name == "hf":
            why = hf_available()
            if why is None:
                try:
                    records.append(run_hf(model, workload, warmup, args.device, not args.no_progress))
                    loads["hf"] = (load0, load_average())
                except Exception as e:  # e.g. a layout transformers cannot read
                    why = f"transformers could not run this model ({type(e).__name__}: {e})"
            if why is not None:
                log(f"skipping hf: {why}")
            continue
        llm = LLM(model, device=args.device, dtype=args.dtype, policy=name, policy_params=args.policy_params[name],
                  num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs)
        try:
            records.append(run_engine(llm, name, workload, warmup, not args.no_progress))
            loads[name] = (load0, load_average())
        finally:
            del llm
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    ref = next((r for r in records if r.policy == "full"), None)
    runs = [summarize(r, ref) for r in records]
    cpus = os.cpu_count() or 1
    for run in runs:
        start, end = loads.get(run["policy"], (None, None))
        run["load_avg_1m_start"], run["load_avg_1m_end"] = start, end
    busy = [f"{r['policy']} ({max(r['load_avg_1m_start'], r['load_avg_1m_end']):.1f})" for r in runs
            if r["load_avg_1m_start"] is not None and max(r["load_avg_1m_start"], r["load_avg_1m_end"]) > cpus + 1]
    print()
    print(format_table(runs), flush=True)
    if busy and args.device == "cpu":
        print(f"WARNING: the 1-minute load average exceeded the {cpus} CPUs + 1 during {', '.join(busy)}: other "
              "work competed for the CPUs, so these timings (and ratios between runs) are unreliable; rerun on "
              "an idle machine, or try --threads 1.", flush=True)
    if args.json_out:
        Path(args.json_out).expanduser().write_text(json.dumps({"config": config, "runs": runs}, indent=1))
        log(f"wrote {args.json_out}")
    if args.plot:
        plot(runs, args.plot, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
