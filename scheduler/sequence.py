"""Sequence: one request's state as it moves through the scheduler."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a type only: the scheduler never imports the engine
    from engine.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: schedulers look sequences up in lists
class Sequence:
    request_id: str
    prompt_ids: list[int]               # `<image>` already expanded to one id per visual token
    pixel_values: torch.Tensor | None   # [num_images, 3, H, W]
    params: SamplingParams
    seed: int                           # the request's seed, or one drawn for it at admission
    eos_ids: frozenset[int]
    num_visual: int                     # N0
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # Tokens produced in the current incarnation. After a preemption the sequence is recomputed and
    # replays its recorded tokens (cursor < len(output_ids)) before it samples new ones, so its
    # cache, ST3 sets and scores end up exactly as if it had never been preempted.
    cursor: int = 0
    seat: int | None = None
    text: str = ""
    finish_reason: str | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)  # gaps between token_times, kept as they arrive
    kv_peak_blocks: int = 0
    kv_blocks_final: int = 0
    visual_per_layer: list[int] = field(default_factory=list)
    prompt: str | None = None           # the prompt text, if the request gave one (RequestOutput.prompt)
    parent_id: str | None = None        # n > 1: the request this completion belongs to
    index: int = 0                      # n > 1: which of the n completions this is

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def replaying(self) -> bool:
        return self.cursor < len(self.output_ids)

    def next_input(self) -> tuple[int, int]:
        """(token id, position) fed to the next decode forward."""
        return self.output_ids[self.cursor - 1], self.prompt_len + self.cursor - 1
