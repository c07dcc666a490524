"""models.config / models.loader: every bad checkpoint is a ValueError that names its problem; harmless
extras load; config.json files that leave almost everything to defaults read exactly as transformers
reads them; and tools/fixtures/make_tiny_model.py works from the command line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import load_config
from models.loader import load_model
from tools.fixtures.make_tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(text_layers=2, vision_layers=2)  # small and fast; shapes otherwise the tiny preset's
GATE = "language_model.model.layers.0.mlp.gate_proj.weight"

# The real llava-hf/llava-1.5-7b-hf config.json: almost everything is left to transformers' defaults.
LLAVA_15_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}

# The original haotian-liu/llava-v1.5-7b config.json (a LlamaConfig plus mm_* fields).
LLAVA_15_7B_ORIGINAL = {
    "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
    "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
    "hidden_size": 4096, "image_aspect_ratio": "pad", "initializer_range": 0.02, "intermediate_size": 11008,
    "max_length": 4096, "max_position_embeddings": 4096, "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": False, "use_cache": True, "use_mm_proj": True, "vocab_size": 32000}


@pytest.fixture(scope="session")
def base_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_base")
    return {
        "hf": make_tiny_model(root / "hf", **SMALL),
        "hf-new": make_tiny_model(root / "hf-new", layout="hf-new", **SMALL),
        "original": make_tiny_model(root / "original", layout="original", **SMALL),
        "sharded": make_tiny_model(root / "sharded", shards=2, **SMALL),
    }


@pytest.fixture
def ckpt(base_ckpts, tmp_path):
    """A fresh, writable copy of one of the base checkpoints."""
    def copy(kind="hf"):
        dst = tmp_path / kind
        shutil.copytree(base_ckpts[kind], dst)
        return dst
    return copy


def _edit_config(d: Path, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path: Path, fn):
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _raises(d, *needles):
    with pytest.raises(ValueError) as ei:
        load_model(d)
    msg = str(ei.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error message {msg!r}"
    return msg


# ---- config problems ------------------------------------------------------------------------------

def test_missing_model_dir(tmp_path):
    d = tmp_path / "no-such-model"
    _raises(d, d, "not found")
    with pytest.raises(ValueError, match="model directory not found"):
        load_config(d)


def test_missing_config_json(ckpt):
    d = ckpt()
    (d / "config.json").unlink()
    _raises(d, "config.json", "not found")


def test_invalid_json(ckpt):
    d = ckpt()
    (d / "config.json").write_text('{"model_type": "llava", "text_config": {')
    _raises(d, "config.json", "not valid JSON")


def test_config_not_an_object(ckpt):
    d = ckpt()
    (d / "config.json").write_text("[1, 2, 3]")
    _raises(d, "config.json", "JSON object")


def test_unknown_select_strategy(ckpt):
    d = ckpt()
    _edit_config(d, lambda c: c.update(vision_feature_select_strategy="foo"))
    _raises(d, "vision_feature_select_strategy", "'foo'")


@pytest.mark.parametrize("text_extra, kind", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}}, "llama3"),
])
def test_unsupported_rope_type(ckpt, text_extra, kind):
    d = ckpt()
    _edit_config(d, lambda c: c["text_config"].update(text_extra))
    _raises(d, "rope", repr(kind))


def test_feature_layer_out_of_range(ckpt):
    d = ckpt()
    _edit_config(d, lambda c: c.update(vision_feature_layer=-7))
    _raises(d, "vision_feature_layer", "-7")


# ---- checkpoint problems --------------------------------------------------------------------------

def test_missing_tensor_named(ckpt):
    d = ckpt()
    _edit_weights(d / "model.safetensors", lambda sd: sd.pop(GATE))
    _raises(d, "missing", repr(GATE))


def test_missing_tensor_named_hf_new(ckpt):
    d = ckpt("hf-new")
    _edit_weights(d / "model.safetensors", lambda sd: sd.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    # The message uses the model's (llava-hf legacy) parameter name; the layer and tensor are what matter.
    _raises(d, "missing", "layers.1.mlp.up_proj.weight")


def test_missing_several_tensors_counted(ckpt):
    d = ckpt()
    _edit_weights(d / "model.safetensors", lambda sd: [sd.pop(k) for k in list(sd) if ".layers.1." in k
                                                       and k.startswith("language_model.")])
    _raises(d, "missing", "language_model.model.layers.1.", "more")


def test_missing_lm_head_untied(ckpt):
    d = ckpt()
    _edit_weights(d / "model.safetensors", lambda sd: sd.pop("language_model.lm_head.weight"))
    _raises(d, "missing", "'language_model.lm_head.weight'")


def test_unexpected_tensor_named(ckpt):
    d = ckpt()
    key = "language_model.model.layers.0.self_attn.extra_proj.weight"
    _edit_weights(d / "model.safetensors", lambda sd: sd.update({key: torch.zeros(4, 4)}))
    _raises(d, "unexpected", repr(key), "model.safetensors")


def test_shape_mismatch_names_key_and_both_shapes(ckpt):
    d = ckpt()
    _edit_weights(d / "model.safetensors", lambda sd: sd.update({GATE: torch.zeros(171, 64)}))
    _raises(d, repr(GATE), "(171, 64)", "(172, 64)")


def test_shape_mismatch_from_config(ckpt):
    """The weights are fine but config.json claims another width."""
    d = ckpt()
    _edit_config(d, lambda c: c["text_config"].update(intermediate_size=180))
    msg = _raises(d, "language_model.model.layers.0.mlp.", "has shape")
    assert "172" in msg and "180" in msg, msg


def test_sharded_index_names_missing_shard(ckpt):
    d = ckpt("sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    _raises(d, shard, "missing")


def test_sharded_index_invalid(ckpt):
    d = ckpt("sharded")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _raises(d, "model.safetensors.index.json", "weight_map")


def test_no_weights(ckpt):
    d = ckpt()
    (d / "model.safetensors").unlink()
    _raises(d, "no *.safetensors")


def test_original_without_clip_dir(ckpt):
    d = ckpt("original")
    shutil.rmtree(d / "clip-vision")
    _raises(d, "clip-vision", "not found")


def test_original_clip_missing_tensor(ckpt):
    d = ckpt("original")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    _edit_weights(d / "clip-vision" / "model.safetensors", lambda sd: sd.pop(key))
    _raises(d, "missing", "encoder.layers.0.mlp.fc1.weight")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(ckpt, damage):
    d = ckpt()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x13\x37not a safetensors file" * 64, "truncated": data[: len(data) // 2],
                   "empty": b""}[damage])
    _raises(d, "model.safetensors", "cannot read")


# ---- harmless extras ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, extras", [
    ("hf", {"vision_tower.vision_model.embeddings.position_ids": torch.arange(17)[None],
            "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}),
    ("hf-new", {"model.vision_tower.vision_model.embeddings.position_ids": torch.arange(17)[None],
                "model.language_model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(8)}),
    ("original", {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                  # DeepSpeed-saved LLaVA checkpoints carry a CLIP copy that LLaVA ignores
                  "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding": torch.zeros(48)}),
])
def test_harmless_extras_load(ckpt, base_ckpts, kind, extras):
    d = ckpt(kind)
    _edit_weights(d / "model.safetensors", lambda sd: sd.update(extras))
    if kind == "original":
        _edit_weights(d / "clip-vision" / "model.safetensors",
                      lambda sd: sd.update({"vision_model.embeddings.position_ids": torch.arange(17)[None],
                                           "text_model.embeddings.token_embedding.weight": torch.zeros(3, 4)}))
    ours, ref = load_model(d), load_model(base_ckpts[kind])
    ids = torch.tensor([[1, 10, 20, 30]])
    assert torch.equal(ours(ids), ref(ids))


# ---- config.json read exactly as transformers reads it --------------------------------------------

def _assert_matches_transformers(ours, hf) -> None:
    """Every field of ours against the transformers LlavaConfig object (not hard-coded numbers)."""
    t, ht = ours.text, hf.text_config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "attention_bias", "mlp_bias", "bos_token_id"):
        assert getattr(t, name) == getattr(ht, name), f"text {name}: ours {getattr(t, name)!r} != {getattr(ht, name)!r}"
    rope = ht.rope_parameters
    assert t.rope_theta == rope["rope_theta"]
    assert t.rope_scaling_factor == (1.0 if rope.get("rope_type", "default") == "default" else rope["factor"])
    eos = ht.eos_token_id
    assert t.eos_token_id == ([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    v, hv = ours.vision, hf.vision_config
    for name in v.__dataclass_fields__:
        assert getattr(v, name) == getattr(hv, name), f"vision {name}: ours {getattr(v, name)!r} != {getattr(hv, name)!r}"
    assert ours.image_token_index == hf.image_token_id
    assert ours.projector_hidden_act == hf.projector_hidden_act
    assert ours.projector_bias == hf.multimodal_projector_bias
    assert ours.vision_feature_layer == hf.vision_feature_layer
    assert ours.vision_feature_select_strategy == hf.vision_feature_select_strategy
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    # transformers 5 has no pad_token_id attribute on LlavaConfig unless config.json sets one.
    assert ours.pad_token_id == getattr(hf, "pad_token_id", None)
    assert ours.image_seq_length == hf.image_seq_length
    assert ours.layout == "llava-hf"


def _variants():
    v13 = json.loads(json.dumps(LLAVA_15_7B_HF))
    v13["text_config"].update(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                              num_hidden_layers=40, num_key_value_heads=40, pad_token_id=0)
    rope_legacy = json.loads(json.dumps(LLAVA_15_7B_HF))
    rope_legacy["text_config"].update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0},
                                      num_key_value_heads=8, eos_token_id=[2, 7])
    rope_new = json.loads(json.dumps(LLAVA_15_7B_HF))
    rope_new["text_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}
    multi = dict(LLAVA_15_7B_HF, vision_feature_layer=[-2, -5, 3], vision_feature_select_strategy="full",
                 image_seq_length=577)
    return {"llava-1.5-7b-hf": LLAVA_15_7B_HF, "13b-shaped": v13, "rope-legacy-linear": rope_legacy,
            "rope-parameters-linear": rope_new, "feature-layer-list-full": multi,
            "bare": {"model_type": "llava"}}


@pytest.mark.parametrize("name", list(_variants()))
def test_config_defaults_match_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    raw = _variants()[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_config(tmp_path)
    _assert_matches_transformers(ours, transformers.AutoConfig.from_pretrained(tmp_path))
    _assert_matches_transformers(ours, transformers.LlavaConfig.from_dict(json.loads(json.dumps(raw))))
    # And the same config after a transformers 5 round trip (rope_parameters, dtype, explicit defaults).
    saved = tmp_path / "saved"
    transformers.AutoConfig.from_pretrained(tmp_path).save_pretrained(saved)
    _assert_matches_transformers(load_config(saved), transformers.AutoConfig.from_pretrained(tmp_path))


def test_llava_15_7b_hf_values(tmp_path):
    """The headline numbers, spelled out, on top of the field-by-field comparison above."""
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_7B_HF))
    c = load_config(tmp_path)
    t, v = c.text, c.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 32)
    assert (t.intermediate_size, t.rope_theta, t.rms_norm_eps, t.max_position_embeddings) == (11008, 10000.0, 1e-5, 4096)
    assert (t.head_dim, t.vocab_size, t.rope_scaling_factor) == (128, 32064, 1.0)
    assert (v.hidden_act, v.layer_norm_eps, v.image_size, v.patch_size) == ("quick_gelu", 1e-5, 336, 14)
    assert c.image_seq_length == 576 and c.image_token_index == 32000 and c.pad_token_id == 32001


@pytest.mark.parametrize("tiny", [dict(kv_heads=2), dict(tie=True, strategy="full"), dict(feature_layer=[-1, 1])])
def test_tiny_checkpoint_configs_match_transformers(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    d = make_tiny_model(tmp_path, text_layers=1, vision_layers=2, **tiny)
    _assert_matches_transformers(load_config(d), transformers.AutoConfig.from_pretrained(d))


def test_original_llava_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_7B_ORIGINAL))
    c = load_config(tmp_path)
    assert c.layout == "original"
    ref = transformers.LlamaConfig.from_dict(dict(LLAVA_15_7B_ORIGINAL))
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "bos_token_id"):
        assert getattr(c.text, name) == getattr(ref, name), name
    assert c.text.rope_theta == ref.rope_parameters["rope_theta"] and c.text.rope_scaling_factor == 1.0
    assert c.text.eos_token_id == [2] and c.text.vocab_size == 32000
    # mm_* fields
    assert c.vision_feature_layer == -2 and c.vision_feature_select_strategy == "default"
    assert c.image_aspect_ratio == "pad" and c.projector_bias and c.projector_hidden_act == "gelu"
    assert not 0 <= c.image_token_index < c.text.vocab_size  # a sentinel, never a vocabulary row
    assert Path(c.vision_tower_path) == tmp_path / "openai/clip-vit-large-patch14-336"
    # The hub CLIP tower is not local: its geometry is CLIP ViT-L/14-336, as LlavaConfig's default.
    hv = transformers.LlavaConfig().vision_config
    for name in c.vision.__dataclass_fields__:
        assert getattr(c.vision, name) == getattr(hv, name), name
    assert c.image_seq_length == 576


def test_original_llava_config_variants(tmp_path, base_ckpts):
    raw = dict(LLAVA_15_7B_ORIGINAL, mm_vision_select_feature="cls_patch", mm_vision_select_layer=-1)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = load_config(tmp_path)
    assert c.vision_feature_select_strategy == "full" and c.vision_feature_layer == -1 and c.image_seq_length == 577
    for bad, needle in [({"mm_projector_type": "linear"}, "mm_projector_type"),
                        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
                        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature")]:
        (tmp_path / "config.json").write_text(json.dumps({**LLAVA_15_7B_ORIGINAL, **bad}))
        with pytest.raises(ValueError, match=needle):
            load_config(tmp_path)
    # A local CLIP directory: its (CLIPModel) config.json gives the vision geometry.
    c = load_config(base_ckpts["original"])
    clip = json.loads((base_ckpts["original"] / "clip-vision" / "config.json").read_text())["vision_config"]
    assert (c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.image_size) == \
        (clip["hidden_size"], clip["num_hidden_layers"], clip["image_size"])


# ---- the CLI ----------------------------------------------------------------------------------------

def test_make_tiny_model_cli(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tools.fixtures.make_tiny_model", str(out), "--text-layers", "2",
                        "--kv-heads", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    cfg = load_config(out)
    assert cfg.text.num_hidden_layers == 2 and cfg.text.num_key_value_heads == 2
    assert cfg.text.num_attention_heads == 4
    for f in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert (out / f).exists(), f
    # Same weights as the Python API with the same seed and shape.
    api = make_tiny_model(tmp_path / "api", text_layers=2, kv_heads=2)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(api / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = load_model(out)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg.text.vocab_size)
