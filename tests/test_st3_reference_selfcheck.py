"""Self-checks of the naive policy reference in tools/fixtures/st3_reference.py (tiny random models, CPU, fp32)."""
from __future__ import annotations

import math

import pytest
import torch

from models.llama import ForwardContext
from models.loader import load_model
from tools.fixtures.st3_reference import (budgets, event_layers, phi, recompute_logits, reference_generate,
                                         resolve_policy, select_top)
from tools.fixtures.make_tiny_model import make_tiny_model

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("st3ref"), preset="tiny", text_layers=8, kv_heads=2, seed=0,
                        image_size=64)
    m = load_model(d)
    assert m.config.image_seq_length == 64 and m.config.text.num_hidden_layers == 8
    return m


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g)


def _prompt(model, n_images: int = 1, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(100 + seed)
    text = lambda k: torch.randint(3, 400, (k,), generator=g).tolist()
    img = [model.config.image_token_index] * model.config.image_seq_length
    ids = [1] + text(5)
    for _ in range(n_images):
        ids += img + text(3)
    return ids + text(6)


def _dense_greedy(model, ids: list[int], pixel_values, max_tokens: int):
    """Greedy decoding by recomputing the dense model.forward over the whole sequence every step."""
    seq, toks, lps = list(ids), [], []
    for _ in range(max_tokens):
        logits = model.forward(torch.tensor([seq]), pixel_values)[0, -1].float()
        tok = int(torch.argmax(logits))
        assert tok != model.config.image_token_index, "fixture generated <image>; pick another prompt"
        toks.append(tok)
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        seq.append(tok)
    return toks, lps


def _visual(model, ids):
    return [i for i, t in enumerate(ids) if t == model.config.image_token_index]


# ---------------------------------------------------------------------------------------------------
# Pure arithmetic.


def test_budgets_defaults():
    g = budgets({"kind": "pvtp"}, 576, 32)
    assert g[:2] == [576, 576]
    assert g[2] == g[3] == 403          # 576*0.7 = 403.2
    assert g[4] == g[5] == 282          # 576*0.49 = 282.24
    assert g[6] == 198                  # 576*0.343 = 197.568
    assert g[8] == 138                  # 576*0.2401 = 138.2976
    assert g[10] == 97                  # 576*0.16807 = 96.80832
    assert g[30] == g[31] == 3          # 576*0.7**15 = 2.73...
    assert budgets({"kind": "st3"}, 576, 32) == g
    assert budgets({"kind": "pvtp", "min_keep": 10}, 576, 32)[30] == 10
    assert budgets({"kind": "fastv"}, 576, 32) == [576, 576] + [288] * 30
    assert budgets({"kind": "full"}, 576, 32) == [576] * 32
    assert budgets({"kind": "fastv"}, 5, 4) == [5, 5, 3, 3]          # 2.5 rounds half up
    assert budgets({"kind": "fastv", "ratio": 1.0}, 5, 4) == [5, 5, 1, 1]  # min_keep
    assert budgets({"kind": "pvtp", "start_layer": 40}, 576, 32) == [576] * 32
    assert budgets({"kind": "pvtp"}, 0, 4) == [0, 0, 1, 1]           # literal max(min_keep, 0)


def test_event_layers():
    assert event_layers({"kind": "pvtp"}, 32) == list(range(2, 32, 2))
    assert event_layers({"kind": "st3", "start_layer": 3, "stride": 5}, 32) == [3, 8, 13, 18, 23, 28]
    assert event_layers({"kind": "fastv"}, 32) == [2]
    assert event_layers({"kind": "fastv", "layer": 32}, 32) == []
    assert event_layers({"kind": "full"}, 32) == []
    for bad in ({"kind": "fastv", "layer": 0}, {"kind": "pvtp", "start_layer": 0}, {"kind": "st3", "stride": 0},
                {"kind": "st3", "anneal_curve": "exp"}, {"kind": "nope"}, {"kind": "pvtp", "ratoi": 0.3}):
        with pytest.raises(ValueError):
            resolve_policy(bad)


def test_phi_curves():
    st3 = {"kind": "st3"}
    assert phi(st3, 0) == 1.0
    assert phi(st3, 1) == pytest.approx(1 - 0.5 / 64)
    assert phi(st3, 32) == pytest.approx(0.75)
    assert phi(st3, 64) == pytest.approx(0.5) and phi(st3, 1000) == pytest.approx(0.5)
    cos = {"kind": "st3", "anneal_curve": "cosine", "anneal_floor": 0.2, "anneal_steps": 10}
    assert phi(cos, 0) == pytest.approx(1.0)
    assert phi(cos, 5) == pytest.approx(0.6)
    assert phi(cos, 3) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 0.3)) / 2)
    assert phi(cos, 10) == pytest.approx(0.2) and phi(cos, 11) == pytest.approx(0.2)
    step = {"kind": "st3", "anneal_curve": "step", "anneal_steps": 4}
    assert [phi(step, t) for t in range(6)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert phi({"kind": "pvtp"}, 100) == 1.0


def test_select_top_ties_to_lower_position():
    assert select_top([5, 3, 9, 7], {5: 0.1, 3: 0.2, 9: 0.2, 7: 0.05}, 2) == [3, 9]
    assert select_top([9, 5, 3, 7], {p: 0.25 for p in (3, 5, 7, 9)}, 3) == [3, 5, 7]
    assert select_top([4, 2], {4: 0.0, 2: 1.0}, 5) == [2, 4]


# ---------------------------------------------------------------------------------------------------
# Against the dense model.


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_full_matches_dense_recompute(model, n_images):
    ids = _prompt(model, n_images, seed=n_images)
    pix = _pixels(n_images) if n_images else None
    want_toks, want_lps = _dense_greedy(model, ids, pix, MAX_TOKENS)
    got = reference_generate(model, ids, pix, {"kind": "full"}, MAX_TOKENS)
    assert got["token_ids"] == want_toks
    assert max(abs(a - b) for a, b in zip(got["logprobs"], want_lps)) < 1e-4
    v = _visual(model, ids)
    assert got["sets"] == [v] * 8 and got["visual_per_layer"] == [len(v)] * 8


def test_prefill_scores_match_module_forward(model):
    """FastV's set at its layer is the top-G of the last row's head-averaged attention at layer-1 of the
    unpruned model; recompute those probabilities through the model's own LlamaDecoderLayer.forward."""
    ids, pix = _prompt(model), _pixels(1)
    lm = model.language_model.model
    rec = {}

    class Recorder(ForwardContext):
        def attend(self, li, q, k, v):
            rep = q.shape[-2] // k.shape[-2]
            k, v = k.repeat_interleave(rep, -2), v.repeat_interleave(rep, -2)
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
            T = q.shape[0]
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            rec[li] = att[:, -1].mean(0)
            return torch.einsum("hqk,khd->qhd", att, v)

    with torch.no_grad():
        h = model.embed(torch.tensor(ids), model.encode_images(pix))
        cos, sin = lm.rotary_emb(torch.arange(len(ids)), h.dtype)
        for layer in lm.layers[:3]:
            h = layer(h, cos, sin, Recorder())
    v = _visual(model, ids)
    for layer_k, ratio in [(1, 0.5), (2, 0.5), (3, 0.75)]:
        res = reference_generate(model, ids, pix, {"kind": "fastv", "layer": layer_k, "ratio": ratio}, 1)
        g = res["budgets"][layer_k]
        order = sorted(v, key=lambda j: (-float(rec[layer_k - 1][j]), j))
        assert res["prefill_sets"][layer_k] == sorted(order[:g])
        assert res["prefill_sets"][:layer_k] == [v] * layer_k


def test_fastv_keeps_all_below_layer(model):
    ids, pix = _prompt(model), _pixels(1)
    v = _visual(model, ids)
    for layer_k in (1, 2, 5):
        res = reference_generate(model, ids, pix, {"kind": "fastv", "layer": layer_k}, 3)
        assert res["visual_per_layer"] == [64] * layer_k + [32] * (8 - layer_k)
        assert res["sets"][:layer_k] == [v] * layer_k
        assert all(s == res["sets"][layer_k] for s in res["sets"][layer_k:])
        assert set(res["sets"][layer_k]) <= set(v)
        assert res["sets"] == res["prefill_sets"]


@pytest.mark.parametrize("policy", [{"kind": "fastv"}, {"kind": "pvtp"}, {"kind": "pvtp", "start_layer": 1,
                                                                          "stride": 3, "ratio": 0.5}])
def test_fastv_pvtp_sets_fixed_after_prefill(model, policy):
    ids, pix = _prompt(model, 2, seed=3), _pixels(2, seed=3)
    res = reference_generate(model, ids, pix, policy, MAX_TOKENS)
    assert res["sets"] == res["prefill_sets"]
    assert res["step_sets"] == [res["prefill_sets"]] * MAX_TOKENS
    G = budgets(policy, 128, 8)
    assert res["visual_per_layer"] == [min(g, 128) for g in G]
    _assert_nested(res["sets"])


@pytest.mark.parametrize("policy", [
    {"kind": "full"}, {"kind": "fastv"}, {"kind": "pvtp"}, {"kind": "pvtp", "start_layer": 1, "stride": 3},
    {"kind": "st3", "anneal_steps": 4}, {"kind": "st3", "anneal_steps": 3, "anneal_curve": "cosine",
                                         "anneal_floor": 0.2, "start_layer": 1, "stride": 3},
    {"kind": "st3", "anneal_steps": 5, "anneal_curve": "step", "ratio": 0.1}])
def test_cached_decode_matches_cache_free_recompute(model, policy):
    """Every cached decode step must equal one cache-free pass over prompt + generated tokens in which
    each row sees the visual keys of the sets its own forward ran with (this checks K/V appends and the
    VTA cache removals against an implementation without a cache)."""
    ids, pix = _prompt(model, 2, seed=3), _pixels(2, seed=3)
    res = reference_generate(model, ids, pix, policy, MAX_TOKENS)
    assert len(res["step_sets"]) == MAX_TOKENS
    logits = recompute_logits(model, ids, pix, res["token_ids"], res["step_sets"])
    assert logits.shape[0] == MAX_TOKENS
    assert torch.argmax(logits, -1).tolist() == res["token_ids"]
    lps = torch.log_softmax(logits, -1)[torch.arange(MAX_TOKENS), torch.tensor(res["token_ids"])].tolist()
    assert max(abs(a - b) for a, b in zip(lps, res["logprobs"])) < 1e-4
    if policy["kind"] == "st3":
        assert res["step_sets"][-1] == res["sets"] and res["sets"] != res["prefill_sets"]


def _assert_nested(sets):
    for l in range(len(sets)):
        for m in range(l + 1, len(sets)):
            assert set(sets[m]) <= set(sets[l]), (l, m)


@pytest.mark.parametrize("curve", ["linear", "cosine", "step"])
def test_st3_vta_removes_and_sets_stay_nested(model, curve):
    ids, pix = _prompt(model), _pixels(1)
    policy = {"kind": "st3", "anneal_steps": 4, "anneal_curve": curve}
    res = reference_generate(model, ids, pix, policy, MAX_TOKENS)
    assert len(res["token_ids"]) == MAX_TOKENS
    pre, end = res["prefill_visual_per_layer"], res["visual_per_layer"]
    G = res["budgets"]
    assert pre == [64, 64] + G[2:]
    assert all(e <= p for e, p in zip(end, pre)) and any(e < p for e, p in zip(end, pre))
    _assert_nested(res["prefill_sets"])
    _assert_nested(res["sets"])
    for l in range(8):
        assert set(res["sets"][l]) <= set(res["prefill_sets"][l])
    # the last decode forward ran with t = MAX_TOKENS - 1 >= anneal_steps, so phi = anneal_floor = 0.5
    for l in event_layers(policy, 8):
        b = max(1, math.floor(G[l] * 0.5 + 0.5))
        assert end[l] <= b
    assert end[2] == max(1, math.floor(G[2] * 0.5 + 0.5))
    # non-event layers share the set of the event layer below them
    assert res["sets"][3] == res["sets"][2] and res["sets"][0] == res["sets"][1] == _visual(model, ids)


def test_st3_without_annealing_equals_pvtp(model):
    ids, pix = _prompt(model), _pixels(1)
    a = reference_generate(model, ids, pix, {"kind": "st3", "anneal_floor": 1.0}, MAX_TOKENS)
    b = reference_generate(model, ids, pix, {"kind": "pvtp"}, MAX_TOKENS)
    assert a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"] and a["sets"] == b["sets"]


def test_st3_first_token_equals_pvtp(model):
    """VTA only acts before decode forwards, so the prefill (first token) is PVTP's."""
    ids, pix = _prompt(model), _pixels(1)
    a = reference_generate(model, ids, pix, {"kind": "st3", "anneal_steps": 1, "anneal_floor": 0.1}, 1)
    b = reference_generate(model, ids, pix, {"kind": "pvtp"}, 1)
    assert a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]
    assert a["sets"] == b["sets"] == a["prefill_sets"]


