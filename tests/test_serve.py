"""engine.serve through the official openai client: a tiny model under ST3 behind uvicorn on a free
127.0.0.1 port, shared by the whole module. Answers are checked against the same LLM run in-process.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from engine import LLM, AsyncLLM, SamplingParams  # noqa: E402
from engine.serve import build_app, main  # noqa: E402
from engine.serve_media import MediaPolicy  # noqa: E402
from engine.serve_protocol import render_chat  # noqa: E402
from tools.fixtures.make_tiny_model import make_tiny_model  # noqa: E402
from tools.fixtures.server_thread import ServerThread  # noqa: E402

POLICY = dict(policy="st3", policy_params={"anneal_steps": 2})
ENGINE = dict(num_kv_blocks=2048, max_model_len=1024)
NAME = "tiny-llava"


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=4, image_size=32)
    media_dir = tmp / "media"
    media_dir.mkdir()
    image = Image.effect_noise((40, 36), 70).convert("RGB")
    image.save(media_dir / "a.png")
    engine = AsyncLLM(LLM(model, **POLICY, **ENGINE))
    app = build_app(engine, NAME, MediaPolicy(fetch_urls=False, allowed_local_path=media_dir), default_max_tokens=16)
    server = ServerThread(app)
    ref = LLM(model, **POLICY, **ENGINE)  # the same model in-process, for expected answers
    yield SimpleNamespace(url=server.url, engine=engine, ref=ref, image=image, uri=png_uri(image), tmp=tmp,
                          media_dir=media_dir, model=model,
                          client=openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0))
    server.stop()
    engine.shutdown()


def expected(srv, question: str | None, image: bool, n: int, **kw):
    """The in-process answer for a one-turn chat."""
    prompt = srv.ref.tokenizer.chat_prompt(question, int(image))
    req = {"prompt": prompt, "image": srv.image} if image else {"prompt": prompt}
    return srv.ref.generate(req, SamplingParams(max_tokens=n, **{"temperature": 0.0, **kw}))[0]


def user(text: str, uri: str | None = None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": uri}}] if uri else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def metrics(srv) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(st3_\S+) (\S+)$", text, re.M)}


# ---- the chat template ---------------------------------------------------------------------------
def test_single_turn_renders_as_the_engine_chat_prompt(srv):
    prompt, urls = render_chat(user("What is it?", "data:x"))
    assert prompt == srv.ref.tokenizer.chat_prompt("What is it?", 1) and urls == ["data:x"]
    turns = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": "u"}]},
             {"role": "assistant", "content": "A dog."}, {"role": "user", "content": "Colour?"}]
    assert render_chat(turns) == ("Be brief. USER: Look: <image>\nASSISTANT: A dog.</s>USER: Colour? ASSISTANT:", ["u"])


# ---- answers -------------------------------------------------------------------------------------
def test_chat_with_a_base64_image(srv):
    r = srv.client.chat.completions.create(model=NAME, messages=user("Describe the image.", srv.uri), max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
    ref = expected(srv, "Describe the image.", True, 12, ignore_eos=True)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.stats["prompt_tokens"], 12)
    assert r.usage.total_tokens == ref.stats["prompt_tokens"] + 12
    st3 = r.model_extra["st3"]
    assert st3["visual_tokens"] == 16 and st3["visual_tokens_per_layer"] == ref.stats["visual_tokens_per_layer"]
    assert st3["visual_tokens_per_layer"][-1] < 16 and st3["policy"] == "st3"  # pruned under ST3


def test_streaming_chat_with_usage(srv):
    chunks = list(srv.client.chat.completions.create(
        model=NAME, messages=user("Describe the image.", srv.uri), max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    ref = expected(srv, "Describe the image.", True, 10, ignore_eos=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == ref.stats["prompt_tokens"]


def test_stop_strings(srv):
    full = expected(srv, "Tell a story.", False, 24, ignore_eos=True).text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip() == full[i:i + 2])
    want = full[:full.find(stop)]
    for stream in (False, True):
        r = srv.client.chat.completions.create(model=NAME, messages=user("Tell a story."), max_tokens=24,
                                               temperature=0, stop=[stop], stream=stream,
                                               extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, reason) == (want, "stop"), stream


def test_seeds_are_reproducible_across_calls(srv):
    def ask(seed):
        return srv.client.chat.completions.create(model=NAME, messages=user("Describe.", srv.uri), max_tokens=16,
                                                  temperature=1.0, seed=seed,
                                                  extra_body={"ignore_eos": True}).choices[0].message.content
    a = ask(1234)
    assert ask(1234) == a and ask(4321) != a
    assert a == expected(srv, "Describe.", True, 16, temperature=1.0, seed=1234, ignore_eos=True).text


def test_completions_with_logprobs(srv):
    r = srv.client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0,
                                      logprobs=3, extra_body={"ignore_eos": True})
    ref = srv.ref.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                              logprobs=3))[0]
    assert r.choices[0].text == ref.text
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e[t] for t, e in zip(ref.token_ids, ref.logprobs)])
    # Keyed by token text, as in OpenAI's legacy format: tokens that decode alike (byte pieces) share a key.
    assert all(1 <= len(top) <= 3 and max(top.values()) == pytest.approx(v)  # greedy: the pick is the best
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chunks = list(srv.client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text


def test_chat_logprobs(srv):
    r = srv.client.chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_sixteen_concurrent_streams_equal_solo(srv):
    jobs = [(f"Question number {i}: what do you see?", i % 3 != 0, 6 + i % 5) for i in range(16)]
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

    async def one(question, with_image, n):
        stream = await client.chat.completions.create(
            model=NAME, messages=user(question, srv.uri if with_image else None), max_tokens=n, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(*j) for j in jobs))
        finally:
            await client.close()

    got = asyncio.run(all_of_them())
    for (q, img, n), text in zip(jobs, got):
        assert text == expected(srv, q, img, n, ignore_eos=True).text, q


# ---- n completions and presence / frequency penalties ------------------------------------------------
SAMPLED = dict(temperature=1.0, seed=2024, extra_body={"ignore_eos": True})


def sampled_ref(srv, question: str, image: bool, n: int, max_tokens: int, **kw):
    """The in-process n-completion answer for a one-turn chat, sampled with SAMPLED's seed."""
    prompt = srv.ref.tokenizer.chat_prompt(question, int(image))
    req = {"prompt": prompt, "image": srv.image} if image else {"prompt": prompt}
    return srv.ref.generate(req, SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, seed=2024,
                                                ignore_eos=True, **kw))[0]


