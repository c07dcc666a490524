"""The paged, batched engine equals the naive ST3 reference (tools/fixtures/st3_reference.py) for every policy."""
import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams
from tools.fixtures.st3_reference import reference_generate
from tools.fixtures.make_tiny_model import make_tiny_model

POLICIES = [
    ("full", {}),
    ("fastv", {}),
    ("fastv", {"layer": 3, "ratio": 0.7, "min_keep": 5}),
    ("pvtp", {}),
    ("pvtp", {"start_layer": 1, "stride": 3, "ratio": 0.5, "min_keep": 3}),
    ("st3", {"anneal_steps": 4}),
    ("st3", {"start_layer": 3, "stride": 1, "ratio": 0.2, "anneal_steps": 3, "anneal_floor": 0.1,
             "anneal_curve": "cosine", "min_keep": 2}),
    ("st3", {"anneal_steps": 5, "anneal_floor": 0.3, "anneal_curve": "step"}),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(POLICIES)]
MAX_TOKENS = [14, 6, 10, 12]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("st3") / "m", text_layers=8, kv_heads=2, image_size=64, seed=3)


@pytest.fixture(scope="module")
def requests_():
    g = torch.Generator().manual_seed(0)
    img = lambda w, h: Image.fromarray(  # noqa: E731
        (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
    return [
        {"prompt": "USER: <image>\nWhat is in the picture? ASSISTANT:", "image": img(70, 50)},
        {"prompt": "Plain text, no picture at all here."},
        {"prompt": "USER: <image>\nDescribe the colours you see in detail. ASSISTANT:", "image": img(40, 90)},
        {"prompt": "USER: <image> and <image>\nCompare them. ASSISTANT:", "images": [img(64, 64), img(33, 77)]},
    ]


_REF_CACHE = {}


def _reference(llm, req, kind, params, max_tokens):
    key = (id(llm.model_dir), repr(req["prompt"]), kind, tuple(sorted(params.items())), max_tokens)
    if key not in _REF_CACHE:
        p = llm.processor.process(req)
        _REF_CACHE[key] = reference_generate(llm.model, p.prompt_ids, p.pixel_values, {"kind": kind, **params},
                                             max_tokens)
    return _REF_CACHE[key]


def _check(llm, outs, reqs, kind, params, max_tokens=MAX_TOKENS):
    for req, out, n in zip(reqs, outs, max_tokens):
        ref = _reference(llm, req, kind, params, n)
        assert out.token_ids == ref["token_ids"], req["prompt"]
        got = [entry[t] for entry, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(got, ref["logprobs"])) < 1e-3
        if "image" in req or "images" in req:
            assert out.stats["visual_tokens_per_layer"] == ref["visual_per_layer"]


def _params(max_tokens=MAX_TOKENS):
    return [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0) for n in max_tokens]


@pytest.mark.parametrize("kind,params", POLICIES, ids=IDS)
def test_batched_equals_reference(model_dir, requests_, kind, params):
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=600, max_images_per_prompt=2)
    outs = llm.generate(requests_, _params())
    _check(llm, outs, requests_, kind, params)
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]


@pytest.mark.parametrize("kind,params", POLICIES[::2], ids=IDS[::2])
def test_solo_equals_reference(model_dir, requests_, kind, params):
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=600, max_images_per_prompt=2)
    outs = [llm.generate([req], p)[0] for req, p in zip(requests_, _params())]
    _check(llm, outs, requests_, kind, params)
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]


@pytest.mark.parametrize("kind,params", [POLICIES[0], POLICIES[3], POLICIES[5], POLICIES[6]],
                         ids=[IDS[0], IDS[3], IDS[5], IDS[6]])
def test_preemption_equals_reference(model_dir, requests_, kind, params):
    reqs = [requests_[0], requests_[2], requests_[2], requests_[0]]
    probe = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=2000, block_size=4)
    need = [probe.scheduler.prefill_blocks(probe._seqs[probe.add_request(r)]) for r in reqs]
    # The first two prompts fit, their growth does not: the newer one is preempted and recomputed.
    layers = probe.model_config.text.num_hidden_layers
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=need[0] + need[1] + layers,
              block_size=4)
    # Long enough that growth outruns what VTA frees.
    max_tokens = [40, 24, 30, 36]
    outs = llm.generate(reqs, _params(max_tokens))
    assert sum(o.stats["preemptions"] for o in outs) > 0
    _check(llm, outs, reqs, kind, params, max_tokens)
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]


def test_st3_score_buffers_bound_the_images(model_dir, requests_):
    """ST3's static decode score rows hold max_images_per_prompt images; a bigger prompt is refused up front."""
    from engine.errors import RequestError
    llm = LLM(model_dir, policy="st3", num_kv_blocks=600)
    with pytest.raises(RequestError, match="max_images_per_prompt"):
        llm.add_request(requests_[3])
    assert LLM(model_dir, policy="full", num_kv_blocks=600).generate([requests_[3]], _params([2]))[0].token_ids


def test_answers_that_end_inside_the_anneal(model_dir, requests_):
    """The eviction a forward runs for the next token is not counted when no next token comes: a request
    that stops mid-anneal reports the visual sets its last forward attended, as the reference does."""
    kind, params = "st3", {"anneal_steps": 8, "anneal_floor": 0.0}
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=600, max_images_per_prompt=2)
    reqs, lengths = [requests_[0], requests_[2], requests_[0], requests_[3]], [1, 2, 3, 5]
    _check(llm, llm.generate(reqs, _params(lengths)), reqs, kind, params, lengths)
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]


def test_short_move_lists_are_redone_with_the_safe_cap(model_dir, requests_, monkeypatch):
    """A decode eviction whose moves outgrow the length sized from the host's estimate changes nothing,
    is redone with the worst-case bound, and the answers still equal the reference."""
    from engine.model_runner import ModelRunner
    monkeypatch.setattr(ModelRunner, "move_cap", lambda self, expected: 1)
    kind, params = "st3", {"start_layer": 1, "stride": 1, "anneal_steps": 6, "anneal_floor": 0.2}
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=600, max_images_per_prompt=2)
    reqs = requests_[:3]
    _check(llm, llm.generate(reqs, _params(MAX_TOKENS[:3])), reqs, kind, params, MAX_TOKENS[:3])
    assert llm.runner.eviction_retries > 0
