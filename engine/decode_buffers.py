"""Static decode inputs and the CUDA graphs that replay the decode step over them.

Every per-step input lives in a preallocated buffer sized for the largest batch and the longest
context, so a captured graph reads fresh values on every replay and a block table can never
outgrow its capture. Padded rows write to the pool's trash slot and attend to nothing.

Graphs are captured per (batch bucket, table-width bucket): the gather path copies every entry a
table spans, so replaying a max_model_len-wide graph for a 700-token context would gather six
times what it needs.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("st3")


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then steps of 8 up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


def width_buckets(max_blocks: int, smallest: int = 16) -> list[int]:
    """Block-table widths to capture: powers of two from `smallest` blocks, then max_blocks."""
    widths, w = [], smallest
    while w < max_blocks:
        widths.append(w)
        w *= 2
    return widths + [max_blocks]


class DecodeBuffers:
    def __init__(self, max_bs: int, num_layers: int, max_blocks: int, trash_slot: int, device: torch.device,
                 num_score_layers: int = 0, num_events: int = 0, max_visual: int = 0):
        self.trash_slot = trash_slot
        z = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        self.input_ids, self.positions = z(max_bs), z(max_bs)
        self.slot_mapping = torch.full((num_layers, max_bs), trash_slot, dtype=torch.int64, device=device)
        self.block_tables = z(max_bs, num_layers, max_blocks)
        self.context_lens = z(max_bs, num_layers)
        # ST3: the step's score rows by visual index (+ text sink), and the next token's budgets.
        self.scores = torch.zeros(max_bs, num_score_layers, max_visual + 1, device=device)
        self.budgets = z(max_bs, num_events)

    def fill(self, n: int, rows: int, input_ids, positions, slot_mapping, block_tables, context_lens,
             budgets: torch.Tensor | None = None) -> None:
        """Copy n live rows in and reset rows n..rows-1 to padding (slot = trash, length 0)."""
        w = block_tables.shape[-1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:, :n].copy_(slot_mapping, non_blocking=True)
        self.block_tables[:n, :, :w].copy_(block_tables, non_blocking=True)
        self.context_lens[:n].copy_(context_lens, non_blocking=True)
        if budgets is not None:
            self.budgets[:n].copy_(budgets, non_blocking=True)
        if rows > n:
            self.input_ids[n:rows] = 0
            self.positions[n:rows] = 0
            self.slot_mapping[:, n:rows] = self.trash_slot
            self.context_lens[n:rows] = 0

    def view(self, rows: int, width: int) -> tuple[torch.Tensor, ...]:
        return (self.input_ids[:rows], self.positions[:rows], self.slot_mapping[:, :rows],
                self.block_tables[:rows, :, :width], self.context_lens[:rows])


class DecodeGraphs:
    """One CUDA graph per (batch bucket, width bucket, variant), captured largest first, sharing one pool.

    `steps` maps a variant (for ST3: whether the step produces score rows) to its step function.
    A graph's outputs live in the shared pool, so they are valid only until the next replay: the
    runner reads them before it replays again.
    """

    def __init__(self, steps: dict[bool, Callable], buffers: DecodeBuffers, max_num_seqs: int, widths: list[int]):
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, bool], torch.Tensor] = {}
        pool = None
        for width in reversed(widths):
            for bs in reversed(graph_buckets(max_num_seqs)):
                for variant, step in steps.items():
                    inputs = buffers.view(bs, width)
                    step(*inputs)  # warm up (allocator, lazy inits, Triton compiles) outside the capture
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        self.outputs[bs, width, variant] = step(*inputs)
                    pool = g.pool() if pool is None else pool
                    self.graphs[bs, width, variant] = g
        torch.cuda.synchronize()

        self.pool = pool

    def replay(self, bs: int, width: int, variant: bool) -> torch.Tensor:
        self.graphs[bs, width, variant].replay()
        return self.outputs[bs, width, variant]


class LazyGraphs:
    """CUDA graphs of a step function captured on first use per key, in the decode graphs' memory pool.

    For VTA's eviction: its keys (batch bucket, table width, move-list length) are too many to capture
    up front, and each capture is cheap (no model weights involved). `neutralise` puts the static
    inputs into a state where the warm-up run changes nothing, `restore` puts the real ones back.
    """

    def __init__(self, pool):
        self.pool, self.graphs, self.outputs = pool, {}, {}
        self.failed: str | None = None  # why capture failed; the step then runs as eager launches

    def run(self, key, step: Callable, neutralise: Callable[[], object], restore: Callable[[object], None]):
        if self.failed is not None:
            return step()
        if key not in self.graphs:
            saved = neutralise()
            try:
                step()  # warm-up outside the capture, on inputs that make it a no-op
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    self.outputs[key] = step()
                self.graphs[key] = g
            except RuntimeError as e:  # still correct without the graph, and still free of host syncs
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("eviction graph capture failed, running it eagerly: %s", self.failed)
            finally:
                restore(saved)
            if self.failed is not None:
                return step()
        self.graphs[key].replay()
        return self.outputs[key]
