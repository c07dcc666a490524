"""The vLLM-shaped API beside ours: request forms (multi_modal_data, prompt_token_ids), generate's
signature and progress bar, chat on the LLaVA-1.5 template, get_tokenizer, RequestOutput.outputs,
max_tokens=None, and every image kind (with one one-line error per wrong kind)."""
from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM, RequestError, SamplingParams
from engine.chat import chat_request
from engine.outputs import CompletionOutput, RequestOutput
from tools.fixtures.make_tiny_model import make_tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=6)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_api")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=2, image_size=32)
    img = Image.effect_noise((40, 36), 70).convert("RGB")
    path = tmp / "a.png"
    img.save(path)
    llm = LLM(model, num_kv_blocks=256)
    return SimpleNamespace(tmp=tmp, model=model, img=img, path=path, png=path.read_bytes(), llm=llm,
                           tok=llm.get_tokenizer())


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def assert_all_free(llm: LLM) -> None:
    s = llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"] and not llm._seqs, s


# ---- request forms -------------------------------------------------------------------------------
def test_multi_modal_data_and_prompt_token_ids_match_the_plain_form(env):
    llm, tok = env.llm, env.tok
    q = tok.chat_prompt("Describe the image.", 1)
    plain = llm.generate({"prompt": q, "image": str(env.path)}, SamplingParams(**GREEDY))[0]
    ids = llm.processor.encode_prompt(q)  # one image id per image, as a vLLM user tokenizes it
    expanded = plain.prompt_token_ids
    assert expanded.count(llm.model_config.image_token_index) == llm.model_config.image_seq_length
    forms = [{"prompt": q, "multi_modal_data": {"image": env.img}},
             {"prompt": q, "multi_modal_data": {"image": [str(env.path)]}},
             {"prompt_token_ids": ids, "multi_modal_data": {"image": env.img}},
             {"prompt_token_ids": expanded, "multi_modal_data": {"image": env.png}}]
    outs = llm.generate(forms, SamplingParams(**GREEDY), use_tqdm=False)
    for form, out in zip(forms, outs):
        assert out.token_ids == plain.token_ids and out.prompt_token_ids == expanded, form
    assert [o.prompt for o in outs] == [q, q, None, None] and plain.prompt == q
    assert_all_free(llm)


@pytest.mark.parametrize("req, msg", [
    ({"prompt": "x", "prompt_token_ids": [1, 2]}, "either 'prompt' or 'prompt_token_ids'"),
    ({"prompt_token_ids": []}, "non-empty list"),
    ({"prompt_token_ids": [1, 2.0]}, "only ints, got float"),
    ({"prompt_token_ids": [1, True]}, "only ints, got bool"),
    ({"prompt_token_ids": [1, 5, 10**6]}, "outside the model's vocabulary"),
    ({"prompt_token_ids": [1, 500, 500], "multi_modal_data": {"image": "x.png"}}, "2 image token id"),
    ({"prompt": "USER: <image>\nhi", "multi_modal_data": {"video": [1]}}, "unsupported modality 'video'"),
    ({"prompt": "USER: <image>\nhi", "multi_modal_data": [1]}, "must be a dict"),
    ({"prompt": "USER: <image>\nhi", "image": "a.png", "multi_modal_data": {"image": "a.png"}}, "not both"),
    ({"prompt": "USER: <image>\nhi", "images": "a.png"}, "'images' must be a list"),
])
def test_bad_request_forms(env, req, msg):
    with pytest.raises(RequestError, match=msg):
        env.llm.add_request(req)


# ---- generate's signature and its progress bar ---------------------------------------------------
def test_generate_signature_and_progress_bar(env, capfd, monkeypatch):
    llm, p = env.llm, SamplingParams(**GREEDY)
    prompts = [env.tok.chat_prompt("Hello there.", 0), "Once upon a time"]
    ref = [o.token_ids for o in llm.generate(prompts, p, False)]  # the old positional form
    capfd.readouterr()
    assert [o.token_ids for o in llm.generate(prompts, sampling_params=p, use_tqdm=False)] == ref
    assert capfd.readouterr() == ("", "")  # use_tqdm=False: not a byte
    pytest.importorskip("tqdm")
    llm.generate(prompts, sampling_params=p)
    err = capfd.readouterr().err
    assert "Processed prompts" in err and "2/2" in err
    llm.generate(prompts[0], sampling_params=p)  # a single request: no bar
    assert capfd.readouterr() == ("", "")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar, no error
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert [o.token_ids for o in llm.generate(prompts, sampling_params=p)] == ref
    assert capfd.readouterr() == ("", "")
    assert_all_free(llm)


def test_max_tokens_none_runs_to_the_context(env):
    llm = LLM(env.model, num_kv_blocks=64, max_model_len=40)
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 40
    assert_all_free(llm)