@pytest.mark.parametrize("kind", ["full", "fastv", "pvtp", "st3"])
def test_text_only_prompt(model, kind):
    ids = _prompt(model, 0, seed=7)
    want, want_lps = _dense_greedy(model, ids, None, 5)
    res = reference_generate(model, ids, None, {"kind": kind, "anneal_steps": 2} if kind == "st3" else {"kind": kind}, 5)
    assert res["token_ids"] == want
    assert max(abs(a - b) for a, b in zip(res["logprobs"], want_lps)) < 1e-4
    assert res["sets"] == [[]] * 8 and res["visual_per_layer"] == [0] * 8


def test_eos_stops_and_is_included(model):
    ids, pix = _prompt(model), _pixels(1)
    full = reference_generate(model, ids, pix, {"kind": "st3", "anneal_steps": 4}, MAX_TOKENS)["token_ids"]
    i = next(i for i in range(1, MAX_TOKENS) if full[i] not in full[:i])
    res = reference_generate(model, ids, pix, {"kind": "st3", "anneal_steps": 4}, MAX_TOKENS, eos_token_id=full[i])
    assert res["token_ids"] == full[:i + 1] and len(res["logprobs"]) == i + 1
    assert reference_generate(model, ids, pix, {"kind": "full"}, 0)["token_ids"] == []


