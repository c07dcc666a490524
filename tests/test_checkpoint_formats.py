"""Checkpoints in every key spelling and file format load, and give transformers' logits.

One tiny random transformers LlavaForConditionalGeneration (fp32) is written by the installed transformers'
own save_pretrained, and from its state_dict in each spelling older versions wrote (4.x hub files, the
4.52-4.57 save, the original LLaVA release with its CLIP in a separate directory), as safetensors and as
PyTorch .bin (single and sharded). Each is loaded by our loader and its logits on a prompt with an image
are compared with transformers' forward. make_tiny_model checkpoints converted to .bin must load to
exactly the same weights as their safetensors. Pickles holding anything but tensors are refused.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loader import CheckpointError, load_model
from tools.fixtures.make_tiny_model import make_tiny_model

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN, VOCAB, IMAGE_SEQ = 120, 128, 4  # 16 px / patch 8 -> 4 patches, CLS dropped
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=8)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _hf_model(tie: bool = False):
    cfg = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**TEXT, tie_word_embeddings=tie),
                                   vision_config=transformers.CLIPVisionConfig(**VISION),
                                   image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_SEQ, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    # transformers' init (std 0.02, unit norms) gives near-zero logits; spread the weights so a wrong
    # mapping could not hide under the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1 and name.endswith("weight") and "embed" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.5)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = [1, 7, *[IMAGE_TOKEN] * IMAGE_SEQ, 9, 33, 57, 2, 100]
    return torch.tensor([ids]), torch.randn(1, 3, 16, 16, generator=g)


@pytest.fixture(scope="module")
def hf():
    """(model, reference logits) of the untied model."""
    model = _hf_model()
    ids, pixels = _inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    assert logits.std() > 0.5  # a meaningful scale for an absolute tolerance of 1e-4
    return model, logits


def _check(model_dir, ref_logits, image_id=IMAGE_TOKEN):
    ids, pixels = _inputs()
    ours = load_model(model_dir)(ids.masked_fill(ids == IMAGE_TOKEN, image_id), pixels)
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=1e-4)


def _rename(sd: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for k, t in sd.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = t
    return out


def _write(d, model, sd: dict, fmt: str = "safetensors", shards: int = 1):
    """model's config.json plus `sd` in the given format (bin files as transformers 4.x named them)."""
    d.mkdir(parents=True)
    model.config.save_pretrained(d)
    sd = {k: t.detach().clone().contiguous() for k, t in sd.items()}
    if fmt == "safetensors":
        save_file(sd, str(d / "model.safetensors"))
    elif shards == 1:
        torch.save(sd, d / "pytorch_model.bin")
    else:
        keys, weight_map = sorted(sd), {}
        per = math.ceil(len(keys) / shards)
        for i in range(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: sd[k] for k in keys[i * per:(i + 1) * per]}, d / name)
            weight_map.update({k: name for k in keys[i * per:(i + 1) * per]})
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


# Spellings of the transformers 5 state_dict keys (model.language_model.*, model.vision_tower.embeddings.*,
# model.multi_modal_projector.*, lm_head.*) as each version wrote them.
HUB_4X = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
          ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]
SAVE_452 = [("model.vision_tower.", "model.vision_tower.vision_model.")]
SPELLINGS = {"state_dict": [], "hub-4.x": HUB_4X, "save-4.52": SAVE_452}


def test_save_pretrained_of_installed_transformers(hf, tmp_path):
    model, ref = hf
    model.save_pretrained(tmp_path / "saved")
    _check(tmp_path / "saved", ref)


def test_save_pretrained_tied(tmp_path):
    model = _hf_model(tie=True)
    model.save_pretrained(tmp_path / "tied")
    ids, pixels = _inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    _check(tmp_path / "tied", ref)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("fmt, shards", [("safetensors", 1), ("bin", 1), ("bin", 3)])
def test_every_spelling_and_format(hf, tmp_path, spelling, fmt, shards):
    model, ref = hf
    sd = _rename(model.state_dict(), SPELLINGS[spelling])
    _check(_write(tmp_path / "ckpt", model, sd, fmt, shards), ref)


