"""Benchmark inputs: random-weight model presets (cached on disk) and the seeded request workload."""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

# Bench presets: (make_tiny_model preset, overrides, weight dtype on disk). Weights are random.
# Text vocab sizes are chosen so that vocab + <image> + <pad> is a multiple of 64: the checkpoint then
# has no padding rows in lm_head, so random weights cannot emit an id the tokenizer cannot decode
# (llava-hf's real 32064 = 32000 + 2 + 62 padding; here 32062 + 2).
BENCH_PRESETS: dict[str, tuple[str, dict, str]] = {
    # Seconds per run on a laptop CPU; for tests and smoke runs. 64 visual tokens, 8 layers.
    "tiny": ("tiny", dict(text_vocab=510, text_layers=8, image_size=64), "float32"),
    # LLaVA-1.5's token geometry (576 visual tokens, 32 decoder layers) at a width a 2-core CPU can serve.
    "cpu-32l": ("tiny", dict(text_vocab=32062, hidden=256, intermediate=688, text_layers=32, heads=4, kv_heads=4,
                             vision_layers=2, vision_hidden=128, vision_intermediate=512, vision_heads=4,
                             image_size=336, patch_size=14), "float32"),
    # LLaVA-1.5-7B widths (hidden 4096, 32 heads, CLIP-L/14-336) with 4 decoder and 4 vision layers: for GPUs.
    "llava-1.5-7b-4l": ("llava-1.5-7b", dict(text_vocab=32062, text_layers=4, vision_layers=4), "float16"),
}
PRESET_SEED = 0
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def cache_root() -> Path:
    return Path(os.environ.get("ST3_CACHE_DIR", Path.home() / ".cache" / "st3-engine"))


def preset_model_dir(name: str, root: Path | None = None, log=print) -> Path:
    """The directory of bench preset `name`, writing its random weights on first use (reused after)."""
    if name not in BENCH_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(BENCH_PRESETS)}")
    base, overrides, dtype = BENCH_PRESETS[name]
    root = root or cache_root()
    out = root / f"bench-{name}"
    stamp = {"preset": base, "overrides": overrides, "dtype": dtype, "seed": PRESET_SEED}
    marker = out / "bench_preset.json"
    if marker.is_file() and (out / "config.json").is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out
        except (OSError, json.JSONDecodeError):
            pass
    from tools.fixtures.make_tiny_model import make_tiny_model
    log(f"writing random-weight preset {name!r} to {out} (once; reused afterwards)")
    tmp = root / f".tmp-bench-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_model(tmp, preset=base, seed=PRESET_SEED, dtype=dtype, **overrides)
    (tmp / "bench_preset.json").write_text(json.dumps(stamp, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def parse_len_range(text: str, what: str) -> tuple[int, int]:
    """'64' -> (64, 64); '32:128' -> (32, 128) inclusive. ValueError on anything else."""
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{what} must be an integer or a range A:B, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"{what} must satisfy 1 <= A <= B, got {text!r}")
    return lo, hi


@dataclass
class BenchRequest:
    index: int
    arrival_s: float        # scheduled arrival, seconds after the run starts
    question: str
    prompt: str             # the full chat prompt with one <image> tag
    image: object           # a PIL image
    output_len: int
    text_tokens: int        # tokenized text part of the prompt (everything but the visual tokens)


FILLER = ("please look closely at the picture and tell me about every object color shape person animal "
          "building sign word number texture light shadow background foreground detail you can see in "
          "it then explain what might be happening and why").split()
QUESTIONS = ["Describe this image in detail.", "What is shown in the picture?", "What objects can you see?",
             "Explain what is happening in this scene.", "What colors dominate this image?"]


def text_token_count(tokenizer, prompt: str) -> int:
    image_id = tokenizer.image_token_id
    return sum(1 for t in tokenizer.encode(prompt) if t != image_id)


def build_question(tokenizer, rng: random.Random, target: int | None) -> tuple[str, str, int]:
    """(question, chat prompt, text tokens): a question padded with words until the text part of the
    prompt has about `target` tokens (never fewer than the bare template needs)."""
    words = [rng.choice(QUESTIONS)]
    prompt = tokenizer.chat_prompt(words[0], 1)
    n = text_token_count(tokenizer, prompt)
    while target is not None and n < target:
        # Grow in chunks first, then word by word, so long prompts do not re-tokenize quadratically often.
        step = max(1, (target - n) // 4)
        extra = [rng.choice(FILLER) for _ in range(step)]
        trial = tokenizer.chat_prompt(" ".join(words + extra), 1)
        m = text_token_count(tokenizer, trial)
        if m > target and step > 1:
            extra = extra[:1]
            trial = tokenizer.chat_prompt(" ".join(words + extra), 1)
            m = text_token_count(tokenizer, trial)
        words += extra
        prompt, n = trial, m
    return " ".join(words), prompt, n


def synthetic_image(rng: random.Random, image_size: int):
    """A seeded random image of a random size and aspect ratio (smooth colour noise, not a flat colour)."""
    from PIL import Image
    w = max(8, int(image_size * rng.uniform(0.5, 2.0)))
    h = max(8, int(image_size * rng.uniform(0.5, 2.0)))
    cw, ch = max(2, w // 16), max(2, h // 16)
    coarse = Image.frombytes("RGB", (cw, ch), rng.randbytes(cw * ch * 3))
    return coarse.resize((w, h), Image.BILINEAR)


def load_image_dir(path: str | Path) -> list[Path]:
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"--image-dir {str(d)!r} is not a directory")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"--image-dir {str(d)!r} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    return files


def build_workload(tokenizer, image_size: int, num_requests: int, output_len: tuple[int, int],
                   prompt_len: int | None, request_rate: float, seed: int,
                   image_dir: str | None = None) -> list[BenchRequest]:
    """Requests with pre-drawn arrivals, prompts, images and output lengths (identical for every policy)."""
    from PIL import Image
    rng = random.Random(seed)
    files = load_image_dir(image_dir) if image_dir else None
    t, reqs = 0.0, []
    for i in range(num_requests):
        if request_rate != float("inf") and i > 0:
            t += rng.expovariate(request_rate)
        question, prompt, n_text = build_question(tokenizer, rng, prompt_len)
        if files:
            with Image.open(files[i % len(files)]) as im:
                image = im.convert("RGB")
        else:
            image = synthetic_image(rng, image_size)
        reqs.append(BenchRequest(i, t, question, prompt, image, rng.randint(*output_len), n_text))
    return reqs