def test_n3_chat_equals_the_engine_n3(srv):
    before = metrics(srv)
    r = srv.client.chat.completions.create(model=NAME, messages=user("Describe the image.", srv.uri), n=3,
                                           max_tokens=8, logprobs=True, top_logprobs=1, **SAMPLED)
    ref = sampled_ref(srv, "Describe the image.", True, 3, 8, logprobs=1)
    assert len({o.text for o in ref.outputs}) > 1  # seed + i: the completions differ
    assert [c.index for c in r.choices] == [0, 1, 2]
    token = srv.ref.tokenizer.decode
    for choice, want in zip(r.choices, ref.outputs):
        assert (choice.message.content, choice.finish_reason) == (want.text, "length")
        lp = choice.logprobs.content  # the exact tokens, and their logprobs, of completion i
        assert [c.token for c in lp] == [token([t], skip_special_tokens=False) for t in want.token_ids]
        assert [c.logprob for c in lp] == pytest.approx([e[t] for t, e in zip(want.token_ids, want.logprobs)])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.stats["prompt_tokens"], 24)  # prompt once
    after = metrics(srv)
    assert after["st3_generation_tokens_total"] - before["st3_generation_tokens_total"] == 24
    finished = 'st3_requests_finished_total{reason="length"}'
    assert after[finished] - before.get(finished, 0) == 3  # one per completion
    assert after["st3_kv_blocks_used"] == 0


