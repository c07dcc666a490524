"""A time-boxed warmup + cosine learning-rate schedule, and the optimizer step both training stages take."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch


class TimeBoxedCosine:
    """Linear warmup then cosine to zero, ending when `minutes` of training time or `max_steps` run out.

    Progress is the larger of the time and step fractions, measured at every step, so the decay still
    ends on time when the step time changes part way (a curriculum that switches to longer samples).
    Time spent inside `paused()` (evaluation) does not count.
    """

    def __init__(self, peak: float, minutes: float, max_steps: int, warmup: int = 50):
        self.peak, self.minutes, self.max_steps, self.warmup = peak, minutes, max_steps, warmup
        self.t0 = time.perf_counter()
        self._paused = 0.0

    def minutes_elapsed(self) -> float:
        """Training minutes so far (pauses excluded)."""
        return (time.perf_counter() - self.t0 - self._paused) / 60

    def progress(self, step: int) -> float:
        """How far through the schedule `step` is, in [0, 1]."""
        return min(1.0, max(step / self.max_steps, self.minutes_elapsed() / self.minutes))

    def lr(self, step: int) -> float:
        """Learning rate for `step` (0-based)."""
        ramp = min(1.0, (step + 1) / self.warmup)
        return self.peak * ramp * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def done(self, step: int) -> bool:
        """True once the time box or the step budget is spent."""
        return self.progress(step) >= 1.0

    @contextmanager
    def paused(self):
        """A block whose time (an evaluation, say) the time box does not count."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, lr: float) -> None:
    """Backward, clip the gradient norm to 1, and step `opt` at learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
