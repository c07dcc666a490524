"""tools/demo/eval_vqa.py: question families (yes/no split by whether the named colour or shape is there), bad settings."""
from __future__ import annotations

import pytest

from tools.demo.eval_vqa import answer_kinds


@pytest.mark.parametrize("question, gold, kinds", [
    ("what color is the shape?", "teal", ("colour",)),
    ("what shape is in the image?", "circle", ("shape",)),
    ("is there a red shape?", "yes", ("yes/no", "yes/no present")),
    ("is there a red shape?", "no", ("yes/no", "yes/no absent")),
    ("is there not a red shape in the image?", "no", ("yes/no", "yes/no present")),
    ("does the image not contain a circle?", "yes", ("yes/no", "yes/no absent")),
    ("is no triangle present?", "no", ("yes/no", "yes/no present")),
])
def test_answer_kinds(question, gold, kinds):
    assert answer_kinds(question, gold) == kinds


@pytest.mark.parametrize("argv, message", [
    (["--policies", "full;fastv:start_layer=1"], "--policies 'fastv:start_layer=1': policy 'fastv' has no knob"),
    (["--policies", "st3:ratio=1.5"], "ratio must be in [0, 1)"),
    (["--policies", "nope"], "unknown policy"),
    (["--model", "/no/such/dir"], "--model"),
])
def test_bad_settings_exit_2_before_any_evaluation(argv, message, capsys):
    from tools.demo.eval_vqa import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: "), err   # one line, as every CLI here
