"""The training schedule: warmup, cosine over whichever of time or steps runs out first, pauses not counted."""
import math
import time

from tools.demo.lr_schedule import TimeBoxedCosine


def test_step_budget_ends_the_cosine():
    s = TimeBoxedCosine(1e-3, minutes=60, max_steps=100, warmup=10)
    assert math.isclose(s.lr(0), 1e-4, rel_tol=1e-3)            # first warmup step, cosine ~1
    assert math.isclose(s.lr(50), 0.5e-3, rel_tol=1e-3)          # halfway: cos(pi/2)
    assert s.lr(99) < 1e-6 and not s.done(99) and s.done(100)


def test_time_budget_ends_the_cosine_and_pauses_do_not_count():
    s = TimeBoxedCosine(1e-3, minutes=0.002, max_steps=10**9, warmup=1)  # 0.12 s
    with s.paused():
        time.sleep(0.2)
    assert not s.done(1) and s.lr(1) > 0.9e-3
    time.sleep(0.15)
    assert s.done(1) and s.lr(1) == 0.0
