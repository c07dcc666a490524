"""The training schedule: warmup, cosine over whichever of time or steps runs out first, pauses not counted."""
import math

from tools.demo.lr_schedule import TimeBoxedCosine


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_step_budget_ends_the_cosine():
    s = TimeBoxedCosine(1e-3, minutes=60, max_steps=100, warmup=10, clock=FakeClock())
    assert math.isclose(s.lr(0), 1e-4, rel_tol=1e-3)            # first warmup step, cosine ~1
    assert math.isclose(s.lr(50), 0.5e-3, rel_tol=1e-3)          # halfway: cos(pi/2)
    assert s.lr(99) < 1e-6 and not s.done(99) and s.done(100)


def test_time_budget_ends_the_cosine_and_pauses_do_not_count():
    clock = FakeClock()
    s = TimeBoxedCosine(1e-3, minutes=2, max_steps=10**9, warmup=1, clock=clock)
    with s.paused():
        clock.now += 600                                         # a 10-minute evaluation
    assert s.minutes_elapsed() == 0 and not s.done(1) and s.lr(1) == 1e-3
    clock.now += 60                                              # one training minute: halfway
    assert math.isclose(s.lr(1), 0.5e-3) and not s.done(1)
    clock.now += 60
    assert s.done(1) and s.lr(1) == 0.0
