"""The model `python -m engine.generate` uses when no --model is given."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SEED = 0


def default_model_dir() -> Path:
    """A small random-weight LLaVA, written by tools.make_tiny_model into a cache directory on first use."""
    root = Path(os.environ.get("ST3_CACHE_DIR", Path.home() / ".cache" / "st3-engine"))
    out = root / f"tiny-random-seed{DEFAULT_SEED}"
    if not (out / "config.json").exists():
        from tools.make_tiny_model import make_tiny_model
        tmp = root / f".tmp-{os.getpid()}"
        make_tiny_model(tmp, preset="tiny", seed=DEFAULT_SEED, text_layers=8, image_size=64)
        tmp.rename(out) if not out.exists() else None
    return out
