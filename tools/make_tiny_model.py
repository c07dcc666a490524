"""Write a seeded random-weight LLaVA checkpoint in a real key layout, at any shape.

  python -m tools.make_tiny_model OUT_DIR [--preset tiny|llava-1.5-7b] [--text-layers N] [--hidden H] ...
Layouts: `hf` (llava-hf legacy keys), `hf-new` (transformers >= 4.52 keys), `original`
(haotian-liu/LLaVA keys, CLIP in OUT_DIR/clip-vision). `--shards N` splits the weights with an index.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import LlavaConfig, TextConfig, VisionConfig
from models.llava import LlavaForConditionalGeneration
from tools.tiny_tokenizer import write_tokenizer

PRESETS = {
    "tiny": dict(text_vocab=500, hidden=64, intermediate=172, text_layers=4, heads=4, kv_heads=4,
                 vision_hidden=48, vision_intermediate=96, vision_layers=3, vision_heads=4,
                 image_size=32, patch_size=8),
    "llava-1.5-7b": dict(text_vocab=32000, hidden=4096, intermediate=11008, text_layers=32, heads=32,
                         kv_heads=32, vision_hidden=1024, vision_intermediate=4096, vision_layers=24,
                         vision_heads=16, image_size=336, patch_size=14),
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_config(p: dict) -> LlavaConfig:
    """A LlavaConfig from preset-style keys."""
    vocab = math.ceil((p["text_vocab"] + 2) / 64) * 64  # <image>, <pad>, padded like the HF converter
    text = TextConfig(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["text_layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=p.get("max_positions", 4096),
                      rms_norm_eps=1e-5, rope_theta=p.get("rope_theta", 10000.0))
    vision = VisionConfig(hidden_size=p["vision_hidden"], intermediate_size=p["vision_intermediate"],
                          num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
                          image_size=p["image_size"], patch_size=p["patch_size"])
    return LlavaConfig(text=text, vision=vision, image_token_index=p["text_vocab"], pad_token_id=p["text_vocab"] + 1,
                       vision_feature_layer=p.get("feature_layer", -2),
                       vision_feature_select_strategy=p.get("strategy", "default"),
                       tie_word_embeddings=p.get("tie", False))


@torch.no_grad()
def random_state_dict(cfg: LlavaConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights, scaled so activations and logits stay well spread at any depth (greedy ties are rare)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    # Build the full CLIP (LLaVA only runs part of it, but real checkpoints carry all of it).
    sd = {}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    v = cfg.vision
    for i in range(len(model.vision_tower.vision_model.encoder.layers), v.num_hidden_layers):
        for k, s in list(shapes.items()):
            if k.startswith("vision_tower.vision_model.encoder.layers.0."):
                shapes[k.replace(".layers.0.", f".layers.{i}.")] = s
    shapes["vision_tower.vision_model.post_layernorm.weight"] = (v.hidden_size,)
    shapes["vision_tower.vision_model.post_layernorm.bias"] = (v.hidden_size,)
    for name, shape in shapes.items():
        if cfg.tie_word_embeddings and name == "language_model.lm_head.weight":
            continue
        if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight") \
                or name.endswith("layrnorm.weight") or name.endswith("post_layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name.endswith("lm_head.weight"):
            t = torch.randn(shape, generator=g) * (2.0 / math.sqrt(shape[1]))
        elif len(shape) >= 2 and "embed" not in name:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:  # embeddings, class embedding
            t = torch.randn(shape, generator=g) * 0.5
        sd[name] = t.to(dtype).contiguous()  # cast per tensor: a 7B-shaped fp32 copy would not fit
    return sd


def _rename(sd: dict, layout: str, cfg: LlavaConfig) -> tuple[dict, dict]:
    """(main checkpoint, separate CLIP checkpoint) in the requested key layout."""
    def sub(k, rules):
        for old, new in rules:
            if k.startswith(old):
                return new + k[len(old):]
        return k
    if layout == "hf":
        return sd, {}
    if layout == "hf-new":
        rules = [("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                 ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head.", "lm_head.")]
        return {sub(k, rules): t for k, t in sd.items()}, {}
    rules = [("multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
             ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")]
    main, clip = {}, {}
    for k, t in sd.items():
        if k.startswith("vision_tower."):
            clip[k[len("vision_tower."):]] = t
        else:
            if k.endswith(("embed_tokens.weight", "lm_head.weight")):
                t = t[:cfg.image_token_index].contiguous()  # original LLaVA has no <image>/<pad> rows
            main[sub(k, rules)] = t
    # Parts of a full CLIPModel checkpoint that LLaVA must skip.
    clip["logit_scale"] = torch.tensor(2.6592)
    clip["visual_projection.weight"] = torch.zeros(8, cfg.vision.hidden_size)
    return main, clip


def _save(sd: dict, out: Path, shards: int, dtype: torch.dtype) -> None:
    sd = {k: t.to(dtype) for k, t in sd.items()}
    if shards <= 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(sd)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _hf_config(cfg: LlavaConfig, dtype: str) -> dict:
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": cfg.image_token_index, "pad_token_id": cfg.pad_token_id,
        "projector_hidden_act": "gelu", "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype,
        "image_seq_length": cfg.image_seq_length,
        "text_config": {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                        "num_attention_heads": t.num_attention_heads,
                        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
                        "max_position_embeddings": t.max_position_embeddings, "rope_theta": t.rope_theta,
                        "tie_word_embeddings": cfg.tie_word_embeddings},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "projection_dim": 768},
    }


def _original_config(cfg: LlavaConfig, dtype: str) -> dict:
    t = cfg.text
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "vocab_size": cfg.image_token_index, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta, "hidden_act": "silu", "torch_dtype": dtype,
        "tie_word_embeddings": cfg.tie_word_embeddings, "pad_token_id": 0,
        "mm_vision_tower": "clip-vision", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
        "mm_hidden_size": cfg.vision.hidden_size, "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }


def preprocessor_config(size: int) -> dict:
    """CLIPImageProcessor settings (LLaVA-1.5's) at `size` pixels, as preprocessor_config.json holds them."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True}


def make_tiny_model(out_dir: str | Path, preset: str = "tiny", layout: str = "hf", shards: int = 1,
                    seed: int = 0, dtype: str = "float32", tokenizer: str = "json", **overrides) -> Path:
    """Write a checkpoint directory and return its path. `overrides` use PRESETS' key names."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if layout not in ("hf", "hf-new", "original"):
        raise ValueError(f"unknown layout {layout!r}; choose hf, hf-new or original")
    p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = build_config(p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    main, clip = _rename(random_state_dict(cfg, seed, torch_dtype), layout, cfg)
    _save(main, out, shards, torch_dtype)
    write_tokenizer(out, p["text_vocab"], kind=tokenizer)
    pre = preprocessor_config(cfg.vision.image_size)
    if layout == "original":
        (out / "config.json").write_text(json.dumps(_original_config(cfg, dtype), indent=2))
        clip_dir = out / "clip-vision"
        clip_dir.mkdir(exist_ok=True)
        _save(clip, clip_dir, 1, torch_dtype)
        vcfg = _hf_config(cfg, dtype)["vision_config"]
        (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vcfg}, indent=2))
        (clip_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    else:
        (out / "config.json").write_text(json.dumps(_hf_config(cfg, dtype), indent=2))
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--layout", default="hf", choices=["hf", "hf-new", "original"])
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--tokenizer", default="json", choices=["json", "sentencepiece"])
    for flag, key in [("--text-layers", "text_layers"), ("--hidden", "hidden"), ("--intermediate", "intermediate"),
                      ("--heads", "heads"), ("--kv-heads", "kv_heads"), ("--text-vocab", "text_vocab"),
                      ("--vision-layers", "vision_layers"), ("--vision-hidden", "vision_hidden"),
                      ("--vision-intermediate", "vision_intermediate"), ("--vision-heads", "vision_heads"),
                      ("--image-size", "image_size"), ("--patch-size", "patch_size"),
                      ("--feature-layer", "feature_layer"), ("--max-positions", "max_positions")]:
        ap.add_argument(flag, dest=key, type=int)
    ap.add_argument("--strategy", choices=["default", "full"])
    ap.add_argument("--tie", action="store_true", default=None)
    a = vars(ap.parse_args(argv))
    out = make_tiny_model(a.pop("out_dir"), a.pop("preset"), a.pop("layout"), a.pop("shards"), a.pop("seed"),
                          a.pop("dtype"), a.pop("tokenizer"), **a)
    print(f"wrote random-weight LLaVA checkpoint to {out}")


if __name__ == "__main__":
    main()
