"""Hostile inputs found by fuzzing: each is refused up front with the engine's ValueError-family error
naming the field (or, for top_k past the vocabulary, simply means "no limit"), and seeds use all their bits.
"""
from __future__ import annotations

import io
import json
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

from engine import LLM, RequestError, SamplingParams
from models.config import ConfigError, load_config
from models.image import MAX_ASPECT_RATIO, ImageError, load_image
from tools.fixtures.make_tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=2, image_size=32)
    return SimpleNamespace(tmp=tmp, model=model, llm=LLM(model, num_kv_blocks=256))


def assert_all_free(llm: LLM) -> None:
    s = llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"], s


def sampled(llm: LLM, **kw) -> list[int]:
    kw = {"temperature": 1.0, **kw}
    return llm.generate("Once upon a time", SamplingParams(max_tokens=12, ignore_eos=True, **kw))[0].token_ids


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 2 ** 64, 2 ** 70, 1.5, True])
def test_seed_out_of_range_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        SamplingParams(seed=seed)


def test_seeds_use_all_their_bits(env):
    # Only the low 32 bits used to reach the noise hash: 5 and 5 + 2**32 drew the same tokens.
    low, high, top = (sampled(env.llm, seed=s) for s in (5, 5 + 2 ** 32, 5 + 2 ** 62))
    assert low != high and low != top and high != top
    assert sampled(env.llm, seed=5 + 2 ** 32) == high and sampled(env.llm, seed=2 ** 63 - 1)  # reproducible, max ok
    assert_all_free(env.llm)


def test_top_k_past_the_vocabulary_means_no_limit(env):
    vocab = env.llm.model_config.text.vocab_size
    off = sampled(env.llm, seed=7)
    for k in (vocab, vocab + 1, 2 ** 64):
        assert sampled(env.llm, seed=7, top_k=k) == off, k
    assert sampled(env.llm, seed=7, top_k=1) == sampled(env.llm, seed=7, temperature=0.0)


def test_logprobs_beyond_the_vocabulary_is_refused_at_add_request(env):
    vocab = env.llm.model_config.text.vocab_size
    with pytest.raises(RequestError, match=f"logprobs={vocab + 1} exceeds the vocabulary size {vocab}"):
        env.llm.add_request("hello", SamplingParams(logprobs=vocab + 1))
    out = env.llm.generate("hello", SamplingParams(max_tokens=2, logprobs=vocab))[0]
    assert len(out.logprobs[0]) == vocab
    assert not env.llm.has_unfinished()
    assert_all_free(env.llm)


@pytest.mark.parametrize("stop", [123, 1.5, {"a": 1}, ["ok", 3], [""]])
def test_stop_must_be_strings(stop):
    with pytest.raises(ValueError, match="SamplingParams.stop must be"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("prompt", ["caf\udce9", "\ud800 lone high surrogate"])
def test_prompt_that_is_not_unicode_is_refused(env, prompt):
    with pytest.raises(RequestError, match="'prompt' is not valid Unicode"):
        env.llm.add_request({"prompt": prompt})
    assert not env.llm.has_unfinished()


@pytest.mark.parametrize("where, field, value, message", [
    ("text_config", "hidden_size", "sixty-four", "text hidden_size must be a positive integer"),
    ("text_config", "num_hidden_layers", -2, "text num_hidden_layers must be a positive integer"),
    ("text_config", "rms_norm_eps", "tiny", "text rms_norm_eps must be a positive number"),
    ("vision_config", "patch_size", 0, "vision patch_size must be a positive integer"),
    ("vision_config", "image_size", 33.5, "vision image_size must be a positive integer"),
    (None, "image_token_index", "img", "image_token_index must be an integer"),
    (None, "text_config", "llama", "text_config must be an object"),
])
def test_config_fields_of_wrong_type_or_range_raise_config_error(env, where, field, value, message):
    d = env.tmp / f"bad-{where}-{field}"
    shutil.copytree(env.model, d, dirs_exist_ok=True)
    cfg = json.loads((d / "config.json").read_text())
    (cfg[where] if where else cfg)[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        load_config(d)


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size, message", [
    ((1, 300_000), "aspect ratio over"),
    ((300_000, 1), "aspect ratio over"),
    ((MAX_ASPECT_RATIO * 10 + 1, 10), "aspect ratio over"),
    ((9_000, 9_000), "the limit is 50,000,000 pixels"),   # a decompression bomb: a few KB of PNG
    ((10_001, 4_000), "10,000 pixels a side")])
def test_oversized_images_are_refused_from_the_header(env, size, message):
    data = _png(size, mode="1")
    assert len(data) < 200_000
    with pytest.raises(ImageError, match=message):
        load_image(data)
    with pytest.raises(RequestError, match=message):
        env.llm.add_request({"prompt": "USER: <image>\nhi ASSISTANT:", "image": data})
    assert not env.llm.has_unfinished()


def test_images_at_the_limits_are_accepted():
    assert load_image(_png((MAX_ASPECT_RATIO * 10, 10))).size == (MAX_ASPECT_RATIO * 10, 10)
