"""SamplingParams.n (n completions from one prefill, vLLM's seed + i) and the presence / frequency
penalties, checked against a reference computation of vLLM's documented semantics."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams
from engine.sampling import SamplingBatch, sample, uniform_noise
from tools.fixtures.make_tiny_model import make_tiny_model

BIG = 512


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=4, image_size=32)
    path = tmp / "a.png"
    Image.effect_noise((48, 40), 80).convert("RGB").save(path)
    llm = LLM(model, num_kv_blocks=BIG)
    ask = llm.tokenizer.chat_prompt
    return SimpleNamespace(model=model, llm=llm, image={"prompt": ask("Describe the image.", 1), "image": str(path)},
                           text={"prompt": ask("Tell me a story about a dragon.", 0)})


def new_llm(env, **kw) -> LLM:
    return LLM(env.model, **{"num_kv_blocks": BIG, **kw})


def count_prefills(llm: LLM) -> list[list[str]]:
    """Wrap the runner's prefill; the list gets the request ids of every prefill call."""
    calls, prefill = [], llm.runner.prefill
    llm.runner.prefill = lambda seqs, *rest: (calls.append([s.request_id for s in seqs]), prefill(seqs, *rest))[1]
    return calls


def assert_all_free(llm: LLM) -> None:
    s = llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"] and not llm._seqs and not llm._families, s


def seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 1.0, "top_k": 50, "seed": seed,
                             "ignore_eos": True, **kw})


# ---- n -------------------------------------------------------------------------------------------
def test_n4_seeded_is_reproducible_from_one_prefill(env):
    llm = new_llm(env)
    calls = count_prefills(llm)
    a = llm.generate(env.image, seeded(7, n=4))[0]
    assert calls == [["0"]]  # one prefill of one sequence made all four completions
    b = llm.generate(env.image, seeded(7, n=4))[0]
    assert len(calls) == 2
    assert [o.index for o in a.outputs] == [0, 1, 2, 3] and a.finished
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 4
    assert a.stats["generated_tokens"] == 48 and a.token_ids == a.outputs[0].token_ids
    # vLLM seeds completion i with seed + i: each equals a lone request with that seed.
    for i, o in enumerate(a.outputs):
        assert o.token_ids == llm.generate(env.image, seeded(7 + i))[0].token_ids, i
    assert_all_free(llm)


@pytest.mark.parametrize("policy", [dict(), dict(policy="st3", policy_params={"anneal_steps": 4})],
                         ids=["full", "st3"])
def test_greedy_n2_equals_n1(env, policy):
    # Under ST3 the siblings' copied caches (with each entry's visual index) go on being trimmed.
    llm = new_llm(env, **policy)
    params = dict(max_tokens=16, temperature=0, ignore_eos=True)
    one = llm.generate(env.image, SamplingParams(**params))[0]
    two = llm.generate(env.image, SamplingParams(n=2, **params))[0]
    assert [o.token_ids for o in two.outputs] == [one.token_ids] * 2
    assert [o.text for o in two.outputs] == [one.text] * 2
    if policy:
        assert two.stats["visual_tokens_per_layer"] == one.stats["visual_tokens_per_layer"]
    assert_all_free(llm)


