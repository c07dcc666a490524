"""Accuracy under pruning: the easy-VQA test split through every policy, with time and KV beside it.

    pip install -e '.[demo]'
    python -m tools.demo.eval_vqa [--model engine/demo_model] [--limit 2000] [--policies full,st3,...]

For each policy setting: exact-match accuracy on easy-VQA's test questions, exact match of the
"describe the image." captions against the labels, agreement of the captions with the full model's,
and the prefill and decode time and KV blocks per request. All settings run in one process on the
same requests (greedy), so the ratios are comparable. Settings are named `policy` (its defaults) or
`policy:key=value,key=value` (e.g. `st3:ratio=0.5,anneal_floor=0.2`), keys the policy's fields, the
names of engine.generate's flags without the dashes (engine/policy_flags.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from models.config import load_config
from engine.policy_flags import parse_policy_spec
from scheduler.policy import make_policy
from tools.demo.easy_vqa_data import DESCRIBE, load_split, question_kind

DEFAULT_SETTINGS = ["full", "fastv", "pvtp", "st3",
                    "st3:ratio=0.5,anneal_floor=0.25,anneal_steps=8",
                    "st3:start_layer=1,stride=1,ratio=0.5,anneal_floor=0.1,anneal_steps=4"]


class Timed:
    """Wall time spent in the runner's prefill and decode forwards."""

    def __init__(self, llm: LLM):
        self.prefill = self.decode = 0.0
        for phase in ("prefill", "decode"):
            inner = getattr(llm.runner, phase)

            def timed(seqs, inner=inner, phase=phase):
                t0 = time.perf_counter()
                out = inner(seqs)
                setattr(self, phase, getattr(self, phase) + time.perf_counter() - t0)
                return out
            setattr(llm.runner, phase, timed)


KINDS = ("yes/no", "yes/no present", "yes/no absent", "colour", "shape")


def answer_kinds(question: str, gold: str) -> tuple[str, ...]:
    """The families a question counts in (KINDS): its question_kind, and "yes/no" for every yes/no one."""
    kind = question_kind(question, gold)
    return ("yes/no", kind) if kind.startswith("yes/no") else (kind,)


def evaluate(model: Path, setting: str, questions: list, captions: list, max_num_seqs: int) -> dict:
    name, params = parse_policy_spec(setting)
    llm = LLM(model, policy=name, policy_params=params, max_num_seqs=max_num_seqs)
    timer = Timed(llm)
    reqs = [{"prompt": llm.tokenizer.chat_prompt(q, 1), "image": str(path)} for path, q, _ in questions + captions]
    outs = llm.generate(reqs, SamplingParams(max_tokens=24, temperature=0))
    answers = [o.text.strip() for o in outs]
    nq = len(questions)
    return {
        "setting": setting, "answers": answers,
        "accuracy": sum(a == gold for a, (_, _, gold) in zip(answers, questions)) / max(nq, 1),
        "accuracy_by_kind": {kind: sum(a == gold for a, (_, q, gold) in zip(answers, questions)
                                       if kind in answer_kinds(q, gold))
                             / max(1, sum(kind in answer_kinds(q, g) for _, q, g in questions)) for kind in KINDS},
        "caption_exact": sum(a == gold for a, (_, _, gold) in zip(answers[nq:], captions)) / max(len(captions), 1),
        "prefill_s": timer.prefill, "decode_s": timer.decode,
        "kv_blocks_per_request": sum(o.stats["kv_peak_blocks"] for o in outs) / len(outs),
        "visual_per_layer": outs[nq].stats["visual_tokens_per_layer"] if captions else None,
    }


def usage_error(message: str) -> None:
    """One `error: ...` line and exit code 2, as every CLI of the engine."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.demo.eval_vqa", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "engine" / "demo_model"))
    ap.add_argument("--split", choices=("test", "train"), default="test",
                    help="train: is a weakness the model's fit or its generalisation?")
    ap.add_argument("--limit", type=int, default=0, help="first N questions of the split (0 = all; test has 9673)")
    ap.add_argument("--captions", type=int, default=None, help="first N test images to caption (default: all)")
    ap.add_argument("--policies", default=";".join(DEFAULT_SETTINGS), help="settings separated by ';' (see above)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", metavar="PATH", help="write every figure (and the answers) here")
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.policies.split(";") if s.strip()]
    try:
        layers = load_config(Path(args.model)).text.num_hidden_layers
    except (OSError, ValueError) as e:
        usage_error(f"--model: {e}")
    for s in settings:  # all checked before the first one runs for minutes
        try:
            name, params = parse_policy_spec(s)
            make_policy(name, **params).validate(layers)
        except ValueError as e:
            usage_error(f"--policies {s!r}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_split(args.split)
    questions = [(e.image_path, q, a) for e in test for q, a in e.qa]
    if args.limit:
        questions = questions[:args.limit]
    images = test if args.captions is None else test[:args.captions]
    captions = [(e.image_path, DESCRIBE, e.caption) for e in images]
    results = []
    for s in settings:
        r = evaluate(Path(args.model), s, questions, captions, args.max_num_seqs)
        results.append(r)
        by_kind = ", ".join(f"{k} {v:.4f}" for k, v in r["accuracy_by_kind"].items())
        print(f"{s}: accuracy {r['accuracy']:.4f} ({by_kind})", flush=True)
    full = next((r for r in results if r["setting"] == "full"), results[0])
    nq = len(questions)
    print(f"\n{len(questions)} questions, {len(captions)} captions, model {args.model}\n")
    print("| setting | VQA accuracy | caption exact | caption = full's | prefill s | decode s | KV blocks/request |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        agree = sum(a == b for a, b in zip(r["answers"][nq:], full["answers"][nq:])) / max(len(captions), 1)
        r["caption_agrees_with_full"] = agree
        print(f"| {r['setting']} | {100 * r['accuracy']:.2f}% | {100 * r['caption_exact']:.1f}% | {100 * agree:.1f}% "
              f"| {r['prefill_s']:.1f} ({r['prefill_s'] / full['prefill_s']:.2f}x) "
              f"| {r['decode_s']:.1f} ({r['decode_s'] / full['decode_s']:.2f}x) "
              f"| {r['kv_blocks_per_request']:.1f} ({r['kv_blocks_per_request'] / full['kv_blocks_per_request']:.2f}x) |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
