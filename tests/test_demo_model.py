"""The shipped easy-VQA demo model: its files are the recorded ones, it loads by default, and it answers."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.default_model import DEMO_MODEL_DIR, default_model_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = DEMO_MODEL_DIR / "examples"

# sha256 of every shipped file, recorded when tools/demo/train.py wrote them: an accidental
# overwrite (a retrain, a re-save in another dtype, a tokenizer rebuilt) fails here.
CHECKSUMS = {
    "config.json": "a4ba5043217a40077d98532d45b8e67e87aac2965b548903cf2974cd4f14a76b",
    "examples/LICENSE-easy-vqa.txt": "373e715e99fb6a73e35aa48c95f1e651eadf16195b0bc4d7fb837ad3a41d26bd",
    "examples/easy-vqa-test-0.png": "98ceaf199bddfea337cc8ea19c04d1f76b2b9077d542a2de45c17b03ad49579e",
    "examples/easy-vqa-test-1.png": "fbfc313f75e55d37bb2e8819b88d2c5e9881d506bb0fb4eab866993d123e5d35",
    "examples/easy-vqa-test-2.png": "61e70b37771b377141c38d97af7428ddc308d503cdede3b25c87c68fcbaf3e13",
    "examples/easy-vqa-test-3.png": "43272d3e0fd3dab117e5085d0ef42c727d257fb463d13d955b7c7d39ca4feca5",
    "examples/easy-vqa-test-4.png": "2c6ab31c77460bcffc784522298ff29eae0a707c26804bd3f60213275e244925",
    "examples/easy-vqa-test-5.png": "e38a5fbc1ef0ba9bc6c643c1d1791d8afa78f04be2873b615b018f45fc701896",
    "examples/easy-vqa-test-6.png": "98e1174bb41ad741fd132b112ccd40545a27d35264b9970b30205e214f52ef28",
    "examples/easy-vqa-test-7.png": "4c9fdf3af129473af467019ed455a4ab8a701859799da4ddeb97a46b38adec6f",
    "examples/examples.json": "29de520c000b50bfa8aed0e60366526267922b58e276c7e3e17e6edad7deb3a0",
    "model.safetensors": "7c3265a2835c2ec224f5f9d800c018750a2eda8bf07b87d05a8104448cf0cdc4",
    "preprocessor_config.json": "c489c50c9163e28fc2b631a167bc4c530505a48478d25a0c4a8cd972f1e4727f",
    "special_tokens_map.json": "a8e32cd9505b7cb01e60e7c62e72fe778ac8a7f46ddeb4c7d7f18c43e5c4251e",
    "tokenizer.json": "352fa5a171186e0bb583f0742054ce4dd1dcc59ca82d65bf7cd95d4fcb6b1495",
    "tokenizer_config.json": "9a149428696508970baf772fef18a63c73f41e66d6e1a6b497816362df82b16f",
}


def test_shipped_files_match_the_recorded_checksums():
    found = {str(p.relative_to(DEMO_MODEL_DIR)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(DEMO_MODEL_DIR.rglob("*")) if p.is_file() and p.name != "train_log.txt"}
    assert found == CHECKSUMS
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 20 << 20


@pytest.fixture(scope="module")
def llm():
    return LLM()  # no model given: the demo model


@pytest.fixture(scope="module")
def st3():
    return LLM(policy="st3")


@pytest.fixture(scope="module")
def examples():
    return json.loads((EXAMPLES / "examples.json").read_text())


def test_llm_without_a_model_is_the_demo_model(llm):
    assert default_model_dir() == DEMO_MODEL_DIR and llm.model_dir == DEMO_MODEL_DIR
    assert llm.model_config.text.num_hidden_layers == 8


def _ask(llm, items, policy_llm=None):
    reqs = [{"prompt": llm.tokenizer.chat_prompt(q, 1), "image": str(EXAMPLES / img)} for img, q in items]
    outs = (policy_llm or llm).generate(reqs, SamplingParams(max_tokens=20, temperature=0))
    return [o.text.strip() for o in outs]


def test_it_names_the_colour_and_shape_of_real_test_images(llm, examples):
    # 99.9% and 98.7% on the whole test split (README: Demo model).
    items = [(e["image"], q) for e in examples for q in ("what color is the shape?", "what shape is in the image?")]
    assert _ask(llm, items) == [x for e in examples for x in (e["color"], e["shape"])]


def test_it_answers_the_dataset_questions(llm, examples):
    """Every easy-VQA question of the shipped test images (yes/no, negations, colours, shapes).

    The bar is issue 7's goal, 95% (77 of 81): the model answers all 81 here and 99.4% of the whole
    test split; chance is ~50% on yes/no, 1/8 and 1/3 on colours and shapes.
    """
    items = [(e["image"], q) for e in examples for q, _ in e["qa"]]
    want = [a for e in examples for _, a in e["qa"]]
    got = _ask(llm, items)
    right = sum(g == w for g, w in zip(got, want))
    assert right >= 0.95 * len(want), list(zip(items, got, want))


def test_st3_keeps_the_answers(llm, st3, examples):
    # On these 81 questions allow ST3 (defaults) 3 more misses than full, and the shapes must all
    # stay right.
    items = [(e["image"], q) for e in examples for q, _ in e["qa"]]
    want = [a for e in examples for _, a in e["qa"]]
    full_right = sum(g == w for g, w in zip(_ask(llm, items), want))
    st3_right = sum(g == w for g, w in zip(_ask(llm, items, st3), want))
    assert st3_right >= full_right - 3, (st3_right, full_right)
    shapes = [(e["image"], "what shape is in the image?") for e in examples]
    assert _ask(llm, shapes, st3) == [e["shape"] for e in examples]


def test_captions_name_the_colour_and_shape_under_full_and_st3(llm, st3, examples):
    # "describe the image." is the long answer VTA acts on; full writes 7 of these 8 exactly (about
    # 3 in 4 of the test split's) and gets colour and shape right in all of them, as ST3 must.
    items = [(e["image"], "describe the image.") for e in examples]
    for got in (_ask(llm, items), _ask(llm, items, st3)):
        assert all(f"{e['color']} {e['shape']}" in g for e, g in zip(examples, got)), got
        assert sum(g == e["caption"] for e, g in zip(examples, got)) >= 5, got


def test_cli_without_a_model_answers_a_real_question(examples):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e = examples[0]
    r = subprocess.run([sys.executable, "-m", "engine.generate", "--image", str(EXAMPLES / e["image"]),
                        "--prompt", "what color is the shape?"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == e["color"] and "demo model" in r.stderr
