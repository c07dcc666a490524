"""Our LLaVA model (and engine) against transformers' LlavaForConditionalGeneration on the same checkpoint.

Every case writes a seeded random-weight checkpoint with tools/fixtures/make_tiny_model.py, loads it with our
loader and with `transformers.LlavaForConditionalGeneration.from_pretrained`, and compares in fp32:
  * the selected CLIP hidden states (CLS included, before the projector),
  * the projected image features (and the projector alone on the same input),
  * the dense prefill logits of a prompt with an image,
  * 8 greedy tokens from `engine.LLM.generate` against HF `generate(do_sample=False)`.
The original-LLaVA layout cannot be read by transformers; it is compared with the HF model of the same
seed and shape in the llava-hf layout, over the vocabulary rows both share (`[..., :text_vocab]`).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from engine import LLM, SamplingParams  # noqa: E402
from models.config import load_config  # noqa: E402
from models.loader import load_model  # noqa: E402
from tools.fixtures.make_tiny_model import PRESETS, make_tiny_model  # noqa: E402

ATOL = 1e-4
TEXT_VOCAB = PRESETS["tiny"]["text_vocab"]
PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"
# A 336px / patch-14 CLIP (576 patches, as in LLaVA-1.5) kept narrow and shallow so it stays fast.
VIT336 = dict(image_size=336, patch_size=14, vision_hidden=32, vision_intermediate=64, vision_layers=2,
              vision_heads=2)
LINEAR_ROPE_LEGACY = {"rope_scaling": {"type": "linear", "factor": 2.0}}
LINEAR_ROPE_PARAMS = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}

# name -> (make_tiny_model kwargs, text_config additions written into config.json afterwards)
CASES = {
    "mha": (dict(), None),
    "gqa": (dict(kv_heads=2), None),
    "vit336": (dict(VIT336), None),
    "vit336-full": (dict(VIT336, strategy="full"), None),
    "feature-layer-last": (dict(feature_layer=-1), None),
    "feature-layer-list": (dict(feature_layer=[-1, 1]), None),
    "tied": (dict(tie=True), None),
    "hf-new": (dict(layout="hf-new"), None),
    "original": (dict(layout="original"), None),
    "sharded": (dict(shards=3), None),
    "sharded-hf-new": (dict(layout="hf-new", shards=3), None),
    "rope-linear-legacy": (dict(), LINEAR_ROPE_LEGACY),
    "rope-linear-params": (dict(), LINEAR_ROPE_PARAMS),
}


class Case:
    """One checkpoint, loaded by us, by transformers and by the engine."""

    def __init__(self, name, ckpt_dir, hf_dir, kwargs):
        self.name, self.dir, self.kwargs = name, ckpt_dir, kwargs
        self.original = kwargs.get("layout") == "original"
        self.cfg = load_config(ckpt_dir)
        self.ours = load_model(ckpt_dir, "cpu", torch.float32)
        self.hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        # Enough KV blocks for every layer of the longest (577 visual tokens) prompt plus decode.
        self.llm = LLM(ckpt_dir, num_kv_blocks=512)
        size = self.cfg.vision.image_size
        rng = np.random.RandomState(0)
        self.images = [Image.fromarray(rng.randint(0, 256, (size + 9, size + 23, 3), dtype=np.uint8)),
                       Image.fromarray(rng.randint(0, 256, (size * 2, size, 3), dtype=np.uint8))]
        self.request = {"prompt": PROMPT, "image": self.images[0]}
        self.processed = self.llm.processor.process(self.request)
        self.pixels = torch.cat([self.llm.processor.process({"prompt": "<image>", "image": im}).pixel_values
                                 for im in self.images])

    def hf_ids(self, ids: list[int]) -> torch.Tensor:
        """Our prompt ids with our image id swapped for HF's (they differ only for the original layout)."""
        hf_image = self.hf.config.image_token_id
        return torch.tensor([[hf_image if t == self.cfg.image_token_index else t for t in ids]])


def _write_checkpoint(root, name, kwargs, text_extra):
    d = make_tiny_model(root / name, seed=0, **kwargs)
    if text_extra is not None:
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["text_config"].update(text_extra)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return d


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, ckpt_root):
    kwargs, text_extra = CASES[request.param]
    d = _write_checkpoint(ckpt_root, request.param, kwargs, text_extra)
    hf_dir = d
    if kwargs.get("layout") == "original":  # transformers cannot read it: same seed + shape, llava-hf keys
        hf_dir = ckpt_root / "original-hf-reference"
        if not hf_dir.exists():
            make_tiny_model(hf_dir, seed=0, **{**kwargs, "layout": "hf"})
    return Case(request.param, d, hf_dir, kwargs)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs HF {tuple(ref.shape)}"
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max abs difference {err:.3g} > {ATOL}"


def test_config_matches_hf(case):
    hf_cfg = case.hf.config
    layers = hf_cfg.vision_feature_layer
    assert case.cfg.feature_layers == ([layers] if isinstance(layers, int) else list(layers))
    assert case.cfg.vision_feature_select_strategy == hf_cfg.vision_feature_select_strategy
    # make_tiny_model writes HF's image_seq_length; ours is computed from the geometry.
    assert case.cfg.image_seq_length == hf_cfg.image_seq_length
    expected = {"vit336": 576, "vit336-full": 577}.get(case.name)
    if expected is not None:
        assert case.cfg.image_seq_length == expected
    assert case.processed.prompt_ids.count(case.cfg.image_token_index) == case.cfg.image_seq_length
    assert case.processed.num_visual == case.cfg.image_seq_length


