"""Load (sharded) safetensors checkpoints in any of the three LLaVA key layouts into our modules.

Every key is rewritten by prefix onto the llava-hf legacy names our modules use:
  llava-hf legacy   language_model.model.* / vision_tower.vision_model.* / multi_modal_projector.* / language_model.lm_head
  llava-hf new      model.language_model.* / model.vision_tower.* / model.multi_modal_projector.* / lm_head
  original LLaVA    model.* / model.mm_projector.{0,2} / lm_head, CLIP from its own checkpoint (vision_model.*)
Tensors are read one at a time, so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import LlavaConfig, load_config
from .llava import LlavaForConditionalGeneration
from .llama import fuse_projections


class CheckpointError(ValueError):
    """A checkpoint with missing files, missing or unexpected tensors, or wrong shapes."""


HF_NEW_TO_LEGACY = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                    ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]
ORIGINAL_TO_LEGACY = [("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                      ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
                      ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
CLIP_TO_LEGACY = [("vision_model.", "vision_tower.vision_model.")]

# Tensors real checkpoints carry that the model does not need.
HARMLESS = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")
ORIGINAL_SKIP = re.compile(r"^model\.vision_tower\.")  # DeepSpeed LLaVA saves its CLIP here; LLaVA ignores it
CLIP_SKIP = re.compile(r"^(text_model\.|visual_projection|text_projection|logit_scale)")


def _rewrite(key: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / n for n in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    return files


def _unused_vision_key(key: str, built_layers: int) -> bool:
    """CLIP layers past the deepest feature layer, and post_layernorm, are never run by LLaVA."""
    if ".post_layernorm." in key:
        return True
    m = re.search(r"vision_model\.encoder\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= built_layers


def _load_files(files: list[Path], rules, skip: re.Pattern | None, params: dict, seen: set, built_layers: int):
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        with handle as f:
            for raw in f.keys():
                if HARMLESS.search(raw) or (skip is not None and skip.search(raw)):
                    continue
                key = _rewrite(raw, rules)
                if key.startswith("vision_tower.") and _unused_vision_key(key, built_layers):
                    continue
                if key not in params:
                    raise CheckpointError(f"{path.name}: unexpected tensor {raw!r}")
                t = f.get_tensor(raw)
                p = params[key]
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(f"{path.name}: tensor {raw!r} has shape {tuple(t.shape)}, "
                                          f"the config needs {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
                seen.add(key)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               cfg: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """Build the model for <model_dir>'s config and fill every parameter from its safetensors files."""
    model_dir = Path(model_dir)
    cfg = cfg or load_config(model_dir)
    if cfg.layout == "original" and not Path(cfg.vision_tower_path).is_dir():
        # Check before anything else: without it the vision geometry is a guess, and the first error
        # would otherwise be a misleading projector shape mismatch.
        raise CheckpointError(f"{cfg.vision_tower_path}: CLIP vision tower directory (mm_vision_tower) not found")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.language_model.model.rotary_emb.reset()
    params = dict(model.named_parameters())
    seen: set[str] = set()
    built = len(model.vision_tower.vision_model.encoder.layers)
    if cfg.layout == "original":
        _load_files(safetensors_files(model_dir), ORIGINAL_TO_LEGACY, ORIGINAL_SKIP, params, seen, built)
        clip_dir = Path(cfg.vision_tower_path)
        _load_files(safetensors_files(clip_dir), CLIP_TO_LEGACY, CLIP_SKIP, params, seen, built)
    else:
        _load_files(safetensors_files(model_dir), HF_NEW_TO_LEGACY, None, params, seen, built)
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if cfg.tie_word_embeddings and head not in seen and embed in seen:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        seen.add(head)
    missing = sorted(set(params) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: checkpoint is missing tensor {missing[0]!r}{more}")
    fuse_projections(model.language_model)
    # An inference engine never needs gradients; without this, eager ops and graph capture would
    # record autograd history for every parameter they touch.
    return model.eval().requires_grad_(False)