def test_prompt_ending_in_image_rejected_when_pruning(model):
    ids = [1, 5, 6] + [model.config.image_token_index] * 64
    with pytest.raises(ValueError):
        reference_generate(model, ids, _pixels(1), {"kind": "pvtp"}, 1)
    assert len(reference_generate(model, ids, _pixels(1), {"kind": "full"}, 1)["token_ids"]) == 1


def test_st3_vta_schedule_per_step(model):
    """Decode forward i runs with t = i tokens generated: at the first event layer |set| = B(t) exactly."""
    ids, pix = _prompt(model), _pixels(1)
    policy = {"kind": "st3", "anneal_steps": 4}
    res = reference_generate(model, ids, pix, policy, 6)
    g2 = res["budgets"][2]
    assert g2 == 45                                                   # 64 * 0.7 = 44.8
    assert [s[2] for s in res["step_sets"]][0] == res["prefill_sets"][2]
    # t = 1..5: phi = 0.875, 0.75, 0.625, 0.5, 0.5  ->  39.375, 33.75, 28.125, 22.5, 22.5
    assert [len(s[2]) for s in res["step_sets"]] == [45, 39, 34, 28, 23, 23]
    for a, b in zip(res["step_sets"], res["step_sets"][1:]):          # sets only ever shrink
        assert all(set(y) <= set(x) for x, y in zip(a, b))


