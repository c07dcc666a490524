"""The model `python -m engine.generate` and `LLM()` use when no model is given.

It is the small LLaVA that tools/demo/train.py trains from scratch on easy-VQA (64x64 images of one
coloured circle, rectangle or triangle): it answers questions such as "what color is the shape?" or
"is there a red shape?" and "describe the image.", and it ships inside the package (about 8 MB).
"""
from __future__ import annotations

from pathlib import Path

from .errors import EngineError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def default_model_dir() -> Path:
    """The shipped easy-VQA demo checkpoint (llava-hf layout)."""
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise EngineError(f"the built-in demo model is missing from {DEMO_MODEL_DIR}; pass a model directory "
                          "or retrain it with: python -m tools.demo.train --out engine/demo_model")
    return DEMO_MODEL_DIR
