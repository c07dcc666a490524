"""The physical KV pool: one tensor of fixed-size blocks shared by every layer, and its free list.

A block holds `block_size` tokens of ONE layer, so a sequence's memory is the sum over its layers and
a layer that drops visual tokens gives whole blocks back for anyone to use.
"""
from __future__ import annotations

from collections import deque

import torch


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        # Flat [slots, heads, dim]: slot = block * block_size + offset. One extra slot at the end is
        # the trash slot, where padded rows of a fixed-size (CUDA-graph) decode batch write.
        self.trash_slot = num_blocks * block_size
        shape = (num_blocks * block_size + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Per slot: which visual token of its sequence it holds (0..N0-1), or -1 for text/generated.
        self.visual_index = torch.full((num_blocks * block_size + 1,), -1, dtype=torch.int32, device=device)
        self._free = deque(range(num_blocks))
        self.peak_used = 0

    @staticmethod
    def bytes_per_block(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K + V bytes of one block (the slot metadata is negligible)."""
        return 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks off the free list (the caller checked there are enough)."""
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def reset_peak(self) -> None:
        self.peak_used = self.num_used