def test_n2_stream_reassembles_to_the_non_streamed_choices(srv):
    ask = dict(model=NAME, messages=user("Describe the image.", srv.uri), n=2, max_tokens=7, **SAMPLED)
    full = srv.client.chat.completions.create(**ask)
    chunks = list(srv.client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    body = [c for c in chunks if c.choices]
    assert all(len(c.choices) == 1 for c in body)
    for i, want in enumerate(full.choices):
        mine = [c.choices[0] for c in body if c.choices[0].index == i]
        assert [m.delta.role for m in mine].count("assistant") == 1 and mine[0].delta.role == "assistant"
        assert "".join(m.delta.content or "" for m in mine) == want.message.content
        assert [m.finish_reason for m in mine if m.finish_reason] == [want.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 14
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert body[-1].model_extra["st3"]["visual_tokens"] == 16


def test_n3_completions_with_a_stop_string_and_logprobs(srv):
    prompt = "Once upon a time"
    plain = srv.ref.generate(prompt, SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=2024,
                                                    ignore_eos=True))[0]
    text = plain.outputs[1].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2])
    ref = srv.ref.generate(prompt, SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=2024, ignore_eos=True,
                                                  stop=[stop], logprobs=2))[0]
    assert ref.outputs[1].finish_reason == "stop"
    ask = dict(model=NAME, prompt=prompt, n=3, max_tokens=16, stop=[stop], logprobs=2, **SAMPLED)
    r = srv.client.completions.create(**ask)
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == \
        [(o.index, o.text, o.finish_reason) for o in ref.outputs]
    for c, o in zip(r.choices, ref.outputs):
        assert c.logprobs.token_logprobs == pytest.approx([e[t] for t, e in zip(o.token_ids, o.logprobs)])
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    chunks = [c for c in srv.client.completions.create(**ask, stream=True) if c.choices]
    for c, o in zip(r.choices, ref.outputs):
        mine = [k.choices[0] for k in chunks if k.choices[0].index == c.index]
        assert "".join(m.text for m in mine) == o.text
        assert sum((m.logprobs.token_logprobs for m in mine if m.logprobs), []) == c.logprobs.token_logprobs
        assert [m.finish_reason for m in mine if m.finish_reason] == [o.finish_reason]


def test_presence_and_frequency_penalties_match_the_engine(srv):
    kw = dict(max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    plain = srv.client.chat.completions.create(model=NAME, messages=user("Tell a story."), **kw).choices[0]
    for penalties in (dict(presence_penalty=1.5), dict(frequency_penalty=0.8),
                      dict(presence_penalty=-0.5, frequency_penalty=2.0), dict(frequency_penalty=-1.0)):
        got = srv.client.chat.completions.create(model=NAME, messages=user("Tell a story."), **kw, **penalties)
        want = expected(srv, "Tell a story.", False, 16, ignore_eos=True, **penalties).text
        assert got.choices[0].message.content == want != plain.message.content, penalties  # and it changed
        got = srv.client.completions.create(model=NAME, prompt="Once upon a time", **kw, **penalties)
        want = srv.ref.generate("Once upon a time", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                                   **penalties))[0].text
        assert got.choices[0].text == want, penalties


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_frees_its_blocks(srv, n):
    start = metrics(srv)
    before = start.get('st3_requests_finished_total{reason="abort"}', 0)
    body = {"model": NAME, "messages": user("Tell a long story.", srv.uri), "max_tokens": 900, "temperature": 1.0,
            "seed": 5, "n": n, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6 + 2 * n)]
        assert sum('"content": ""' not in line for line in got if line.startswith("data: {")) > 0  # text came
        m = metrics(srv)
        assert m["st3_requests_running"] == n and m["st3_kv_blocks_used"] > 0  # every completion decodes
    deadline = time.monotonic() + 60  # a liveness bound, not a timing assertion
    while time.monotonic() < deadline:
        m = metrics(srv)
        if m.get('st3_requests_finished_total{reason="abort"}', 0) > before and m["st3_kv_blocks_used"] == 0:
            break
        time.sleep(0.05)
    assert m.get('st3_requests_finished_total{reason="abort"}', 0) == before + n, m  # one per completion
    assert m["st3_kv_blocks_used"] == 0 and m["st3_requests_running"] == 0, m
    kv = srv.engine.kv_stats()
    assert kv["free_blocks"] == kv["total_blocks"] and not srv.engine.llm._seqs, kv
    assert m["st3_generation_tokens_total"] - start["st3_generation_tokens_total"] < 900 * n  # stopped early


def test_models_health_and_metrics(srv):
    assert [m.id for m in srv.client.models.list()] == [NAME]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    text = httpx.get(srv.url + "/metrics").text
    for name in ("requests_running", "requests_waiting", "kv_blocks_used", "kv_blocks_free", "preemptions_total",
                 "prompt_tokens_total", "generation_tokens_total"):
        assert f"# TYPE st3_{name} " in text, name
    assert 'st3_visual_tokens_kept_mean{layer="3"}' in text


