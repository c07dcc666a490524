"""The easy-VQA dataset (PyPI `easy-vqa` 1.0, MIT licence) as LLaVA conversations, plus a caption task.

easy-VQA has 4,000 train and 1,000 test 64x64 images, each one shape (circle, rectangle, triangle)
in one of eight colours on a pale background, with ~48k questions over 13 one-word answers. Its
questions are short, so this module adds "describe the image." whose target sentence is built from
the image's labels and from its pixels (the shape's size and where it sits):

    a large teal circle in the top left.

That answer is long enough for ST3's decode-time annealing to act, and it can only be right if
the model really looks at where the shape is.

    pip install easy-vqa==1.0        # or: pip install -e '.[demo]'
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
DESCRIBE = "describe the image."


@dataclass
class Example:
    image_id: int
    image_path: Path
    color: str
    shape: str
    caption: str
    qa: list[tuple[str, str]]  # (question, answer), easy-VQA's own


def data_root() -> Path:
    """Where the installed easy_vqa package keeps its data (a clear error when it is not installed)."""
    try:
        import easy_vqa
    except ImportError:
        raise SystemExit("easy-VQA is not installed: pip install easy-vqa==1.0 (or pip install -e '.[demo]')")
    return Path(easy_vqa.__file__).parent / "data"


def names_what_is_there(question: str, answer: str) -> bool:
    """For a yes/no question: does the colour or shape it names appear in the image? ('is no circle present?' + no)"""
    words = question.rstrip("?").split()
    return (answer == "yes") != ("not" in words or "no" in words)


def question_kind(question: str, answer: str) -> str:
    """colour, shape, or yes/no split by whether the colour or shape it names is in the image.

    easy-VQA's yes/no questions mostly name an absent colour or shape, so a model can score ~83% on
    them without looking; "present" ones show whether it really matches the question against the image.
    """
    if answer in COLORS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    return "yes/no present" if names_what_is_there(question, answer) else "yes/no absent"


def _labels(qa: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """Colour and shape of an image from its own questions ('what color is the circle?' -> blue, ...)."""
    color = shape = None
    for q, a in qa:
        words = q.rstrip("?").split()
        if a in COLORS:
            color = a
        if a in SHAPES:
            shape = a
        if q.startswith("what") and words[-1] in SHAPES:      # 'what color is the triangle?'
            shape = words[-1]
        if q.startswith("what is the ") and words[3] in COLORS:  # 'what is the blue shape?'
            color = words[3]
        if a in ("yes", "no") and names_what_is_there(q, a):
            color = next((w for w in words if w in COLORS), color)
            shape = next((w for w in words if w in SHAPES), shape)
    return color, shape


def _shape_mask(a: np.ndarray) -> np.ndarray:
    return np.abs(a - a[0, 0]).sum(-1) > 60  # the corner is background


def _shape_rgb(a: np.ndarray) -> tuple[int, ...]:
    """The shape's fill colour: its most common pixel (edges are anti-aliased blends)."""
    pixels, counts = np.unique(a[_shape_mask(a)], axis=0, return_counts=True)
    return tuple(int(c) for c in pixels[counts.argmax()])


def _shape_kind(a: np.ndarray) -> str:
    """Circle, rectangle or triangle from how much of its bounding box the shape fills (pi/4, 1, 1/2)."""
    ys, xs = np.nonzero(_shape_mask(a))
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def caption(a: np.ndarray, color: str, shape: str) -> str:
    """'a <size> <color> <shape> in the <top|middle|bottom> <left|center|right>.' from RGB pixels [H, W, 3]."""
    mask = _shape_mask(a)
    if not mask.any():
        return f"a {color} {shape}."
    ys, xs = np.nonzero(mask)
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    size = "small" if side < 19 else "medium" if side < 27 else "large"  # tertiles of the train split
    cy, cx = (ys.min() + ys.max()) / 2 / a.shape[0], (xs.min() + xs.max()) / 2 / a.shape[1]
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle"
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else "center"
    return f"a {size} {color} {shape} in the {row} {col}."


