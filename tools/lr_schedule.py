"""A time-boxed warmup + cosine learning-rate schedule, and the optimizer step both training stages take."""
from __future__ import annotations

import math
import time

import torch


class TimeBoxedCosine:
    """Linear warmup then cosine to zero over a horizon that fits in `minutes`.

    The horizon is the smaller of `max_steps` and what the measured step time allows; it is
    re-estimated once, after `probe` steps, so the decay ends when the time box does.
    """

    def __init__(self, peak: float, minutes: float, max_steps: int, warmup: int = 50, probe: int = 20):
        self.peak, self.minutes, self.warmup, self.probe = peak, minutes, warmup, probe
        self.horizon = max_steps
        self.t0 = time.perf_counter()

    def lr(self, step: int) -> float:
        """Learning rate for `step` (0-based); fixes the horizon at step `probe`."""
        if step == self.probe:
            per_step = (time.perf_counter() - self.t0) / step
            self.horizon = min(self.horizon, max(step + 1, int(self.minutes * 60 / per_step)))
        ramp = min(1.0, (step + 1) / self.warmup)
        return self.peak * ramp * 0.5 * (1 + math.cos(math.pi * min(step / self.horizon, 1.0)))

    def done(self, step: int) -> bool:
        """True once `step` steps have been taken and the horizon is reached."""
        return step >= self.horizon

    def minutes_elapsed(self) -> float:
        return (time.perf_counter() - self.t0) / 60


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, lr: float) -> None:
    """Backward, clip the gradient norm to 1, and step `opt` at learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