def test_n_with_a_pool_too_small_to_fork(env):
    big = new_llm(env, block_size=4)
    ref = [big.generate(env.text, seeded(3 + i, max_tokens=20))[0].token_ids for i in range(3)]
    p = big.processor.process(env.text)
    per_seq = big.model_config.text.num_hidden_layers * -(-(len(p.prompt_ids) + 19) // 4)
    small = new_llm(env, block_size=4, num_kv_blocks=per_seq + 4)
    calls = count_prefills(small)
    out = small.generate(env.text, seeded(3, n=3, max_tokens=20))[0]
    assert [o.token_ids for o in out.outputs] == ref
    assert len(calls) >= 3  # the siblings waited for room and were prefilled on their own
    assert_all_free(small)


def test_n_streams_steps_and_aborts(env):
    llm = new_llm(env)
    final = llm.generate(env.text, seeded(5, n=3))[0]
    outs = list(llm.stream(env.text, seeded(5, n=3)))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    for i in range(3):
        assert "".join(o.outputs[i].delta for o in outs) == final.outputs[i].text
        assert outs[-1].outputs[i].token_ids == final.outputs[i].token_ids
    rid = llm.add_request(env.text, seeded(5, n=3))
    last = None
    while llm.has_unfinished():
        step = [o for o in llm.step() if o.request_id == rid]
        assert len(step) <= 1  # one output per request per step, holding all completions
        last = step[0] if step else last
    assert last.finished and [o.token_ids for o in last.outputs] == [o.token_ids for o in final.outputs]
    assert_all_free(llm)
    rid = llm.add_request(env.text, seeded(5, n=3))
    llm.step()
    llm.step()
    llm.abort(rid)
    assert not llm.has_unfinished()
    assert_all_free(llm)


# ---- presence / frequency penalties --------------------------------------------------------------
def penalised_argmax(logprobs: torch.Tensor, earlier: list[int], presence: float, frequency: float) -> int:
    """vLLM: logits -= frequency * count + presence * (count > 0), counting generated tokens only."""
    counts = torch.bincount(torch.tensor(earlier, dtype=torch.int64), minlength=logprobs.numel()).float()
    return int((logprobs - frequency * counts - presence * (counts > 0).float()).argmax())


def test_penalties_match_a_reference_computation(env):
    llm, vocab = env.llm, env.llm.model_config.text.vocab_size
    plain = llm.generate(env.text, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    prompt_ids = llm.processor.process(env.text).prompt_ids
    prompt_would_matter = False
    for presence, frequency in [(1.5, 0.0), (0.0, 0.8), (0.7, 0.5), (-0.5, 0.0)]:
        out = llm.generate(env.text, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=vocab,
                                                    presence_penalty=presence, frequency_penalty=frequency))[0]
        ids = out.token_ids
        if presence > 0 or frequency > 0:
            assert ids != plain, (presence, frequency)  # the penalty changed the answer
        for t, entry in enumerate(out.logprobs):
            assert len(entry) == vocab
            lp = torch.tensor([entry[i] for i in range(vocab)])  # the raw distribution, as vLLM reports it
            assert ids[t] == penalised_argmax(lp, ids[:t], presence, frequency), (presence, frequency, t)
            prompt_would_matter |= penalised_argmax(lp, prompt_ids + ids[:t], presence, frequency) != ids[t]
    assert prompt_would_matter  # so the test does tell "generated only" from "prompt too"


def test_sampled_tokens_use_the_penalised_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 2
    counts = torch.randint(0, 3, (3, 40), generator=g).float()
    pres, freq, temp = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.3]), torch.tensor([1.0, 0.7, 1.3])
    seeds, steps = torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9])
    batch = SamplingBatch(temp, torch.ones(3), torch.full((3,), -1), torch.zeros(3), torch.ones(3), seeds, steps,
                          None, needs_filter=False, presence_penalty=pres, frequency_penalty=freq,
                          output_counts=counts)
    tokens, logprobs = sample(logits, batch)
    penalised = logits - freq[:, None] * counts - pres[:, None] * (counts > 0)
    probs = torch.softmax(penalised / temp[:, None], -1)
    ref = (probs / -torch.log(uniform_noise(seeds, steps, 40)).float()).argmax(-1)
    assert tokens.tolist() == ref.tolist()
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1))  # logprobs stay those of the raw model


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=0), "n"), (dict(n=1.5), "n"), (dict(n=True), "n"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(frequency_penalty="x"), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"), (dict(seed=2 ** 63 - 2, n=3), "seed")])
def test_bad_new_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_noise_is_the_64_bit_hash_bit_for_bit():
    """uniform_noise mixes [B, vocab] in int32 for speed; it must give exactly the int64 formula's uniforms."""
    from engine.sampling import _hash32

    def reference(seeds, steps, vocab):
        tok = torch.arange(vocab, dtype=torch.int64)
        lo, hi = seeds[:, None] & 0xFFFFFFFF, seeds[:, None] >> 32
        h = _hash32(lo * 0x9E3779B1 + _hash32(steps[:, None] * 0x85EBCA77 + 0x165667B1) + _hash32(hi * 0xC2B2AE3D))
        h = _hash32(h ^ _hash32(tok[None, :] + 0x27D4EB2F))
        return (h.double() + 0.5) / 2.0 ** 32
    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.tensor([0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1]),
                       torch.randint(0, 2 ** 62, (10,), generator=g)])
    steps = torch.cat([torch.tensor([0, 1, 2 ** 31, 5, 100000, 7]), torch.randint(0, 2 ** 20, (10,), generator=g)])
    assert torch.equal(uniform_noise(seeds, steps, 32064), reference(seeds, steps, 32064))
