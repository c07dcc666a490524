"""Streaming through the engine never takes text back: with the sampler replaced by a script of
byte-heavy ids, the streamed deltas join to decode(token_ids) (cut before the first stop string),
whether the request ends by max_tokens mid byte run, by a stop string or by EOS."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import engine.llm
from engine import LLM, SamplingParams
from tools.fixtures.make_tiny_model import make_tiny_model

BYTE0, NEWLINE = 3, 3 + 0x0A  # the tiny tokenizers' <0x00> and <0x0A>


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("stream_engine") / "model", preset="tiny", text_layers=1,
                            image_size=32)
    llm = LLM(model, num_kv_blocks=128)
    return SimpleNamespace(llm=llm, tok=llm.tokenizer)


@pytest.fixture
def script(monkeypatch):
    """Make the engine 'sample' the ids in script["ids"] (one request at a time), k-th id at step k."""
    state = {"ids": []}

    def scripted(logits, batch):
        steps = batch.steps.tolist()
        return torch.tensor([state["ids"][k] for k in steps]), torch.log_softmax(logits.float(), -1)

    monkeypatch.setattr(engine.llm, "sample", scripted)
    return state


def byte_ids(text: str) -> list[int]:
    return [BYTE0 + b for b in text.encode()]


def run(env, script, ids, **params):
    script["ids"] = ids
    outs = list(env.llm.stream("Once upon a time", SamplingParams(temperature=0, ignore_eos=True, **params)))
    assert outs[-1].finished
    streamed = "".join(o.delta for o in outs)
    assert streamed == outs[-1].text
    return outs[-1], streamed


def expected(env, ids: list[int], stop: list[str]) -> str:
    text = env.tok.decode([i for i in ids if i < env.tok.vocab_size])  # lm_head padding rows have no text
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def test_newline_and_cut_emoji_at_max_tokens(env, script):
    ids = env.tok.encode("Yes.")[1:] + [NEWLINE] + byte_ids("😀")[:3]
    out, streamed = run(env, script, ids, max_tokens=len(ids))
    assert out.finish_reason == "length" and out.token_ids == ids
    assert streamed == env.tok.decode(ids) == "Yes." + "\ufffd" * 4  # transformers' decode of these ids


def test_stop_string_in_a_held_byte_run(env, script):
    yes = env.tok.encode("Yes.")[1:]
    # The newline is a byte run of its own: the stop is seen once a later id closes the run ...
    out, streamed = run(env, script, yes + [NEWLINE] + yes * 3, max_tokens=20, stop=["\n"])
    assert (streamed, out.finish_reason) == ("Yes.", "stop") and len(out.token_ids) == len(yes) + 2
    # ... or, when max_tokens ends the request inside the run, in the text flushed at the end.
    out, streamed = run(env, script, yes + [NEWLINE], max_tokens=len(yes) + 1, stop=["\n"])
    assert (streamed, out.finish_reason) == ("Yes.", "stop")


def test_random_scripts(env, script):
    rng = random.Random(7)
    normal = list(range(BYTE0 + 256, env.llm.model_config.text.vocab_size))  # includes lm_head padding rows
    emoji = [byte_ids(c) for c in "😀🐱中é"]
    reasons = set()
    for trial in range(30):
        ids = []
        while len(ids) < 30:
            r = rng.random()
            chars = rng.choice(emoji)
            if r < 0.3:
                ids.append(NEWLINE)
            elif r < 0.65:  # a whole character, or one cut short
                ids += chars if r < 0.5 else chars[:rng.randint(1, len(chars) - 1)]
            else:
                ids.append(rng.choice(normal))
        max_tokens = rng.randint(1, 30)
        stop = [rng.choice(["\n", "\ufffd", "\U0001F431", "\n\n"])] if trial % 2 else []
        out, streamed = run(env, script, ids, max_tokens=max_tokens, stop=stop)
        assert out.token_ids == ids[:len(out.token_ids)]
        assert streamed == expected(env, out.token_ids, stop), (ids[:max_tokens], stop)
        reasons.add(out.finish_reason)
        if out.finish_reason == "length":
            assert len(out.token_ids) == max_tokens
    assert reasons == {"length", "stop"}
    s = env.llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"]