@torch.no_grad()
def test_vision_features(case):
    """Selected CLIP hidden states (CLS included), concatenated over feature layers, before the projector."""
    ours = case.ours.vision_tower(case.pixels)
    out = case.hf.model.vision_tower(case.pixels, output_hidden_states=True)
    layers = case.cfg.feature_layers
    ref = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
    n_patches = case.cfg.vision.num_patches
    assert ours.shape == (2, n_patches + 1, case.cfg.vision.hidden_size * len(layers))
    _assert_close(ours, ref, "vision tower features")


@torch.no_grad()
def test_projector_output(case):
    ours = case.ours.encode_images(case.pixels)
    ref = torch.stack(list(case.hf.model.get_image_features(pixel_values=case.pixels).pooler_output))
    assert ours.shape == (2, case.cfg.image_seq_length, case.cfg.text.hidden_size)
    _assert_close(ours, ref, "projected image features")
    # The projector alone, on the same input.
    x = torch.randn(3, 5, case.ours.multi_modal_projector.linear_1.in_features, generator=torch.Generator().manual_seed(1))
    _assert_close(case.ours.multi_modal_projector(x), case.hf.model.multi_modal_projector(x), "projector")


@torch.no_grad()
def test_prefill_logits(case):
    ids = case.processed.prompt_ids
    ours = case.ours(torch.tensor([ids]), case.processed.pixel_values)
    hf_ids = case.hf_ids(ids)
    ref = case.hf(input_ids=hf_ids, pixel_values=case.processed.pixel_values,
                  attention_mask=torch.ones_like(hf_ids)).logits
    if case.original:  # no <image>/<pad> rows in the original vocabulary
        assert ours.shape[-1] == TEXT_VOCAB
        ref = ref[..., :TEXT_VOCAB]
    else:
        assert ours.shape[-1] == case.hf.config.text_config.vocab_size
    _assert_close(ours, ref, "prefill logits")
    # Batched text-only rows too (no image, two sequences). Without pixels an in-vocabulary <image> / <pad>
    # id (one the model generated, say) is an ordinary token: it embeds its own row, as in transformers.
    special = [7, 7] if case.original else [TEXT_VOCAB, TEXT_VOCAB + 1]
    text = torch.tensor([[1, 5, 9, 13, 100, 200, 300], [1, 7, special[0], 7, special[1], 43, 44]])
    ref = case.hf(input_ids=text, attention_mask=torch.ones_like(text)).logits[..., :ours.shape[-1]]
    _assert_close(case.ours(text), ref, "text-only logits")


def test_greedy_tokens_match_hf(case):
    out = case.llm.generate(case.request, SamplingParams(max_tokens=8, temperature=0))[0]
    ids = case.hf_ids(case.processed.prompt_ids)
    extra = {}
    if case.original:  # HF's vocab has <image>/<pad> (and padding) rows the original checkpoint lacks
        extra["suppress_tokens"] = list(range(TEXT_VOCAB, case.hf.config.text_config.vocab_size))
    eos = sorted(case.llm.eos_ids)
    gen = case.hf.generate(input_ids=ids, pixel_values=case.processed.pixel_values,
                           attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           eos_token_id=eos, pad_token_id=case.hf.config.pad_token_id, **extra)
    ref = gen[0, ids.shape[1]:].tolist()
    assert out.token_ids == ref, f"engine greedy {out.token_ids} != HF greedy {ref}"
    # Our stop: at EOS with "stop" (the EOS token kept), else after max_tokens with "length".
    assert out.finish_reason == ("stop" if out.token_ids[-1] in eos else "length"), out.finish_reason
    assert len(out.token_ids) == 8 or out.finish_reason == "stop"


def test_linear_rope_scaling_is_applied(ckpt_root):
    """The rope cases must really differ from the unscaled model (else their parity proves nothing)."""
    base = _write_checkpoint(ckpt_root, "rope-base", {}, None)
    scaled = ckpt_root / "rope-scaled-copy"
    if not scaled.exists():
        shutil.copytree(base, scaled)
        cfg = json.loads((scaled / "config.json").read_text())
        cfg["text_config"].update(LINEAR_ROPE_PARAMS)
        (scaled / "config.json").write_text(json.dumps(cfg))
    assert load_config(base).text.rope_scaling_factor == 1.0
    assert load_config(scaled).text.rope_scaling_factor == 2.0
    ids = torch.tensor([[1] + list(range(10, 40))])
    a, b = load_model(base)(ids), load_model(scaled)(ids)
    assert torch.equal(a[:, 0], b[:, 0])  # position 0 is not rotated
    assert (a - b).abs().max().item() > 1e-2


@torch.no_grad()
def test_fused_projections_are_views_and_change_nothing(ckpt_root):
    """load_model stacks q/k/v and gate/up (fewer, larger decode matmuls) without copying or renaming."""
    from models.loader import load_model
    d = _write_checkpoint(ckpt_root, "fuse", {"kv_heads": 2}, None)
    model = load_model(d)
    attn, mlp = model.language_model.model.layers[0].self_attn, model.language_model.model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv[0].untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up[0].untyped_storage().data_ptr()
    assert torch.equal(attn.qkv[0][-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
    assert "language_model.model.layers.0.self_attn.k_proj.weight" in model.state_dict()
    ids = torch.tensor([[1, 5, 9, 13, 100, 200, 300]])
    fused = model(ids)
    for layer in model.language_model.model.layers:
        layer.self_attn.qkv = layer.mlp.gate_up = None   # back to one matmul per projection
    torch.testing.assert_close(fused, model(ids), rtol=1e-5, atol=1e-5)
