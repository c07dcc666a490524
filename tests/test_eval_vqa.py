"""tools/eval_vqa.py's question families: yes/no split by whether the named colour or shape is there."""
from __future__ import annotations

import pytest

from tools.eval_vqa import answer_kinds


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
