"""Continuous batching: who runs next, admission by free blocks, preemption, VTA budgets, finishing.

A step is either a prefill of newly admitted requests (first come, first served, under a token
budget) or a decode of every running request, as in nano-vllm. Admission asks the policy how many
visual entries each layer will keep, so pruning policies admit more. When the pool runs dry during
decode, the newest running request is preempted: its blocks are freed and it is recomputed later.
"""
from __future__ import annotations

import logging
import operator
from collections import deque
from dataclasses import dataclass

import torch

from cache.layered import LayeredKVCache
from scheduler.sequence import Sequence, Status

from .policy import Full, event_budgets, removal_bound

log = logging.getLogger("st3")


@dataclass(frozen=True)
class EvictionDue:
    """What the device-side eviction at the end of a forward needs from the host."""
    budgets: list[list[int]]  # [B][event layers] visual entries each event layer may keep
    bound: int                # most entries it can move (sizes the safe move lists)
    # (visual entries per layer, ((event layer, budget), ...)) of each sequence that loses entries
    losing: list[tuple[list[int], tuple[tuple[int, int], ...]]]
    group_sizes: list[int]    # layers from each event layer to the next (or the last)

    def ranks(self) -> list[bool]:
        """Per event layer: whether any sequence must lose entries there, i.e. the eviction reads its scores."""
        return [any(held[layer] > b for held, due in self.losing for layer, b in [due[k]])
                for k in range(len(self.group_sizes))]

    def expected_removals(self) -> float:
        """About how many entries the eviction removes, over all sequences and layers (sizes move lists on CPUs).

        The layers after an event layer hold what it holds. A token evicted at one event layer also leaves
        the deeper ones that still hold it; take a deeper set to lose the same share as the sets above it
        (a real model, whose deep sets keep what shallow layers rank high, loses less there).
        """
        total = 0.0
        for held, due in self.losing:
            keep = 1.0
            for (layer, budget), size in zip(due, self.group_sizes):
                h = held[layer]
                left = min(h * keep, budget)
                total += size * (h - left)
                keep = left / h if h else keep
        return total


class Scheduler:
    def __init__(self, cache: LayeredKVCache, policy: Full, num_layers: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.cache, self.policy, self.num_layers = cache, policy, num_layers
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        events = policy.event_layers(num_layers)  # layers from each event layer to the next (or the last)
        self._group_sizes = [b - a for a, b in zip(events, events[1:] + [num_layers])]

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- sizing -----------------------------------------------------------------------------
    def prefill_lens(self, seq: Sequence) -> list[int]:
        """Entries each layer holds after this sequence's prefill, from the policy's budgets."""
        text = seq.prompt_len - seq.num_visual
        return [text + g for g in self.policy.budgets(seq.num_visual, self.num_layers)]

    def prefill_blocks(self, seq: Sequence) -> int:
        return self.cache.blocks_for(self.prefill_lens(seq))

    # ---- scheduling -------------------------------------------------------------------------
    def schedule(self) -> tuple[list[Sequence], bool]:
        """The batch for the next forward and whether it is a prefill."""
        batch, tokens = [], 0
        # Beside other work, admit only with a block per layer to spare, so the step after a
        # prefill can decode without preempting what was just admitted.
        reserve = self.num_layers
        while self.waiting and len(self.running) < self.max_num_seqs and self.cache.num_free_seats:
            seq = self.waiting[0]
            need = self.prefill_blocks(seq)
            if batch and tokens + seq.prompt_len > self.max_num_batched_tokens:
                break
            if need + (reserve if self.running or batch else 0) > self.cache.pool.num_free:
                break
            self.waiting.popleft()
            seq.seat = self.cache.allocate(self.prefill_lens(seq))
            seq.status, seq.cursor = Status.RUNNING, 0
            seq.visual_per_layer = list(self.policy.budgets(seq.num_visual, self.num_layers))
            self.running.append(seq)
            batch.append(seq)
            tokens += seq.prompt_len
        if batch:
            return batch, True
        # Decode: every running sequence needs room for one more entry per layer.
        while self.running:
            need = self.cache.blocks_to_append([s.seat for s in self.running])
            if need <= self.cache.pool.num_free:
                break
            self.preempt(self.running[-1])
        return list(self.running), False

    def preempt(self, seq: Sequence) -> None:
        """Free a sequence's cache and queue it first for recomputation (it keeps its tokens)."""
        self.running.remove(seq)
        self.cache.free(seq.seat)
        seq.seat, seq.status = None, Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        log.info("preempted request %s: KV pool full, recomputed later (preemption %d of it)", seq.request_id,
                    seq.num_preemptions)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and return its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            seq.kv_blocks_final = self.cache.blocks_held(seq.seat)
            self.cache.free(seq.seat)
            seq.seat = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ---- VTA --------------------------------------------------------------------------------
    def eviction_budgets(self, seqs: list[Sequence]) -> EvictionDue | None:
        """Budgets per event layer for the eviction at the end of this forward (None: nothing to evict).

        A forward run at cursor c also evicts what must be gone before the forward at cursor c + 1, whose
        budgets are decode_budgets(c + 1). Sequences with nothing to lose get a budget no layer reaches.
        Also returns a bound on the entries the eviction can move, and what it needs to estimate how many
        it will move (engine/eviction.py sizes its move lists by them).
        """
        if not self.policy.anneals:
            return None
        L, k = self.num_layers, len(self._group_sizes)
        never = max(s.num_visual for s in seqs) + 1
        budgets, bound, losing = [], 0, []
        for seq in seqs:
            t = seq.cursor + 1
            if seq.num_visual and self.policy.needs_decode_scores(seq.num_visual, L, t, seq.visual_per_layer):
                due = event_budgets(self.policy, seq.num_visual, L, t)
                budgets.append([b for _, b in due])
                bound += removal_bound(self.policy, seq.num_visual, L, t)
                losing.append((seq.visual_per_layer, due))
            else:
                budgets.append([never] * k)
        return EvictionDue(budgets, bound, losing, self._group_sizes) if losing else None

    def apply_evictions(self, seqs: list[Sequence], new_lens: torch.Tensor) -> int:
        """Take the per-layer lengths a device-side eviction left ([B, L]); return the blocks freed."""
        seats = [s.seat for s in seqs]
        removed = self.cache.lens[seats] - new_lens
        freed = self.cache.shrink(seats, new_lens)
        for seq, lost in zip(seqs, removed.tolist()):  # one conversion for the batch, not one per sequence
            if any(lost):
                seq.visual_per_layer = list(map(operator.sub, seq.visual_per_layer, lost))
        return freed
