"""Train the shipped demo model: a small LLaVA, from scratch, on easy-VQA plus a caption task, on CPU.

    pip install -e '.[demo]'
    python -m tools.demo.train --out engine/demo_model --tower-minutes 15 --minutes 49

The model is built from the same `models/` classes the engine serves (autograd through the
decoder's dense forward), and saved in the llava-hf layout with its tokenizer and preprocessor config.

Two stages, as LLaVA itself is built on a pretrained, frozen CLIP tower:
  1. tools/demo/tower.py: the vision tower learns the image labels (shape, colour, size, position)
     through small classifier heads that are then dropped; the tower is frozen.
  2. Projector + decoder learn the conversations on the frozen tower's features (computed once).

Sizes, and why:
  * 64x64 images (easy-VQA's own size) cut into 4x4 patches: 256 visual tokens, so visual tokens
    dominate the sequence as in LLaVA-1.5 (576 of ~650) and pruning has something to prune.
  * CLIP-style tower: 3 layers of width 96 (LLaVA reads the second-to-last, so 2 run). Wider or
    deeper towers (128 wide, or 3 running layers) took longer per step and had not learned shape
    after the same 8-11 minutes; this one reached 94% on shape in 8 minutes on one core.
  * Decoder: 8 layers of width 128 (4 heads, SwiGLU 344): deep enough that PVTP's schedule
    (events at layers 2, 4, 6) and ST3's annealing act on several layers. About 2M parameters,
    ~8 MB in fp32, so the checkpoint can live in the repository.

Each image is one packed sequence (tools/demo/conversations.py): its prompt and 256 visual tokens
once, then its questions (and "describe the image."), so the visual tokens are computed once per
image rather than once per question.

Stage 2's defaults are the recipe of the shipped model; each was needed (README, Demo model):
  * --whiten 0.1: the projector trains on ridge-regularised PCA-whitened tower features (folded
    into its first linear layer at save, so the checkpoint stays plain llava-hf). Raw features are
    one direction holding 85% of the variance; colour, in small directions, was otherwise not
    learned together with the balanced yes/no questions below.
  * --plain-minutes 8: the first minutes train the image's own easy-VQA questions as one shuffled
    multi-turn conversation, which learns to read colour and shape.
  * then --single-turn --yes-no 12: every question a lone first turn (exactly what the engine
    serves: each sees the image prefix and itself only), plus 12 fresh yes/no questions per image
    and epoch naming the image's own colour or shape half of the time. easy-VQA's own yes/no
    questions name an absent one ~83% of the time, and a model trained on them alone answers from
    that prior instead of matching the named word against the image.
  * --word-tokenizer: 448 pieces, every word one piece, so a turn is ~12 tokens instead of ~30.
--no-single-turn, --no-word-tokenizer, --yes-no 0, --plain-minutes 0 and --raw-features give back
the first recipe; --alternate and --standardise are variants that did worse.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from models.image import load_preprocessor_config, preprocess
from models.llava import LlavaForConditionalGeneration
from models.tokenizer import Tokenizer
from tools.demo.easy_vqa_data import (Example, corpus, load_split, question_kind, with_yes_no_questions,
                                 write_examples)
from tools.demo.lr_schedule import TimeBoxedCosine, train_time_boxed
from tools.demo.preconditioner import fold_preconditioner, preconditioner
from tools.fixtures.make_tiny_model import _hf_config, _save, build_config, preprocessor_config, random_state_dict
from tools.fixtures.tiny_tokenizer import write_tokenizer
from tools.demo.conversations import Batch, Conversations, batches, collate, PrefixAttention
from tools.demo.tower import init_sincos_positions, pretrain_tower, tower_labels

SIZES = dict(text_vocab=384, hidden=128, intermediate=344, text_layers=8, heads=4, kv_heads=4,
             vision_hidden=96, vision_intermediate=192, vision_layers=3, vision_heads=4,
             image_size=64, patch_size=4, max_positions=1024)


def write_side_files(out: Path, train: list[Example], sizes: dict, word_tokenizer: bool) -> None:
    """Tokenizer (merges learned from the dataset's text), config and preprocessor config."""
    write_tokenizer(out, sizes["text_vocab"], corpus=corpus(train, framed=word_tokenizer))
    cfg = build_config(sizes)
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, "float32"), indent=2))
    pre = preprocessor_config(SIZES["image_size"])
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


@torch.no_grad()
def tower_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    """The frozen tower's patch features (what the projector reads) for every image, computed once."""
    return torch.cat([model.vision_tower(pixels[s:s + chunk])[:, 1:] for s in range(0, len(pixels), chunk)])


def logits_from_features(model: LlavaForConditionalGeneration, batch: Batch, feats: torch.Tensor) -> torch.Tensor:
    """dense_logits with the tower's output given: projector, splice, decoder (all with autograd)."""
    embeds = model.embed(batch.ids, model.multi_modal_projector(feats))
    return model.language_model.forward_dense(embeds, batch.positions, PrefixAttention(batch))


