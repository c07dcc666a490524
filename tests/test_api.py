"""The public API on tiny random models: batching parity with transformers, preemption, streaming,
abort, seeded sampling, stop conditions, logprobs and every kind of bad input.

Every test that builds an LLM ends with all KV blocks back in the pool.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams
from scheduler.policy import PVTP, ST3, FastV, Full
from tools.fixtures.make_tiny_model import make_tiny_model

BIG = 512  # KV blocks: plenty for every workload here
GREEDY = dict(temperature=0.0, ignore_eos=True)  # transformers' generation_config has no EOS either


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=4, image_size=32)
    a, b = tmp / "a.png", tmp / "b.png"
    Image.effect_noise((48, 40), 80).convert("RGB").save(a)
    Image.linear_gradient("L").resize((30, 50)).convert("RGB").save(b)
    llm = LLM(model, num_kv_blocks=BIG)
    ask = llm.tokenizer.chat_prompt
    reqs = {"a": {"prompt": ask("Describe the image.", 1), "image": str(a)},
            "b": {"prompt": ask("What colour is the thing on the left of this long picture?", 1), "image": str(b)},
            "t": {"prompt": ask("Tell me a story about a dragon and a knight.", 0)},
            "s": {"prompt": "Once upon a time"}}
    return SimpleNamespace(model=model, tmp=tmp, a=str(a), b=str(b), reqs=reqs, llm=llm, tok=llm.tokenizer)


def new_llm(env, num_kv_blocks=BIG, **kw) -> LLM:
    return LLM(env.model, num_kv_blocks=num_kv_blocks, **kw)


def assert_all_free(llm: LLM) -> None:
    s = llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"], s


def kv_peak_bounds(llm: LLM, out) -> tuple[int, int]:
    """A request's KV blocks from its policy's budgets: after its prefill, and with every generated token
    but the last in the cache (the peak without VTA, which only lowers it)."""
    L, bs, s = llm.model_config.text.num_hidden_layers, llm.cache.block_size, out.stats
    budgets = llm.policy.budgets(s["visual_tokens"], L)
    blocks = lambda extra: sum(-(-(s["text_prompt_tokens"] + g + extra) // bs) for g in budgets)  # noqa: E731
    return blocks(0), blocks(s["generated_tokens"] - 1)


def solo(env, req, params, **kw):
    llm = new_llm(env, **kw)
    out = llm.generate(req, params)[0]
    assert_all_free(llm)
    return out


@pytest.fixture(scope="module")
def hf(env):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.LlavaForConditionalGeneration.from_pretrained(env.model, dtype=torch.float32).eval()


def decode(env, ids):
    """The tokenizer's text for ids; ids of lm_head's padding rows (past the tokenizer) have none."""
    return env.tok.decode([i for i in ids if i < env.tok.vocab_size])


def hf_inputs(env, req):
    p = env.llm.processor.process(req)
    ids = torch.tensor([p.prompt_ids])
    return ids, ({} if p.pixel_values is None else {"pixel_values": p.pixel_values})


# ---- batching ------------------------------------------------------------------------------------
def test_batch_matches_solo_and_transformers(env, hf):
    names, max_tokens = ["a", "t", "b"], [9, 6, 12]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens]
    llm = new_llm(env)
    batched = llm.generate([env.reqs[k] for k in names], params)
    assert_all_free(llm)
    for name, n, p, out in zip(names, max_tokens, params, batched):
        assert out.finish_reason == "length" and len(out.token_ids) == n
        assert out.token_ids == solo(env, env.reqs[name], p).token_ids, name
        ids, extra = hf_inputs(env, env.reqs[name])
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, **extra)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), name


# ---- a pool too small: queueing and preemption ---------------------------------------------------
WORKLOAD = [("s", 60), ("t", 30), ("s", 50), ("a", 12), ("s", 40)]  # (request, max_tokens)


def _need(llm, req, max_tokens):
    n = len(llm.processor.process(req).prompt_ids) + max_tokens - 1
    return llm.model_config.text.num_hidden_layers * -(-n // 4)


@pytest.mark.parametrize("policy", [dict(), dict(policy="st3", policy_params={"anneal_steps": 4})],
                         ids=["full", "st3"])
def test_small_pool_preempts_and_matches_big_pool(env, policy):
    reqs = [env.reqs[k] for k, _ in WORKLOAD]
    params = [SamplingParams(max_tokens=n, **GREEDY) for _, n in WORKLOAD]
    big = new_llm(env, block_size=4, **policy)
    ref = big.generate(reqs, params)
    assert_all_free(big)
    pool = max(_need(big, r, p.max_tokens) for r, p in zip(reqs, params)) + 4  # just above one request's need
    small = new_llm(env, num_kv_blocks=pool, block_size=4, **policy)
    outs = small.generate(reqs, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert [o.finish_reason for o in outs] == ["length"] * len(WORKLOAD)
    assert max(o.stats["preemptions"] for o in outs) > 0
    for o in outs:  # recompute after preemption ends each request's KV where an uninterrupted run does
        low, high = kv_peak_bounds(small, o)
        assert o.stats["kv_peak_blocks"] == high if not small.policy.anneals else low <= o.stats["kv_peak_blocks"] <= high
    assert_all_free(small)


# ---- streaming -----------------------------------------------------------------------------------
def test_stream_matches_generate(env):
    llm = new_llm(env)
    params = SamplingParams(max_tokens=20, **GREEDY)
    full = llm.generate(env.reqs["a"], params)[0]
    outs = list(llm.stream(env.reqs["a"], params))
    assert "".join(o.delta for o in outs) == full.text
    assert outs[-1].finished and outs[-1].token_ids == full.token_ids and outs[-1].text == full.text
    assert_all_free(llm)


def _middle_stop(text: str) -> tuple[str, int]:
    """A short substring from the middle of `text` and where it first occurs (> 0)."""
    for k in range(len(text) // 2, len(text) - 2):
        stop = text[k:k + 2]
        if stop.strip() and text.find(stop) > 0:
            return stop, text.find(stop)
    pytest.skip(f"no usable stop string in {text!r}")


def test_stream_with_stop_string_never_passes_it(env):
    llm = new_llm(env)
    full = llm.generate(env.reqs["t"], SamplingParams(max_tokens=24, **GREEDY))[0]
    stop, at = _middle_stop(full.text)
    seen = ""
    for out in llm.stream(env.reqs["t"], SamplingParams(max_tokens=24, stop=[stop], **GREEDY)):
        seen += out.delta
        assert stop not in seen and full.text.startswith(seen)
    assert seen == full.text[:at] and out.finish_reason == "stop"
    assert_all_free(llm)


# ---- abort ---------------------------------------------------------------------------------------
def test_abort_frees_blocks_and_spares_the_other(env):
    params = SamplingParams(max_tokens=16, **GREEDY)
    llm = new_llm(env)
    victim, other = llm.add_request(env.reqs["a"], params), llm.add_request(env.reqs["t"], params)
    for _ in range(3):
        llm.step()
    before = llm.kv_stats()["free_blocks"]
    llm.abort(victim)
    assert llm.kv_stats()["free_blocks"] > before
    last = None
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == other
            last = out
    assert last.finished and last.token_ids == solo(env, env.reqs["t"], params).token_ids
    assert_all_free(llm)


# ---- seeded sampling -----------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_batch_independent(env):
    def seeded(seed):
        return SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)

    alone = solo(env, env.reqs["a"], seeded(123)).token_ids
    assert solo(env, env.reqs["a"], seeded(123)).token_ids == alone
    llm = new_llm(env)
    outs = llm.generate([env.reqs["t"], env.reqs["a"], env.reqs["b"]],
                        [SamplingParams(max_tokens=5, **GREEDY), seeded(123), seeded(7)])
    assert outs[1].token_ids == alone
    assert llm.generate(env.reqs["a"], seeded(124))[0].token_ids != alone
    assert_all_free(llm)


# ---- stop conditions -----------------------------------------------------------------------------
def test_stop_string_stop_token_and_length(env):
    llm = new_llm(env)
    full = llm.generate(env.reqs["b"], SamplingParams(max_tokens=24, **GREEDY))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24

    stop, at = _middle_stop(full.text)
    out = llm.generate(env.reqs["b"], SamplingParams(max_tokens=24, stop=stop, **GREEDY))[0]
    assert out.text == full.text[:at] and out.finish_reason == "stop"

    ids = full.token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # the 3rd token, or the next new one
    out = llm.generate(env.reqs["b"], SamplingParams(max_tokens=24, stop_token_ids=[ids[k]], **GREEDY))[0]
    # The stop token is kept in token_ids (like EOS), and its text is not cut.
    assert out.token_ids == ids[:k + 1] and out.finish_reason == "stop"
    assert out.text == decode(env, out.token_ids)
    assert_all_free(llm)


# ---- logprobs ------------------------------------------------------------------------------------
def test_logprobs_match_transformers(env, hf):
    llm = new_llm(env)
    out = llm.generate(env.reqs["a"], SamplingParams(max_tokens=6, logprobs=3, **GREEDY))[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    ids, extra = hf_inputs(env, env.reqs["a"])
    full = torch.cat([ids, torch.tensor([out.token_ids[:-1]])], dim=1)
    with torch.no_grad():
        logits = hf(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)[ids.shape[1] - 1:]
    for step, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok in entry and len(entry) >= 3
        assert abs(entry[tok] - ref[step, tok].item()) < 1e-4
        assert tok == int(ref[step].argmax())
        top = ref[step].topk(3)
        for v, i in zip(top.values.tolist(), top.indices.tolist()):
            assert abs(entry[i] - v) < 1e-4
    assert_all_free(llm)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_bad_engine_arguments(env):
    with pytest.raises(ValueError, match="unknown policy"):
        new_llm(env, policy="nope")
    with pytest.raises(ValueError, match="ratio"):
        new_llm(env, policy="st3", policy_params={"ratio": 1.5})
    with pytest.raises(ValueError, match="anneal_steps"):
        new_llm(env, policy=ST3(anneal_steps=0))
    with pytest.raises(ValueError, match="not found"):
        LLM(env.tmp / "no-such-model", num_kv_blocks=BIG)


def test_bad_requests(env):
    tmp, llm = env.tmp, new_llm(env, num_kv_blocks=16, block_size=16)
    png = open(env.a, "rb").read()
    (tmp / "trunc.png").write_bytes(png[:len(png) // 2])
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "junk.png").write_bytes(b"this is not an image at all")
    q, q0 = env.tok.chat_prompt("hi", 1), env.tok.chat_prompt("hi", 0)
    cases = [({"prompt": q}, "1 <image> tag.* 0 image"),
             ({"prompt": q0, "image": env.a}, "0 <image> tag.* 1 image"),
             ({"prompt": q, "image": str(tmp / "missing.png")}, "not found"),
             ({"prompt": q, "image": str(tmp / "trunc.png")}, "truncated"),
             ({"prompt": q, "image": str(tmp / "empty.png")}, "empty"),
             ({"prompt": q, "image": str(tmp / "junk.png")}, "not a recognised image"),
             ({"prompt": q, "image": Image.new("RGB", (0, 0))}, "zero size"),
             ({"prompt": ""}, "prompt")]
    for req, msg in cases:
        with pytest.raises(ValueError, match=msg):
            llm.add_request(req, SamplingParams(max_tokens=1))
    # 40 prompt tokens need 3 blocks in each of 4 layers, so 12 of the 16; growing past 64 tokens needs 20.
    llm.generate(env.reqs["a"], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="KV blocks"):
        llm.add_request(env.reqs["a"], SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="KV blocks"):
        new_llm(env, num_kv_blocks=8).add_request(env.reqs["a"], SamplingParams(max_tokens=1))
    short = new_llm(env, max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        short.add_request(env.reqs["a"])
    assert not llm.has_unfinished() and not short.has_unfinished()
    assert_all_free(llm)
    assert_all_free(short)


def test_bad_request_in_a_batch(env):
    params = SamplingParams(max_tokens=7, **GREEDY)
    llm = new_llm(env)
    bad = {"prompt": env.tok.chat_prompt("hi", 0), "image": env.a}
    outs = llm.generate([env.reqs["a"], bad, env.reqs["t"]], params)
    assert outs[1].finish_reason == "error" and "<image>" in outs[1].error and outs[1].token_ids == []
    assert outs[0].token_ids == solo(env, env.reqs["a"], params).token_ids
    assert outs[2].token_ids == solo(env, env.reqs["t"], params).token_ids
    assert outs[0].finish_reason == outs[2].finish_reason == "length"
    assert_all_free(llm)


# ---- policy objects ------------------------------------------------------------------------------
def test_policy_objects(env):
    params = SamplingParams(max_tokens=10, **GREEDY)
    by_obj = new_llm(env, policy=ST3(anneal_steps=4))
    by_name = new_llm(env, policy="st3", policy_params={"anneal_steps": 4})
    a, b = by_obj.generate(env.reqs["a"], params)[0], by_name.generate(env.reqs["a"], params)[0]
    assert a.token_ids == b.token_ids and a.stats["policy"] == "st3"
    assert a.stats["visual_tokens_per_layer"][:2] == [16, 16] and a.stats["visual_tokens_per_layer"][3] < 16
    for llm in (by_obj, by_name):
        assert_all_free(llm)
    for policy in (Full(), FastV(layer=1, ratio=0.5), PVTP(start_layer=1, stride=1)):
        llm = new_llm(env, policy=policy)
        out = llm.generate(env.reqs["b"], params)[0]
        assert out.stats["policy"] == policy.name and len(out.token_ids) == 10
        assert_all_free(llm)


# ---- generate() beside add_request() -------------------------------------------------------------
def test_generate_keeps_the_outputs_of_requests_queued_before_it(env):
    """Requests added with add_request progress (and may finish) while generate() drives the engine;
    their outputs come out of the next step() calls, none lost, deltas adding up to the text."""
    params = SamplingParams(max_tokens=6, **GREEDY)
    llm = new_llm(env)
    early = llm.add_request(env.reqs["t"], params)
    late = llm.add_request(env.reqs["s"], SamplingParams(max_tokens=40, **GREEDY))
    mine = llm.generate(env.reqs["a"], SamplingParams(max_tokens=12, **GREEDY))[0]
    assert mine.token_ids == solo(env, env.reqs["a"], SamplingParams(max_tokens=12, **GREEDY)).token_ids
    seen = {early: [], late: []}
    while llm.has_unfinished():
        for out in llm.step():
            seen[out.request_id].append(out)
    for rid, req, n in ((early, "t", 6), (late, "s", 40)):
        ref = solo(env, env.reqs[req], SamplingParams(max_tokens=n, **GREEDY))
        outs = seen[rid]
        assert outs and outs[-1].finished and [o.finished for o in outs].count(True) == 1, rid
        assert outs[-1].token_ids == ref.token_ids and "".join(o.delta for o in outs) == ref.text, rid
    assert llm.step() == [] and not llm.has_unfinished()
    assert_all_free(llm)


def test_stream_keeps_the_outputs_of_other_requests(env):
    params = SamplingParams(max_tokens=5, **GREEDY)
    llm = new_llm(env)
    other = llm.add_request(env.reqs["t"], params)
    list(llm.stream(env.reqs["a"], SamplingParams(max_tokens=10, **GREEDY)))
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert {o.request_id for o in outs} == {other} and outs[-1].finished
    assert outs[-1].token_ids == solo(env, env.reqs["t"], params).token_ids
    assert_all_free(llm)


# ---- the engine's own randomness -----------------------------------------------------------------
def test_unseeded_requests_follow_the_engine_seed(env):
    """LLM(seed=None) draws from the OS, so two engines differ; an int seed makes them repeat."""
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    def sampled(**kw):
        llm = new_llm(env, **kw)
        return [o.token_ids for o in llm.generate([env.reqs["a"], env.reqs["t"]], params)]

    assert sampled(seed=11) == sampled(seed=11)
    assert sampled(seed=11) != sampled(seed=12)
    assert sampled() != sampled()
    for bad in ("1", 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            new_llm(env, seed=bad)
