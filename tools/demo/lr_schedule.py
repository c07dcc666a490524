"""A time-boxed warmup + cosine learning-rate schedule, and the training loop both training stages run."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch


class TimeBoxedCosine:
    """Linear warmup then cosine to zero, ending when `minutes` of training time or `max_steps` run out.

    Progress is the larger of the time and step fractions, measured at every step, so the decay still
    ends on time when the step time changes part way (a curriculum that switches to longer samples).
    Time spent inside `paused()` (evaluation) does not count.
    """

    def __init__(self, peak: float, minutes: float, max_steps: int, warmup: int = 50,
                 clock: Callable[[], float] = time.perf_counter):
        self.peak, self.minutes, self.max_steps, self.warmup = peak, minutes, max_steps, warmup
        self.clock = clock  # seconds; tests pass a fake one
        self.t0 = clock()
        self._paused = 0.0

    def minutes_elapsed(self) -> float:
        """Training minutes so far (pauses excluded)."""
        return (self.clock() - self.t0 - self._paused) / 60

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
        t = self.clock()
        try:
            yield
        finally:
            self._paused += self.clock() - t


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, lr: float) -> None:
    """Backward, clip the gradient norm to 1, and step `opt` at learning rate `lr`."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_time_boxed(sched: TimeBoxedCosine, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                     next_loss: Callable[[], torch.Tensor], evaluate: Callable[[], str], log, *, name: str,
                     log_every: int, eval_every: int) -> int:
    """Step `opt` on next_loss() until `sched` is done: a progress line every `log_every` steps, and
    evaluate()'s report (its time not counted) every `eval_every` steps and at the end. Returns the steps taken."""
    step = 0
    while not sched.done(step):
        lr_now = sched.lr(step)
        loss = next_loss()
        optimizer_step(opt, params, loss, lr_now)
        step += 1
        if step % log_every == 0:
            log(f"{name} step {step} loss {loss.item():.4f} lr {sched.lr(step):.2e} "
                f"{sched.minutes_elapsed():.1f}/{sched.minutes:g} min", bar=True)
        if step % eval_every == 0 or sched.done(step):
            with sched.paused():
                log(f"  {name} step {step}: {evaluate()}")
    return step
