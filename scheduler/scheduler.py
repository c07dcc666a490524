"""Continuous batching: who runs next, admission by free blocks, preemption, VTA evictions, finishing.

A step is either a prefill of newly admitted requests (first come, first served, under a token
budget) or a decode of every running request, as in nano-vllm. Admission asks the policy how many
visual entries each layer will keep, so pruning policies admit more. When the pool runs dry during
decode, the newest running request is preempted: its blocks are freed and it is recomputed later.
"""
from __future__ import annotations

import logging
from collections import deque

import torch

from cache.layered import LayeredKVCache
from scheduler.sequence import Sequence, Status

from .policy import Full

logger = logging.getLogger("st3")


class Scheduler:
    def __init__(self, cache: LayeredKVCache, policy: Full, num_layers: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.cache, self.policy, self.num_layers = cache, policy, num_layers
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

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
        seq.seat, seq.status, seq.scores = None, Status.WAITING, None
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.info("preempted request %s: KV pool full, recomputed later (preemption %d of it)", seq.request_id,
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
    def evict_visual(self) -> int:
        """Apply the policy's decode-time evictions to every running sequence; return blocks freed.

        All sequences are handled together and on the host (scores arrive there with the sampled tokens;
        the cache mirrors each entry's visual index), so the device sees one batched copy per step.
        """
        if not self.policy.anneals:
            return 0
        L, events = self.num_layers, self.policy.event_layers(self.num_layers)
        seqs, budgets = [], []
        for seq in self.running:
            if seq.scores is None or seq.num_visual == 0 or seq.cursor == 0:
                continue
            if self.policy.needs_decode_scores(seq.num_visual, L, seq.cursor, seq.visual_per_layer):
                b = self.policy.decode_budgets(seq.num_visual, L, seq.cursor)
                seqs.append(seq)
                budgets.append([b[layer] for layer in events])
        if not seqs:
            return 0
        seats = [s.seat for s in seqs]
        visual, slots, valid = self.cache.entry_visual(seats)               # [B, L, W]
        n = max(s.num_visual for s in seqs)
        idx = torch.where(visual >= 0, visual, n).long()                   # column n: not visual
        present = torch.zeros(len(seqs), len(events), n + 1, dtype=torch.bool)
        present.scatter_(2, idx[:, events], True)
        scores = torch.zeros(len(seqs), len(events), n)
        for b, s in enumerate(seqs):
            scores[b, :, :s.num_visual] = s.scores
        gone = self.policy.evictions(present[..., :n], scores, torch.tensor(budgets))  # [B, K, n]
        # Layer l follows the deepest event layer at or below it; layers below the first keep everything.
        k_of = torch.tensor([sum(e <= layer for e in events) - 1 for layer in range(L)])
        gone = torch.cat([torch.zeros_like(gone[:, :1]), gone], 1)          # row 0: "no event yet"
        gone = torch.nn.functional.pad(gone, (0, 1))                        # column n: never gone
        remove = gone[:, k_of + 1].gather(2, idx)                           # [B, L, W]
        freed, dst, src = self.cache.trim(seats, remove, (slots, valid))
        self.cache.move(dst, src)
        for seq, removed in zip(seqs, remove.sum(2).tolist()):
            seq.visual_per_layer = [k - r for k, r in zip(seq.visual_per_layer, removed)]
        return freed