def load_tower(model: LlavaForConditionalGeneration, src: Path) -> None:
    """Copy a trained vision tower out of an earlier checkpoint of the same sizes, and freeze it."""
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        own, stored = model.vision_tower.state_dict(), set(f.keys())
        missing = [k for k in own if f"vision_tower.{k}" not in stored]
        if missing:
            raise ValueError(f"--tower-from {src}: no {missing[0]} (and {len(missing) - 1} more)")
        model.vision_tower.load_state_dict({k: f.get_tensor(f"vision_tower.{k}") for k in own})
    model.vision_tower.requires_grad_(False).eval()


def init_weights(model: LlavaForConditionalGeneration, seed: int) -> None:
    """GPT-2 style: N(0, 0.02) matrices and embeddings, zero biases, unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


QUICK_KINDS = ("colour", "shape", "yes/no present", "yes/no absent", "caption")


@torch.no_grad()
def quick_accuracy(model, conv: Conversations, examples: list[Example], feats: torch.Tensor,
                   n: int = 200) -> dict[str, float]:
    """Teacher-forced exact match of every question of n test images, each as a first turn: over all
    of them ("all") and per kind (QUICK_KINDS)."""
    hits, total = dict.fromkeys(("all",) + QUICK_KINDS, 0), dict.fromkeys(("all",) + QUICK_KINDS, 0)
    for s in range(0, n, 25):
        chunk = examples[s:s + 25]
        batch = collate([conv.build(e) for e in chunk], 0)
        pred = logits_from_features(model, batch, feats[s:s + 25]).argmax(-1)
        # Token t predicts t+1, and every turn starts with question tokens: shift within the turns.
        pred, labels = batch.turn_view(pred)[..., :-1], batch.turn_view(batch.labels)[..., 1:]
        right = ((pred == labels) | (labels == -100)).all(-1).tolist()
        for b, e in enumerate(chunk):  # build() lays out the turns in e.qa order, the caption last
            kinds = [question_kind(q, a) for q, a in e.qa] + ["caption"]
            for k, kind in enumerate(kinds):
                for key in ("all", kind):
                    hits[key] += right[b][k]
                    total[key] += 1
    return {k: hits[k] / max(1, total[k]) for k in hits}


def stage2_batches(args: argparse.Namespace, train: list[Example], conv: Conversations, feats: torch.Tensor,
                   pad: int, sched: TimeBoxedCosine, log):
    """(Batch, features) for stage 2, endlessly: --plain-minutes of plain multi-turn (the image's own
    questions as one shuffled conversation), then --alternate or --single-turn/--yes-no."""
    rng, np_rng = random.Random(args.seed), np.random.default_rng(args.seed)

    def forever(epoch):  # epoch() builds one pass over the images (fresh yes/no questions each time)
        while True:
            yield from epoch()

    plain = forever(lambda: batches(train, conv, feats, args.batch, rng, pad, multi_turn=True))
    if args.plain_minutes:
        while sched.minutes_elapsed() < args.plain_minutes:
            yield next(plain)
        log(f"  {args.plain_minutes:g} min of plain multi-turn done")
    if args.alternate:  # plain multi-turn, then single-turn balanced yes/no only (no caption)
        yes_no = forever(lambda: batches(with_yes_no_questions(train, args.yes_no, np_rng, keep_own=False), conv,
                                         feats, args.batch, rng, pad, multi_turn=False, describe=False))
        while True:
            yield next(plain)
            yield next(yes_no)
    yield from forever(lambda: batches(with_yes_no_questions(train, args.yes_no, np_rng), conv, feats, args.batch,
                                       rng, pad, multi_turn=not args.single_turn))


class Log:
    """Progress on one rewritten terminal line, milestones on their own lines; everything to train_log.txt."""

    def __init__(self, path: Path):
        self.file = open(path, "w")

    def __call__(self, line: str, bar: bool = False) -> None:
        print(("\r" if bar else "\n") + line, end="" if bar else "\n", flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--tower-minutes", type=float, default=15.0, help="stage 1: vision tower pretraining time")
    ap.add_argument("--minutes", type=float, default=49.0, help="stage 2: projector + decoder training time")
    ap.add_argument("--epochs", type=int, default=100, help="stage 2 stops after this many epochs at most")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--single-turn", action=argparse.BooleanOptionalAction, default=True,
                    help="train every question as a lone first turn (what the engine serves); --no-single-turn: "
                         "one shuffled multi-turn conversation per image")
    ap.add_argument("--yes-no", type=int, default=12,
                    help="extra yes/no questions per train image and epoch, half about what is in it")
    ap.add_argument("--word-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                    help="448 text pieces learned from the turns in their chat frame, punctuation apart: every "
                         "word one piece, the same in questions and answers (--no-word-tokenizer: 384 pieces, "
                         "which split 'yes' into 'ye'+'s', sharing 'ye' with 'yellow')")
    ap.add_argument("--alternate", action="store_true",
                    help="alternate steps: the image's own questions as one multi-turn conversation, then "
                         "single-turn batches of only the --yes-no questions")
    features = ap.add_mutually_exclusive_group()  # what the projector trains on: one preconditioner, or none
    features.add_argument("--standardise", action="store_true",
                          help="train the projector on per-channel standardised tower features (folded into "
                               "its first linear layer at save: the checkpoint still reads raw features)")
    features.add_argument("--whiten", type=float, default=None, metavar="RIDGE",
                          help="train the projector on ridge-regularised PCA-whitened tower features (folded "
                               "into its first linear layer at save); the default 0.1 lifts colour from 1.5%% "
                               "to 17%% of the variance")
    features.add_argument("--raw-features", action="store_true",
                          help="train the projector on the raw tower features (no --whiten or --standardise)")
    ap.add_argument("--plain-minutes", type=float, default=8.0,
                    help="the first minutes of stage 2 train the image's own questions as one multi-turn "
                         "conversation (which learns to read colour and shape); the other options apply after")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tower-from", default=None,
                    help="skip stage 1: take the trained vision tower from this earlier tools.demo.train output")
    ap.add_argument("--examples-only", action="store_true", help="only (re)write out/examples")
    args = ap.parse_args(argv)
    if args.whiten is not None and args.whiten < 0:
        ap.error(f"--whiten: the ridge must be >= 0, got {args.whiten:g}")
    if not (args.raw_features or args.standardise or args.whiten is not None):
        args.whiten = 0.1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_split("train"), load_split("test")
    write_examples(out, test)
    if args.examples_only:
        return 0
    sizes = {**SIZES, "text_vocab": 448} if args.word_tokenizer else SIZES
    write_side_files(out, train, sizes, args.word_tokenizer)
    tok = Tokenizer.from_dir(out)
    cfg = build_config(sizes)
    model = LlavaForConditionalGeneration(cfg)
    init_weights(model, args.seed)
    init_sincos_positions(model.vision_tower)
    model.language_model.model.rotary_emb.reset()
    num_visual = (SIZES["image_size"] // SIZES["patch_size"]) ** 2
    conv = Conversations(tok, cfg.image_token_index, num_visual)
    pre = load_preprocessor_config(out, SIZES["image_size"])
    pixels = torch.stack([preprocess(Image.open(e.image_path), pre) for e in train])
    test_pixels = torch.stack([preprocess(Image.open(e.image_path), pre) for e in test])
    log = Log(out / "train_log.txt")
    t0 = time.perf_counter()

    if args.tower_from:
        load_tower(model, Path(args.tower_from))
        log(f"stage 1 skipped: vision tower taken from {args.tower_from}, frozen")
    else:
        log(f"stage 1: vision tower ({sum(p.numel() for p in model.vision_tower.parameters()) / 1e6:.2f}M "
            f"parameters) on image labels, {args.tower_minutes:g} min")
        acc = pretrain_tower(model.vision_tower, pixels, tower_labels(train), test_pixels, tower_labels(test),
                             minutes=args.tower_minutes, seed=args.seed, log=log)
        log(f"stage 1 done: test accuracy {acc}, frozen")
    feats, test_feats = tower_features(model, pixels), tower_features(model, test_pixels[:200])
    precondition = args.standardise or args.whiten is not None  # colour lives in small directions of raw features
    if precondition:
        mean, m = preconditioner(feats, args.whiten)
        feats, test_feats = (feats - mean) @ m, (test_feats - mean) @ m
        log("projector input " + ("standardised" if args.whiten is None else f"whitened, ridge {args.whiten:g}"))

    params = [p for p in model.parameters() if p.requires_grad]
    log(f"stage 2: projector + decoder ({sum(p.numel() for p in params) / 1e6:.2f}M parameters), "
        f"{num_visual} visual tokens, {len(train)} train conversations, batch {args.batch}, {args.minutes:g} min")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = TimeBoxedCosine(args.lr, args.minutes, max_steps=len(train) // args.batch * args.epochs)
    source = stage2_batches(args, train, conv, feats, cfg.pad_token_id or 0, sched, log)

    def next_loss() -> torch.Tensor:
        batch, f = next(source)
        logits = logits_from_features(model, batch, f)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())

    def evaluate() -> str:
        model.eval()
        acc = quick_accuracy(model, conv, test, test_feats)
        model.train()
        return "exact match on 200 test images: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())

    model.train()
    step = train_time_boxed(sched, opt, params, next_loss, evaluate, log, name="stage 2", log_every=10, eval_every=200)
    if precondition:
        fold_preconditioner(model.multi_modal_projector, mean, m)
    sd = random_state_dict(cfg, args.seed)  # the full CLIP depth a real checkpoint carries; trained parts overwrite
    sd.update({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    _save(sd, out, 1, torch.float32)
    log(f"saved {out} after {step} steps, {(time.perf_counter() - t0) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
