"""tools/demo/train.py's shared-prefix packing trains exactly the single-turn samples the engine serves."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from engine.default_model import DEMO_MODEL_DIR
from models.image import load_preprocessor_config, preprocess
from models.loader import load_model
from models.tokenizer import Tokenizer
from tools.demo.easy_vqa_data import DESCRIBE, Example
from tools.demo.conversations import Conversations, collate
from tools.demo.train import logits_from_features


def _example(image: str) -> Example:
    qa = [("what color is the shape?", "blue"), ("is there a circle?", "no"),
          ("does the image not contain a gray shape?", "yes"), ("what shape is present?", "triangle")]
    return Example(0, DEMO_MODEL_DIR / "examples" / image, "blue", "triangle",
                   "a small blue triangle in the bottom right.", qa)


def _image_token() -> int:
    from models.config import load_config
    return load_config(DEMO_MODEL_DIR).image_token_index


def test_each_packed_question_equals_its_own_first_turn():
    model = load_model(DEMO_MODEL_DIR)
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    cfg = model.config
    num_visual = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    conv = Conversations(tok, cfg.image_token_index, num_visual)
    examples = [_example("easy-vqa-test-0.png"), _example("easy-vqa-test-1.png")]
    random.Random(0).shuffle(examples[1].qa)  # different lengths and orders across the batch: padding too
    examples[1].qa.pop()
    pre = load_preprocessor_config(DEMO_MODEL_DIR, cfg.vision.image_size)
    pixels = torch.stack([preprocess(Image.open(e.image_path), pre) for e in examples])
    feats = model.vision_tower(pixels)[:, 1:]
    batch = collate([conv.build(e) for e in examples], pad=0)
    packed = logits_from_features(model, batch, feats)
    ids, labels, positions, logits = (batch.turn_view(t) for t in (batch.ids, batch.labels, batch.positions, packed))
    assert batch.ids[:, :batch.prefix_len].tolist() == [conv.prompt("x")[:batch.prefix_len]] * 2

    checked = 0
    for b, e in enumerate(examples):
        for k, (q, a) in enumerate(list(e.qa) + [(DESCRIBE, e.caption)]):
            alone = conv.prompt(q) + conv._enc(a) + [conv.eos]
            ref = model.dense_logits(torch.tensor([alone]), pixels[b:b + 1])[0]
            n = len(alone) - batch.prefix_len                     # the turn's own tokens, then padding
            assert ids[b, k, :n].tolist() == alone[-n:]
            assert positions[b, k, :n].tolist() == list(range(batch.prefix_len, len(alone)))
            torch.testing.assert_close(logits[b, k, :n], ref[-n:], rtol=1e-4, atol=1e-4)
            answer = labels[b, k][labels[b, k] != -100].tolist()
            assert answer == conv._enc(a) + [conv.eos]            # only the answer is trained
            checked += 1
    assert checked == 9
    torch.testing.assert_close(packed[:, :batch.prefix_len],     # the prefix is a plain causal forward
                               model.dense_logits(batch.ids[:, :batch.prefix_len], pixels), rtol=1e-4, atol=1e-4)
    assert (labels[1, 4] == -100).all()                           # the missing fifth turn of image 1 is padding


def test_yes_no_questions_are_balanced_and_answered_from_the_labels():
    import numpy as np
    from tools.demo.easy_vqa_data import COLORS, SHAPES, YES_NO_TEMPLATES, with_yes_no_questions
    ex = _example("easy-vqa-test-0.png")
    (aug,) = with_yes_no_questions([ex], per_image=400, rng=np.random.default_rng(1))
    assert aug.qa[:len(ex.qa)] == ex.qa
    extra = aug.qa[len(ex.qa):]
    assert len(extra) == 400
    negated = {t.format(x): neg for t, neg in YES_NO_TEMPLATES for x in [f"{c} shape" for c in COLORS] + list(SHAPES)}
    present = 0
    for q, a in extra:
        assert q in negated, q                                   # easy-VQA's own wording
        there = "blue shape" in q or "triangle" in q             # the example is a blue triangle
        assert a == ("yes" if there != negated[q] else "no"), q
        present += there
    assert 150 < present < 250                                   # about half name what is there


def test_yes_no_only_samples_have_no_own_questions_and_no_caption():
    import numpy as np
    from tools.demo.easy_vqa_data import with_yes_no_questions
    conv = Conversations(Tokenizer.from_dir(DEMO_MODEL_DIR), _image_token(), 256)
    (only,) = with_yes_no_questions([_example("easy-vqa-test-0.png")], 5, np.random.default_rng(0), keep_own=False)
    assert len(only.qa) == 5 and all(a in ("yes", "no") for _, a in only.qa)
    packed = conv.build(only, describe=False)
    assert len(packed.turns) == 5
    for (ids, _), (q, _) in zip(packed.turns, only.qa):
        own = conv._split(q)[1]
        assert ids[:len(own)] == own


def test_multi_turn_conversation_starts_as_a_first_turn_and_trains_every_answer():
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    conv = Conversations(tok, _image_token(), 256)
    ex = _example("easy-vqa-test-0.png")
    packed = conv.build_multi_turn(ex, random.Random(3))
    assert len(packed.turns) == 1
    ids, labels = packed.turns[0]
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    turns = list(ex.qa) + [(DESCRIBE, ex.caption)]
    question = next(q for q, _ in turns if conv.prompt(q) == packed.prefix + ids[:first])
    assert packed.prefix + ids[:first] == conv.prompt(question)  # the first turn is what the engine feeds
    trained = [t for t in labels if t != -100]
    assert len(trained) == sum(len(conv._enc(a)) + 1 for _, a in list(ex.qa) + [(DESCRIBE, ex.caption)])
    assert trained.count(conv.eos) == len(ex.qa) + 1


def test_multi_turn_packed_forward_is_plain_causal():
    model = load_model(DEMO_MODEL_DIR)
    conv = Conversations(Tokenizer.from_dir(DEMO_MODEL_DIR), _image_token(), 256)
    examples = [_example("easy-vqa-test-0.png"), _example("easy-vqa-test-1.png")]
    examples[1].qa.pop()                                          # a shorter conversation: padding
    batch = collate([conv.build_multi_turn(e, random.Random(k)) for k, e in enumerate(examples)], pad=0)
    pre = load_preprocessor_config(DEMO_MODEL_DIR, 64)
    pixels = torch.stack([preprocess(Image.open(e.image_path), pre) for e in examples])
    packed = logits_from_features(model, batch, model.vision_tower(pixels)[:, 1:])
    for b in range(2):
        n = int((batch.labels[b] != -100).nonzero().max()) + 1
        ref = model.dense_logits(batch.ids[b:b + 1, :n], pixels[b:b + 1])[0]
        torch.testing.assert_close(packed[b, :n], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("whiten", [None, 0.1, 0.0])
def test_folded_preconditioner_reads_raw_features_exactly(whiten):
    from models.llava import LlavaMultiModalProjector
    from tools.demo.preconditioner import fold_preconditioner, preconditioner
    torch.manual_seed(0)
    proj = LlavaMultiModalProjector(load_model(DEMO_MODEL_DIR).config).double()
    n = proj.linear_1.in_features
    mix = torch.randn(n, n, dtype=torch.float64)  # correlated channels, as the tower's are
    feats = (torch.randn(3, 400, n, dtype=torch.float64) @ mix) * 5 + 2
    mean, m = preconditioner(feats, whiten)
    mean, m = mean.double(), m.double()
    pre = (feats - mean) @ m
    if whiten == 0.0:  # plain whitening: identity covariance
        cov = pre.flatten(0, 1).T @ pre.flatten(0, 1) / (pre.shape[0] * pre.shape[1])
        torch.testing.assert_close(cov, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-4)
    trained = proj(pre)
    fold_preconditioner(proj, mean, m)
    torch.testing.assert_close(proj(feats), trained)


def test_question_kind_splits_yes_no_by_what_is_named():
    from tools.demo.easy_vqa_data import question_kind
    assert question_kind("what color is the shape?", "teal") == "colour"
    assert question_kind("what is the blue shape?", "circle") == "shape"
    assert question_kind("is there a red shape?", "yes") == "yes/no present"
    assert question_kind("is there a red shape?", "no") == "yes/no absent"
    assert question_kind("is no circle present?", "no") == "yes/no present"  # negated: the circle is there
    assert question_kind("is there not a triangle?", "yes") == "yes/no absent"


@pytest.mark.parametrize("argv", [["--standardise", "--whiten", "0.1"], ["--whiten", "-1"],
                                  ["--raw-features", "--whiten", "0.1"], ["--raw-features", "--standardise"]])
def test_bad_preconditioner_options_exit_2_before_any_work(argv, tmp_path, capsys):
    from tools.demo.train import main
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "m"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("--whiten" in err or "--standardise" in err), err
    assert not (tmp_path / "m").exists()