def test_local_files_only_under_the_allowed_path(srv):
    ok = srv.client.chat.completions.create(
        model=NAME, messages=user("Describe.", (srv.media_dir / "a.png").as_uri()), max_tokens=3, temperature=0)
    assert ok.choices[0].message.content == expected(srv, "Describe.", True, 3).text
    outside = srv.tmp / "outside.png"
    srv.image.save(outside)
    with pytest.raises(openai.BadRequestError, match="outside --allowed-local-media-path"):
        srv.client.chat.completions.create(model=NAME, messages=user("Describe.", outside.as_uri()), max_tokens=3)


# ---- bad input: 400 with an OpenAI error body ------------------------------------------------------
def chat(**kw):
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


BAD = {
    "bad base64": (chat(messages=user("q", "data:image/png;base64,@@not-base64@@")), "not valid base64", "messages"),
    "not an image": (chat(messages=user("q", "data:image/png;base64," + base64.b64encode(b"hello").decode())),
                     "not a recognised image format", "messages"),
    "audio part": (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
                   "unsupported content part 'input_audio'", "messages[0].content[0].type"),
    "prompt too long": (chat(messages=user("word " * 1200)), "the model's context is 1024", None),
    "temperature": (chat(temperature=-1), "temperature must be >= 0", "temperature"),
    "top_p": (chat(top_p=2), "top_p must be in (0, 1]", "top_p"),
    "seed": (chat(seed=2 ** 64), "seed must be an integer in [0, 2**63)", "seed"),
    "stop": (chat(stop=123), "stop must be a string or a list of strings", "stop"),
    "max_tokens": (chat(max_tokens=0), "max_tokens must be an integer >= 1", "max_tokens"),
    "top_logprobs": (chat(logprobs=True, top_logprobs=10 ** 6), "exceeds the vocabulary size", None),
    "n = 0": (chat(n=0), "n must be an integer >= 1", "n"),
    "n not an integer": (chat(n=1.5), "n must be an integer >= 1", "n"),
    "n past max_num_seqs": (chat(n=65), "'n' must be <= 64", "n"),
    "seed + n": (chat(seed=2 ** 63 - 1, n=2), "seed must be below 2**63 - 1 when n=2", "seed"),
    "presence_penalty": (chat(presence_penalty=2.5), "presence_penalty must be in [-2, 2]", "presence_penalty"),
    "frequency_penalty": (chat(frequency_penalty=-3), "frequency_penalty must be in [-2, 2]", "frequency_penalty"),
    "penalty not a number": (chat(presence_penalty="high"), "presence_penalty must be a number", "presence_penalty"),
    "best_of": (chat(extra_body={"best_of": 2}), "'best_of' = 2 is not supported", "best_of"),
    "unknown model": (chat(model="gpt-4o"), "the model 'gpt-4o' does not exist", "model"),
    "no messages": ({"model": NAME, "messages": []}, "'messages' must be a non-empty list", "messages"),
    "bad role": (chat(messages=[{"role": "robot", "content": "hi"}]), "role must be one of", "messages[0].role"),
    "http url under --no-fetch-urls": (chat(messages=user("q", "http://127.0.0.1:9/x.png")), "--no-fetch-urls",
                                       "messages"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_400_naming_the_problem(srv, case):
    body, message, param = BAD[case]
    with pytest.raises(openai.BadRequestError) as info:
        srv.client.chat.completions.create(**body)
    err = info.value.body
    assert message in err["message"] and err["type"] == "invalid_request_error", err
    assert param is None or err["param"] == param, err
    assert "Traceback" not in info.value.response.text


def test_malformed_bodies_and_completions_errors(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # JSON may spell a lone surrogate as an escape; the client library cannot even send it.
    r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps(chat(messages=user("caf\udce9"))),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "'prompt' is not valid Unicode" in r.json()["error"]["message"]
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert metrics(srv)["st3_kv_blocks_used"] == 0


def test_a_full_queue_is_503(srv):
    engine = AsyncLLM(LLM(srv.model, num_kv_blocks=64), max_waiting=0)
    try:
        transport = httpx.ASGITransport(app=build_app(engine, NAME))

        async def post():
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.post("/v1/chat/completions", json=chat())
        r = asyncio.run(post())
        assert r.status_code == 503 and "waiting queue is full" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_cli_errors_are_one_line(srv, capsys):
    assert main(["--model", str(srv.model), "--policy", "st3", "--ratio", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "ratio" in err
    assert main(["--model", str(srv.model), "--max-waiting", "0"]) == 2
    assert "--max-waiting must be >= 1" in capsys.readouterr().err
