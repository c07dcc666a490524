"""Per-(sequence, layer) block tables and lengths over one BlockPool.

Each running sequence owns a seat (a row of the tables). Layer l of seat s holds `lens[s, l]`
entries in blocks `tables[s, l, :ceil(len / block_size)]`: every layer has its own length because
ST3 keeps a different number of visual tokens per layer. Entries carry their RoPE'd keys, so their
order in a layer does not matter to decode attention, and `trim` may fill holes with tail entries.

The tables live on the CPU (host bookkeeping, vectorised); the model runner copies the rows it
needs to the device each step. Which visual token an entry holds lives only on the device, in the
pool's `visual_index`: VTA's eviction runs there (engine/eviction.py) and the host learns just the
new lengths, with which `shrink` returns the emptied tail blocks.
"""
from __future__ import annotations

import torch

from .block_pool import BlockPool


class LayeredKVCache:
    def __init__(self, pool: BlockPool, num_layers: int, max_num_seqs: int, max_model_len: int):
        self.pool, self.num_layers, self.block_size = pool, num_layers, pool.block_size
        self.max_blocks = -(-max_model_len // pool.block_size)
        self.tables = torch.zeros(max_num_seqs, num_layers, self.max_blocks, dtype=torch.int64)
        self.lens = torch.zeros(max_num_seqs, num_layers, dtype=torch.int64)
        self._free_seats = list(range(max_num_seqs - 1, -1, -1))

    # ---- accounting -------------------------------------------------------------------------
    def blocks_for(self, lens: list[int] | torch.Tensor) -> int:
        """Blocks needed to hold these per-layer lengths."""
        lens = torch.as_tensor(lens)
        return int((-(-lens // self.block_size)).sum())

    def blocks_held(self, seat: int) -> int:
        return self.blocks_for(self.lens[seat])

    def blocks_held_many(self, seats: list[int]) -> list[int]:
        """blocks_held for several seats in one tensor op."""
        return (-(-self.lens[seats] // self.block_size)).sum(1).tolist()

    @property
    def num_free_seats(self) -> int:
        return len(self._free_seats)

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, lens: list[int]) -> int:
        """Give a new sequence a seat and blocks for `lens[l]` entries per layer; return the seat."""
        n = -(-torch.as_tensor(lens) // self.block_size)
        if int(n.max()) > self.max_blocks:
            raise ValueError("sequence is longer than the cache's max_model_len")
        if not self._free_seats:
            raise ValueError("no free seat: max_num_seqs sequences already hold the cache")
        blocks = torch.tensor(self.pool.allocate(int(n.sum())), dtype=torch.int64)  # raises before taking any
        seat = self._free_seats.pop()  # only once nothing can fail, so a failure leaks no seat
        cols = torch.arange(self.max_blocks)
        mask = cols[None, :] < n[:, None]                    # [L, max_blocks] row-major = allocation order
        self.tables[seat].zero_()
        self.tables[seat][mask] = blocks
        self.lens[seat] = torch.as_tensor(lens)
        return seat

    def fork(self, seat: int) -> int:
        """A new seat holding a copy of every layer's entries of `seat` (n > 1 completions, one prefill).

        Copies, not shared blocks: ST3's eviction compacts each (seat, layer) in place and shrink() frees
        its tail blocks, so a block shared by two seats would be rewritten or freed under the other one;
        sharing (copy-on-write) would need per-block reference counts that eviction and free respect.
        A prompt's copy is cheap next to the prefill it saves.
        """
        lens = self.lens[seat].clone()
        new = self.allocate(lens.tolist())
        n = -(-lens // self.block_size)
        held = torch.arange(self.max_blocks)[None, :] < n[:, None]          # [L, max_blocks]
        offsets = torch.arange(self.block_size)
        src = (self.tables[seat][held][:, None] * self.block_size + offsets).view(-1)
        dst = (self.tables[new][held][:, None] * self.block_size + offsets).view(-1)
        pool = self.pool
        src, dst = src.to(pool.k.device), dst.to(pool.k.device)
        for t in (pool.k, pool.v, pool.visual_index):
            t.index_copy_(0, dst, t.index_select(0, src))
        return new

    def slots(self, seat: int, layer: int, n: int) -> torch.Tensor:
        """Slot ids of entries 0..n-1 of (seat, layer)."""
        idx = torch.arange(n)
        return self.tables[seat, layer, idx // self.block_size] * self.block_size + idx % self.block_size

    def append_slots(self, seats: torch.Tensor) -> torch.Tensor:
        """Make room for one more entry in every layer of each seat; return its slots as [B, L]."""
        lens = self.lens[seats]                                        # [B, L]
        if int(lens.max()) >= self.max_blocks * self.block_size:
            raise ValueError("a sequence reached the cache's max_model_len")
        need = lens % self.block_size == 0
        count = int(need.sum())
        if count:
            rows, layers = need.nonzero(as_tuple=True)
            new = torch.tensor(self.pool.allocate(count), dtype=torch.int64)
            self.tables[seats[rows], layers, lens[rows, layers] // self.block_size] = new
        # Index the one block per (seat, layer) directly: copying the seats' whole tables first would move
        # [B, L, max_blocks] ids per step (4 MB at 64 sequences of 32 layers) to read B * L of them.
        layer_ids = torch.arange(self.num_layers)
        block = self.tables[seats[:, None], layer_ids[None, :], lens // self.block_size]
        self.lens[seats] = lens + 1
        return block * self.block_size + lens % self.block_size

    def blocks_to_append(self, seats: list[int]) -> int:
        """Blocks the next append_slots(seats) would take."""
        if not seats:
            return 0
        return int((self.lens[seats] % self.block_size == 0).sum())

    def free(self, seat: int) -> None:
        """Return all of a seat's blocks and the seat itself."""
        n = -(-self.lens[seat] // self.block_size)
        mask = torch.arange(self.max_blocks)[None, :] < n[:, None]
        self.pool.free(self.tables[seat][mask].tolist())
        self.lens[seat] = 0
        self._free_seats.append(seat)

    # ---- eviction ---------------------------------------------------------------------------
    def shrink(self, seats: list[int], new_lens: torch.Tensor) -> int:
        """Lengths after a device-side eviction ([B, L], never longer): return the emptied tail blocks.

        The eviction already compacted every layer's survivors into entries 0..new_len-1 on the device,
        before this host call could learn the lengths, so the freed blocks hold nothing still to be read.
        """
        old = self.lens[seats]
        if bool((new_lens > old).any()):
            raise RuntimeError("an eviction cannot lengthen a layer")
        old_blocks, new_blocks = -(-old // self.block_size), -(-new_lens // self.block_size)
        self.lens[seats] = new_lens
        b, layer = (new_blocks < old_blocks).nonzero(as_tuple=True)  # the few (seat, layer)s that emptied a block
        if not b.numel():
            return 0
        lo, hi = new_blocks[b, layer], old_blocks[b, layer]
        cols = torch.arange(int(hi.max()))
        rows = self.tables[torch.as_tensor(seats)[b], layer, :cols.numel()]
        freed = rows[(cols >= lo[:, None]) & (cols < hi[:, None])]
        self.pool.free(freed.tolist())
        return freed.numel()
