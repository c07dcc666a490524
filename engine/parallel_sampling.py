"""n > 1: several completions of one prompt from one prefill (vLLM's SamplingParams.n).

A request with n > 1 is queued as its lead sequence (completion 0) and prefilled like any other. In
the step of that prefill, before sampling, `fork` gives each of the n-1 siblings a copy of the lead's
KV cache (LayeredKVCache.fork) and a copy of the lead's logits row, so all n draw their first token
from the one prefill and then decode as independent sequences (completion i seeds with seed + i).
A sibling that finds no free seat or blocks at that moment waits in the queue and gets its own
prefill later: the same completion, one more prefill.

Outputs: every step's output of a member becomes one RequestOutput of the request holding all n
completions (each with its own delta); the members are forgotten together once all have finished.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from scheduler.sequence import Sequence, Status

from .outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from .model_runner import Eviction


@dataclass
class Family:
    n: int                   # completions still expected (lowered by abort)
    members: list[Sequence]  # by index; members[0] is the lead

    @property
    def done(self) -> bool:
        return len(self.members) >= self.n and all(s.is_finished for s in self.members)


class Families:
    """The n > 1 requests of an LLM, by request id."""

    def __init__(self):
        self.by_id: dict[str, Family] = {}

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def add(self, lead: Sequence) -> None:
        self.by_id[lead.request_id] = Family(lead.params.n, [lead])

    def of(self, seq_or_id: Sequence | str) -> Family | None:
        if isinstance(seq_or_id, Sequence):
            return self.by_id.get(seq_or_id.parent_id or seq_or_id.request_id)
        return self.by_id.get(seq_or_id)

    def members(self, request_id: str, seqs: dict[str, Sequence]) -> list[Sequence]:
        """The sequences of a request: its family's, or just its own."""
        fam = self.by_id.get(request_id)
        return fam.members if fam is not None else [seqs[request_id]]

    def stop_forking(self, request_id: str) -> list[Sequence]:
        """An aborted request: no more siblings; returns its members."""
        fam = self.by_id.get(request_id)
        if fam is None:
            return []
        fam.n = len(fam.members)
        return fam.members

    def fork(self, llm, seqs: list[Sequence], logits: torch.Tensor, eviction: Eviction | None
             ) -> tuple[list[Sequence], torch.Tensor, Eviction | None]:
        """After a prefill: the siblings of freshly prefilled leads, with cache copies and the leads' logits rows.

        Under ST3 the prefill forward has already compacted the lead's layers on the device for its first
        eviction, while the host still holds the old lengths; the copy covers those, and the sibling takes
        the lead's row of the eviction's new lengths, so both shrink alike when the step reads them back.
        """
        added, rows = [], []
        cache, sched = llm.cache, llm.scheduler
        for b, lead in enumerate(seqs):
            fam = self.by_id.get(lead.request_id)
            if fam is None or lead.index or len(fam.members) >= fam.n:
                continue
            for i in range(len(fam.members), fam.n):
                p = lead.params
                sib = Sequence(f"{lead.request_id}#{i}", lead.prompt_ids, lead.pixel_values, p,
                               seed=p.seed + i if p.seed is not None else llm._rng.getrandbits(62),
                               eos_ids=lead.eos_ids, num_visual=lead.num_visual, prompt=lead.prompt,
                               parent_id=lead.request_id, index=i, arrival_time=lead.arrival_time)
                # Leave a block per layer for the next decode step, as the scheduler does when admitting.
                room = cache.pool.num_free >= cache.blocks_held(lead.seat) + sched.num_layers
                if room and cache.num_free_seats and len(sched.running) < sched.max_num_seqs:
                    sib.seat, sib.status = cache.fork(lead.seat), Status.RUNNING
                    sib.visual_per_layer = list(lead.visual_per_layer)
                    sched.running.append(sib)
                    added.append(sib)
                    rows.append(b)
                else:
                    sched.add(sib)
                fam.members.append(sib)
                llm._register(sib, owned=lead.request_id in llm._owned)
        if not added:
            return seqs, logits, eviction
        if eviction is not None:
            eviction = dataclasses.replace(eviction, new_lens=torch.cat([eviction.new_lens, eviction.new_lens[rows]]))
        return seqs + added, torch.cat([logits, logits[rows]]), eviction

    def output(self, llm, seq: Sequence, delta: str, blocks_now: int | None, fam: Family | None = None
               ) -> RequestOutput:
        """The whole request's output after `seq` moved; only `seq`'s completion carries a delta.

        `fam` stands in for a family already forgotten (an output made after its abort).
        """
        fam = fam or self.of(seq)
        lead = fam.members[0]
        head = llm._single_output(lead, delta if seq is lead else "", blocks_now if seq is lead else None)
        completions = [CompletionOutput(m.index, m.text, list(m.output_ids), m.finish_reason,
                                        list(m.logprobs) if m.params.logprobs is not None else None,
                                        delta if m is seq else "") for m in fam.members]
        head.outputs = completions
        head.stats["generated_tokens"] = sum(len(m.output_ids) for m in fam.members)
        head.stats["preemptions"] = sum(m.num_preemptions for m in fam.members)
        head.stats["n"] = fam.n
        return head

    @staticmethod
    def merge(outputs: list[RequestOutput]) -> list[RequestOutput]:
        """One output per request per step: the latest state, with every completion's delta of the step."""
        by_id: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            by_id.setdefault(out.request_id, []).append(out)
        merged = []
        for group in by_id.values():
            last = group[-1]
            if len(group) > 1:
                for i, c in enumerate(last.outputs):
                    c.delta = "".join(o.outputs[i].delta for o in group if i < len(o.outputs))
            merged.append(last)
        return merged