@pytest.mark.parametrize("policy", [
    {"kind": "st3", "anneal_steps": 4},
    {"kind": "st3", "anneal_steps": 3, "anneal_curve": "cosine", "anneal_floor": 0.2, "start_layer": 1, "stride": 3}])
def test_st3_vta_uses_previous_forward_scores(model, policy):
    """Replay VTA from the recompute path's scores: before decode forward i, for each event layer l in
    ascending order, set(l) keeps the top-B by a_{l-1} of forward i-1, and removals propagate upward."""
    ids, pix = _prompt(model, 2, seed=3), _pixels(2, seed=3)
    res = reference_generate(model, ids, pix, policy, MAX_TOKENS)
    _, scores = recompute_logits(model, ids, pix, res["token_ids"], res["step_sets"], return_scores=True)
    G, events, L = res["budgets"], event_layers(policy, 8), 8
    p = resolve_policy(policy)
    # prefill: set(l) at an event layer is the top-G_l of set(l-1) by the prefill's a_{l-1}
    pre = res["prefill_sets"]
    for l in events:
        assert pre[l] == select_top(pre[l - 1], scores[0][l - 1], G[l])
    for i in range(1, MAX_TOKENS):
        sets = [list(s) for s in res["step_sets"][i - 1]]
        f = phi(policy, i)
        for l in events:
            b = max(p["min_keep"], math.floor(G[l] * f + 0.5))
            kept = select_top(sets[l], scores[i - 1][l - 1], b)
            removed = set(sets[l]) - set(kept)
            for m in range(l, L):
                sets[m] = [j for j in sets[m] if j not in removed]
        assert sets == res["step_sets"][i], i
