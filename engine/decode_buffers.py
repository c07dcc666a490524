"""Static decode inputs and the CUDA graphs that replay the decode step over them.

Every per-step input lives in a preallocated buffer sized for the largest batch and the longest
context, so a captured graph reads fresh values on every replay and a block table can never
outgrow its capture. Padded rows write to the pool's trash slot and attend to nothing.
"""
from __future__ import annotations

from typing import Callable

import torch


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then steps of 8 up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeBuffers:
    def __init__(self, max_bs: int, num_layers: int, max_blocks: int, trash_slot: int, device: torch.device):
        self.trash_slot = trash_slot
        z = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        self.input_ids, self.positions = z(max_bs), z(max_bs)
        self.slot_mapping = torch.full((num_layers, max_bs), trash_slot, dtype=torch.int64, device=device)
        self.block_tables = z(max_bs, num_layers, max_blocks)
        self.context_lens = z(max_bs, num_layers)

    def fill(self, n: int, rows: int, input_ids, positions, slot_mapping, block_tables, context_lens) -> None:
        """Copy n live rows in and reset rows n..rows-1 to padding (slot = trash, length 0)."""
        w = block_tables.shape[-1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:, :n].copy_(slot_mapping, non_blocking=True)
        self.block_tables[:n, :, :w].copy_(block_tables, non_blocking=True)
        self.context_lens[:n].copy_(context_lens, non_blocking=True)
        if rows > n:
            self.input_ids[n:rows] = 0
            self.positions[n:rows] = 0
            self.slot_mapping[:, n:rows] = self.trash_slot
            self.context_lens[n:rows] = 0

    def view(self, rows: int, width: int) -> tuple[torch.Tensor, ...]:
        return (self.input_ids[:rows], self.positions[:rows], self.slot_mapping[:, :rows],
                self.block_tables[:rows, :, :width], self.context_lens[:rows])


class DecodeGraphs:
    """One CUDA graph per batch bucket, captured largest first and sharing one memory pool."""

    def __init__(self, step: Callable, buffers: DecodeBuffers, max_num_seqs: int, max_blocks: int):
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.buffers, self.max_blocks = buffers, max_blocks
        pool = None
        for bs in reversed(graph_buckets(max_num_seqs)):
            inputs = buffers.view(bs, max_blocks)
            step(*inputs)  # warm up (allocator, lazy inits) outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[bs] = step(*inputs)
            pool = g.pool() if pool is None else pool
            self.graphs[bs] = g
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int | None:
        return min((b for b in self.graphs if b >= n), default=None)

    def replay(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.graphs[bs].replay()
        return self.outputs[bs]
