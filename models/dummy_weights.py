"""Random weights in place of a checkpoint (`LLM(..., load_format="dummy")`, as vLLM's option of that name).

For benchmarks at real geometry: a LLaVA-1.5-7B-shaped model is 14 GB, which takes longer to write and
read than to draw on the device. The draw is scaled so activations and logits stay well spread at any
depth (greedy ties are rare); tools/fixtures/make_tiny_model.py writes checkpoints with the same rule.
"""
from __future__ import annotations

import math

import torch

from .config import LlavaConfig
from .llama import fuse_projections
from .llava import LlavaForConditionalGeneration


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """An fp32 tensor for parameter `name`: norms near 1, small biases, fan-in-scaled matrices."""
    randn = lambda: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight") \
            or name.endswith("layrnorm.weight") or name.endswith("post_layernorm.weight"):
        return 1.0 + 0.1 * randn()
    if name.endswith("bias"):
        return 0.02 * randn()
    if name.endswith("lm_head.weight"):
        return randn() * (2.0 / math.sqrt(shape[1]))
    if len(shape) >= 2 and "embed" not in name:
        return randn() / math.sqrt(math.prod(shape[1:]))
    return randn() * 0.5  # embeddings, class embedding


@torch.no_grad()
def dummy_model(cfg: LlavaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
                ) -> LlavaForConditionalGeneration:
    """The model for `cfg` with seeded random weights drawn on `device` (no checkpoint read)."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.language_model.model.rotary_emb.reset()
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(random_tensor(name, tuple(p.shape), g, device).to(dtype))
    if cfg.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    fuse_projections(model.language_model)
    return model.eval().requires_grad_(False)
