"""Load a LLaVA checkpoint, in any key spelling and file format transformers or LLaVA has written, into our modules.

Keys are mapped onto our names by models.checkpoint_keys; files are found and read by models.checkpoint_files
(safetensors, else PyTorch .bin read without unpickling arbitrary objects). Original LLaVA checkpoints take
their vision tower from the separate CLIP directory the config names. Tensors are read one at a time, so peak
memory is the model plus one tensor.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint_files import CheckpointError, iter_tensors, weight_files
from .checkpoint_keys import canonical_key
from .config import LlavaConfig, load_config
from .llava import LlavaForConditionalGeneration
from .llama import fuse_projections

__all__ = ["CheckpointError", "load_model"]

# Tensors real checkpoints carry that the model does not need.
HARMLESS = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")


def _unused_vision_key(key: str, built_layers: int) -> bool:
    """CLIP layers past the deepest feature layer, and post_layernorm, are never run by LLaVA."""
    if ".post_layernorm." in key:
        return True
    m = re.search(r"vision_model\.encoder\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= built_layers


def _load_dir(model_dir: Path, source: str, params: dict, seen: dict, built_layers: int) -> None:
    """Copy every tensor of one checkpoint directory into `params`; `seen` maps our names to raw keys."""
    for path in weight_files(model_dir):
        for raw, read in iter_tensors(path):
            if HARMLESS.search(raw):
                continue
            key = canonical_key(raw, source)
            if key is None or (key.startswith("vision_tower.") and _unused_vision_key(key, built_layers)):
                continue
            if key not in params:
                raise CheckpointError(f"{path.name}: unexpected tensor {raw!r}")
            if key in seen:
                raise CheckpointError(f"{path.name}: tensors {seen[key]!r} and {raw!r} both name {key!r}")
            t, p = read(), params[key]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{path.name}: tensor {raw!r} has shape {tuple(t.shape)}, "
                                      f"the config needs {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
            seen[key] = raw


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               cfg: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """Build the model for <model_dir>'s config and fill every parameter from its weight files."""
    model_dir = Path(model_dir)
    cfg = cfg or load_config(model_dir)
    if cfg.layout == "original" and not Path(cfg.vision_tower_path).is_dir():
        # Check before anything else: without it the vision geometry is a guess, and the first error
        # would otherwise be a misleading projector shape mismatch.
        raise CheckpointError(f"{cfg.vision_tower_path}: CLIP vision tower directory (mm_vision_tower) not found "
                              "(nor a Hugging Face cache snapshot of it)")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.language_model.model.rotary_emb.reset()
    params = dict(model.named_parameters())
    seen: dict[str, str] = {}
    built = len(model.vision_tower.vision_model.encoder.layers)
    if cfg.layout == "original":
        _load_dir(model_dir, "original", params, seen, built)
        _load_dir(Path(cfg.vision_tower_path), "clip", params, seen, built)
    else:
        _load_dir(model_dir, "llava", params, seen, built)
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if cfg.tie_word_embeddings and head not in seen and embed in seen:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        seen[head] = head
    missing = sorted(set(params).difference(seen))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {missing[0]!r}{more}")
    fuse_projections(model.language_model)
    # An inference engine never needs gradients; without this, eager ops and graph capture would
    # record autograd history for every parameter they touch.
    return model.eval().requires_grad_(False)