def _original(tmp_path, model, fmt: str, clip_spelling: str):
    """The original LLaVA release: Llama + mm_projector keys, CLIP (a CLIPModel checkpoint) beside it."""
    sd = model.state_dict()
    main = _rename({k: t for k, t in sd.items() if not k.startswith("model.vision_tower.")},
                   [("model.language_model.", "model."),
                    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")])
    clip = {k[len("model.vision_tower."):]: t for k, t in sd.items() if k.startswith("model.vision_tower.")}
    if clip_spelling == "clip-4.x":
        clip = {"vision_model." + k: t for k, t in clip.items()}
        clip.update({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 8),
                     "logit_scale": torch.tensor(2.6), "visual_projection.weight": torch.zeros(8, 32)})
    d = _write(tmp_path / "llava", model, main, fmt, shards=2 if fmt == "bin" else 1)
    t = model.config.text_config
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": VOCAB,
        **{k: getattr(t, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")},
        "hidden_act": "silu", "torch_dtype": "float32", "mm_vision_tower": "clip", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
        "image_aspect_ratio": "pad"}))
    clip_dir = _write(d / "clip", model, clip, fmt)
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": VISION}))
    return d


@pytest.mark.parametrize("fmt, clip_spelling", [("bin", "clip-4.x"), ("safetensors", "clip-5.x")])
def test_original_llava_with_separate_clip(hf, tmp_path, fmt, clip_spelling):
    model, ref = hf
    _check(_original(tmp_path, model, fmt, clip_spelling), ref, image_id=-200)


@pytest.mark.parametrize("layout", ["hf", "hf-new", "original"])
def test_make_tiny_model_as_bin_loads_the_same_weights(tmp_path, layout):
    src = make_tiny_model(tmp_path / "st", layout=layout, text_layers=2, vision_layers=2, shards=2)
    dst = shutil.copytree(src, tmp_path / "bin")
    for d in [dst] + ([dst / "clip-vision"] if layout == "original" else []):
        index = d / "model.safetensors.index.json"
        weight_map = {}
        for f in sorted(d.glob("*.safetensors")):
            sd = load_file(str(f))
            torch.save(sd, d / f.name.replace("model", "pytorch_model").replace(".safetensors", ".bin"))
            weight_map.update({k: f.name.replace("model", "pytorch_model").replace(".safetensors", ".bin") for k in sd})
            f.unlink()
        if index.exists():
            index.unlink()
            (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_model(src).state_dict(), load_model(dst).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- refusals ---------------------------------------------------------------------------------------

class Payload:
    """Unpickling this would run code (create a file); weights_only must refuse it before that."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def bin_ckpt(tmp_path):
    src = make_tiny_model(tmp_path / "st", text_layers=1, vision_layers=2)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    return src, sd


def test_pickle_with_an_object_is_refused_unexecuted(bin_ckpt, tmp_path):
    d, sd = bin_ckpt
    marker = tmp_path / "executed"
    torch.save({**sd, "evil": Payload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: .*object other than tensors") as e:
        load_model(d)
    assert "\n" not in str(e.value) and not marker.exists()


def test_pickle_with_a_non_tensor_value_is_refused(bin_ckpt):
    d, sd = bin_ckpt
    torch.save({**sd, "step": 1000}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"entry 'step' is a int, not a tensor"):
        load_model(d)


def test_damaged_bin(bin_ckpt):
    d, _ = bin_ckpt
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read PyTorch checkpoint"):
        load_model(d)


def test_legacy_non_zip_bin_loads(bin_ckpt):
    d, sd = bin_ckpt
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(load_model(d).state_dict()[next(iter(sd))], sd[next(iter(sd))])


def test_unexpected_and_duplicate_keys_in_bin(bin_ckpt):
    d, sd = bin_ckpt
    torch.save({**sd, "language_model.model.layers.0.extra.weight": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'language_model\.model\.layers\.0\.extra\.weight'"):
        load_model(d)
    head = sd["language_model.lm_head.weight"]
    torch.save({**sd, "lm_head.weight": head}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'language_model\.lm_head\.weight' and 'lm_head\.weight' both name"):
        load_model(d)
