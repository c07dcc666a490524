"""Answer one question about one image from the command line, streaming the answer.

  python -m engine.generate --model DIR|ORG/NAME --image PATH --prompt "What is in the picture?" [--policy st3 ...]

The answer goes to stdout as it is generated and one stats line goes to stderr; `--json` prints a
single JSON object instead. Every error is one `error: ...` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from engine import LLM, SamplingParams
from engine.errors import EngineError
from engine.policy_flags import add_policy_arguments, policy_from_args


class UsageError(ValueError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage banner; main() turns it into `error: ...` and exit 2
        raise UsageError(message)


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--model and --revision, as engine.generate and engine.serve both take them."""
    ap.add_argument("--model", help="model directory, or a Hugging Face id already in the local cache "
                    "(default: the built-in easy-VQA demo model)")
    ap.add_argument("--revision", help="with a Hugging Face id: the cached revision (branch, tag or commit)")


def add_device_arguments(group) -> None:
    """--device and --dtype, as engine.generate and engine.serve both take them."""
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or auto (the checkpoint's)")


def build_parser() -> Parser:
    ap = Parser(prog="python -m engine.generate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--image", help="image file; the prompt gets one <image>")
    ap.add_argument("--prompt", required=True, help="the question (or the whole prompt with --raw-prompt)")
    ap.add_argument("--raw-prompt", action="store_true", help="use --prompt as is, without the LLaVA chat template")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    s = ap.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument_group("visual-token policy").add_argument("--policy", default="full",
                                                              help="full, fastv, pvtp or st3")
    add_policy_arguments(ap)
    e = ap.add_argument_group("engine")
    add_device_arguments(e)
    e.add_argument("-v", "--verbose", action="store_true",
                   help="log engine events (KV pool, attention backend, graph capture, preemptions) to stderr")
    e.add_argument("--num-kv-blocks", type=int)
    return ap


def stats_line(stats: dict) -> str:
    ttft, itl = stats.get("ttft_s"), stats.get("itl_s") or []
    rate = f"{len(itl) / sum(itl):.1f} tok/s" if sum(itl) > 0 else "n/a"
    layers = ",".join(map(str, stats.get("visual_tokens_per_layer") or [])) or "-"
    return (f"stats: {stats['generated_tokens']} tokens generated | prompt {stats['prompt_tokens']} tokens "
            f"({stats['visual_tokens']} visual) | ttft {'n/a' if ttft is None else f'{ttft:.3f} s'} | "
            f"decode {rate} | kv blocks peak {stats['kv_peak_blocks']} final {stats['kv_blocks_final']} | "
            f"visual/layer {layers} | policy {stats['policy']} | finish {stats['finish_reason']}")


def run(args) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=args.stop)
    policy = policy_from_args(args)
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("st3: %(message)s"))
        logging.getLogger("st3").addHandler(handler)
        logging.getLogger("st3").setLevel(logging.INFO)
    if args.model is None:
        print("note: no --model given: using the built-in easy-VQA demo model (64x64 images of one coloured "
              "circle, rectangle or triangle; ask e.g. 'what color is the shape?' or 'describe the image.')",
              file=sys.stderr)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, revision=args.revision, policy=policy,
              num_kv_blocks=args.num_kv_blocks, max_num_seqs=1)
    num_images = 0 if args.image is None else 1
    prompt = args.prompt if args.raw_prompt else llm.tokenizer.chat_prompt(args.prompt, num_images)
    request = {"prompt": prompt, "image": args.image}
    if args.json:
        out = llm.generate(request, params)[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "stats": out.stats}))
        return 0
    out = None
    for out in llm.stream(request, params):
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    print(flush=True)
    if out is not None:
        print(stats_line({**out.stats, "finish_reason": out.finish_reason}), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except (ValueError, OSError, EngineError) as e:  # RequestError, ConfigError, ImageError... are ValueErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