# ---- outputs -------------------------------------------------------------------------------------
def test_request_output_shortcuts(env):
    out = env.llm.generate("Once upon a time", SamplingParams(**GREEDY, logprobs=1))[0]
    first = out.outputs[0]
    assert isinstance(first, CompletionOutput) and len(out.outputs) == 1 and first.index == 0
    assert (out.text, out.token_ids, out.finish_reason, out.logprobs) == \
        (first.text, first.token_ids, first.finish_reason, first.logprobs)
    assert out.finished and out.prompt == "Once upon a time" and out.prompt_token_ids[0] == env.tok.bos_token_id
    assert out.text == env.tok.decode([t for t in out.token_ids if t < env.tok.vocab_size])
    legacy = RequestOutput("x", "hi", [5], "stop", stats={"a": 1}, delta="hi")  # the old positional form
    assert (legacy.text, legacy.token_ids, legacy.delta, legacy.outputs[0].index) == ("hi", [5], "hi", 0)
    assert env.llm.get_tokenizer() is env.llm.tokenizer


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_template_single_and_multi_turn(env):
    q = "What is in the picture?"
    one = chat_request([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(env.png)}},
                                                     {"type": "text", "text": q}]}])
    assert one["prompt"] == env.tok.chat_prompt(q, 1) == "USER: <image>\nWhat is in the picture? ASSISTANT:"
    # llava-hf's template: images first in a message, each text part followed by a space, system bare.
    multi = chat_request([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi."}, {"type": "image_pil", "image_pil": env.img}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "text", "text": "One word."},
                                     {"type": "image_url", "image_url": str(env.path)}]}])
    assert multi["prompt"] == ("Be brief. USER: <image>\nHi. ASSISTANT: A cat. "
                               "USER: <image>\nColour? One word. ASSISTANT:")
    assert multi["images"][0] is env.img and multi["images"][1] == str(env.path)


def test_chat_runs_like_generate(env):
    llm, p = env.llm, SamplingParams(**GREEDY)
    q = "Describe the image."
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(env.png)}},
                                         {"type": "text", "text": q}]}]
    ref = llm.generate({"prompt": env.tok.chat_prompt(q, 1), "image": str(env.path)}, p)[0]
    outs = llm.chat(conv, p)
    assert len(outs) == 1 and outs[0].token_ids == ref.token_ids and outs[0].prompt == ref.prompt
    text_only = [{"role": "user", "content": "Hello there."}]
    bad = [{"role": "robot", "content": "hi"}]
    batch = llm.chat([conv, bad, text_only], sampling_params=p, use_tqdm=False)
    assert batch[0].token_ids == ref.token_ids and batch[1].finish_reason == "error" and "role" in batch[1].error
    assert batch[2].token_ids == llm.generate(env.tok.chat_prompt("Hello there.", 0), p)[0].token_ids
    with pytest.raises(RequestError, match="role"):
        llm.chat(bad, p)
    assert_all_free(llm)


@pytest.mark.parametrize("messages, msg", [
    ([], "non-empty list of messages"),
    (["hi"], "message 0: must be a dict"),
    ([{"role": "user", "content": 5}], "content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "part 0: .*'type' one of"),
    ([{"role": "user", "content": [{"type": "text", "text": "a <image> b"}]}], "must not contain '<image>'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "needs a 'image_url' field"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}], "image_url must be"),
])
def test_bad_chat_messages(messages, msg):
    with pytest.raises(RequestError, match=msg):
        chat_request(messages)


# ---- images --------------------------------------------------------------------------------------
def test_every_image_kind_gives_the_same_pixels(env):
    arr = np.asarray(env.img)
    chw = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    kinds = {"str": str(env.path), "Path": Path(env.path), "bytes": env.png, "PIL": env.img, "numpy": arr,
             "tensor uint8": chw, "tensor float": chw.float() / 255, "data URI": data_uri(env.png),
             "file URL": "file://" + str(env.path)}
    proc, q = env.llm.processor, env.tok.chat_prompt("hi", 1)
    ref = proc.process({"prompt": q, "image": str(env.path)}).pixel_values
    for name, img in kinds.items():
        assert torch.equal(proc.process({"prompt": q, "image": img}).pixel_values, ref), name


def test_each_wrong_image_kind_has_its_own_short_error(env):
    huge = "A" * 200_000
    junk = "data:image/png;base64," + base64.b64encode(b"not an image" * 1000).decode()
    cases = [(huge, "image file not found"), ("data:image/png;base64,!!" + huge, "base64 data is not valid"),
             ("data:text/plain;base64,aGk=", "not an image type"), ("data:image/png;base64" + huge, "no ','"),
             (junk, "not a recognised image format"), ("https://example.com/cat.png", "not fetched"),
             (str(env.tmp / "missing.png"), "image file not found"),
             (np.zeros((4, 4, 3)), "dtype uint8"), (np.zeros((4, 4, 2), np.uint8), "HxWxC"),
             (torch.zeros(1, 3, 4, 4), "batch"), (torch.full((3, 4, 4), 2.0), r"values in \[0, 1\]"),
             (torch.zeros(3, 4, 4, dtype=torch.int64), "uint8 .0..255. or float"),
             (torch.zeros(2, 4, 4), "CxHxW"), (torch.zeros(3, 0, 4, dtype=torch.uint8), "zero size"),
             (12, "got int"), ({"url": "x"}, "got dict"), ([env.img], "one image, got a list")]
    q, seen = env.tok.chat_prompt("hi", 1), set()
    for img, msg in cases:
        with pytest.raises(RequestError, match=msg) as e:
            env.llm.add_request({"prompt": q, "image": img})
        text = str(e.value)
        assert "\n" not in text and len(text) < 300, text[:400]
        seen.add(text)
    assert len(seen) == len(cases)
    assert not env.llm.has_unfinished()


def test_data_uri_without_base64_and_gray_numpy(env):
    buf = io.BytesIO()
    env.img.convert("L").save(buf, format="PNG")
    from urllib.parse import quote_from_bytes

    proc, q = env.llm.processor, env.tok.chat_prompt("hi", 1)
    ref = proc.process({"prompt": q, "image": buf.getvalue()}).pixel_values
    assert torch.equal(proc.process({"prompt": q, "image": "data:image/png," + quote_from_bytes(buf.getvalue())})
                       .pixel_values, ref)
    gray = np.asarray(env.img.convert("L"))
    for img in (gray, gray[:, :, None], torch.from_numpy(gray.copy())[None]):
        assert torch.equal(proc.process({"prompt": q, "image": img}).pixel_values, ref)