def load_split(split: str, root: Path | None = None) -> list[Example]:
    """All images of 'train' or 'test' with their questions and a caption."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = (root or data_root()) / split
    per_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in json.loads((d / "questions.json").read_text()):
        per_image.setdefault(int(i), []).append((q, a))
    pixels, labels = {}, {}
    for i in sorted(per_image):
        with Image.open(d / "images" / f"{i}.png") as im:
            pixels[i] = np.asarray(im.convert("RGB")).astype(np.int32)
        labels[i] = _labels(per_image[i])
    # A few images are only asked negative questions; their pixels name the colour and shape.
    fills = {i: _shape_rgb(a) for i, a in pixels.items()}
    palette = {fills[i]: c for i, (c, _) in labels.items() if c}
    out = []
    for i, (color, shape) in labels.items():
        a = pixels[i]
        color, shape = color or palette.get(fills[i]), shape or _shape_kind(a)
        if color is None or shape is None:
            raise ValueError(f"easy-VQA {split} image {i}: cannot tell its colour/shape from its questions")
        out.append(Example(i, d / "images" / f"{i}.png", color, shape, caption(a, color, shape), per_image[i]))
    return out


def corpus(examples: list[Example], framed: bool = False) -> list[str]:
    """Lines to learn the tokenizer's merges from: every question, answer, caption and the chat frame.

    framed: every distinct turn in its chat frame instead, so "USER:" and "ASSISTANT:" are as frequent
    as the questions and become single pieces, with punctuation written apart so no merge glues
    "circle" to "?" (with enough pieces, every word is then one piece wherever it appears).
    """
    if framed:
        lines = {f"USER: {q} ASSISTANT: {a}" for e in examples for q, a in list(e.qa) + [(DESCRIBE, e.caption)]}
        return sorted(line.replace("?", " ?").replace(".", " .") for line in lines)
    lines = {"USER: ASSISTANT:", DESCRIBE}
    for e in examples:
        lines.add(e.caption)
        lines.update(q + " " + a for q, a in e.qa)
    return sorted(lines)


# easy-VQA's yes/no templates, as its generator writes them; the negated ones answer the opposite.
YES_NO_TEMPLATES = tuple((t, neg) for neg, ts in (
    (False, ("does the image contain a {}?", "is a {} present?", "is there a {} in the image?", "is there a {}?")),
    (True, ("does the image not contain a {}?", "is no {} present?", "is there not a {} in the image?",
            "is there not a {}?"))) for t in ts)


def with_yes_no_questions(examples: list[Example], per_image: int, rng: np.random.Generator,
                          keep_own: bool = True) -> list[Example]:
    """Examples with `per_image` extra yes/no questions each, in easy-VQA's templates, half about what IS there.

    easy-VQA's own yes/no questions name an absent colour (7 of 8) or shape (2 of 3) most of the
    time, so "no" (or "yes" when negated) is right ~83% of the time without looking; a model trained
    on them alone learns exactly that prior and never matches the named colour against the image.
    In these extra questions the named colour or shape is the image's own half the time, so only
    matching it against the image answers them. Call once per epoch for fresh questions.
    keep_own=False: the extra questions only.
    """
    out = []
    for e in examples:
        extra = []
        for _ in range(per_image):
            template, negated = YES_NO_TEMPLATES[rng.integers(len(YES_NO_TEMPLATES))]
            present = bool(rng.random() < 0.5)
            if rng.random() < 0.5:
                color = e.color if present else rng.choice([c for c in COLORS if c != e.color])
                thing = f"{color} shape"
            else:
                thing = e.shape if present else rng.choice([s for s in SHAPES if s != e.shape])
            extra.append((template.format(thing), "yes" if present != negated else "no"))
        out.append(Example(e.image_id, e.image_path, e.color, e.shape, e.caption, (list(e.qa) if keep_own else []) + extra))
    return out


def write_examples(out: Path, test: list[Example], n: int = 8) -> None:
    """Copy the first n easy-VQA test images with their questions and captions into out/examples."""
    d = out / "examples"
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in test[:n]:
        name = f"easy-vqa-test-{e.image_id}.png"
        (d / name).write_bytes(e.image_path.read_bytes())
        rows.append({"image": name, "color": e.color, "shape": e.shape, "caption": e.caption,
                     "qa": [list(x) for x in e.qa]})
    (d / "examples.json").write_text(json.dumps(rows, indent=1))
    (d / "LICENSE-easy-vqa.txt").write_text(
        "The images in this folder are from the easy-VQA dataset (https://github.com/vzhou842/easy-VQA,\n"
        "PyPI easy-vqa 1.0), Copyright (c) 2019 Victor Zhou, released under the MIT License.\n")
