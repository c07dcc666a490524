"""Per-(sequence, layer) block tables and lengths over one BlockPool.

Each running sequence owns a seat (a row of the tables). Layer l of seat s holds `lens[s, l]`
entries in blocks `tables[s, l, :ceil(len / block_size)]`: every layer has its own length because
ST3 keeps a different number of visual tokens per layer. Entries carry their RoPE'd keys, so their
order in a layer does not matter to decode attention, and `trim` may fill holes with tail entries.

The tables live on the CPU (host bookkeeping, vectorised); the model runner copies the rows it
needs to the device each step.
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

    @property
    def num_free_seats(self) -> int:
        return len(self._free_seats)

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, lens: list[int]) -> int:
        """Give a new sequence a seat and blocks for `lens[l]` entries per layer; return the seat."""
        seat = self._free_seats.pop()
        n = -(-torch.as_tensor(lens) // self.block_size)
        if int(n.max()) > self.max_blocks:
            raise ValueError("sequence is longer than the cache's max_model_len")
        blocks = torch.tensor(self.pool.allocate(int(n.sum())), dtype=torch.int64)
        cols = torch.arange(self.max_blocks)
        mask = cols[None, :] < n[:, None]                    # [L, max_blocks] row-major = allocation order
        self.tables[seat].zero_()
        self.tables[seat][mask] = blocks
        self.lens[seat] = torch.as_tensor(lens)
        return seat

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
        tab = self.tables[seats]                                       # [B, L, max_blocks]
        block = tab.gather(2, (lens // self.block_size).unsqueeze(-1)).squeeze(-1)
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

    # ---- trimming ---------------------------------------------------------------------------
    def layer_slots(self, seat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of every entry of every layer of a seat as [L, maxlen] (padded), and the valid mask."""
        lens = self.lens[seat]
        width = int(lens.max())
        idx = torch.arange(width)
        slots = self.tables[seat][:, idx // self.block_size] * self.block_size + idx % self.block_size
        return slots, idx[None, :] < lens[:, None]

    def trim(self, seat: int, remove: torch.Tensor) -> int:
        """Remove entries (mask [L, maxlen] over layer_slots) from every layer at once; return blocks freed.

        Holes below each layer's new length are filled by that layer's surviving tail entries, so only
        as many entries move as are removed, and the emptied tail blocks go back to the pool.
        """
        slots, valid = self.layer_slots(seat)
        remove = remove & valid
        old = self.lens[seat]
        new = old - remove.sum(1)
        idx = torch.arange(slots.shape[1])[None, :]
        holes = remove & (idx < new[:, None])
        sources = ~remove & valid & (idx >= new[:, None])
        # Row-major nonzero pairs the k-th hole of a layer with the k-th source of the same layer.
        dst, src = slots[holes], slots[sources]
        if dst.numel():
            pool, dst_d, src_d = self.pool, dst.to(self.pool.k.device), src.to(self.pool.k.device)
            pool.k[dst_d] = pool.k[src_d]
            pool.v[dst_d] = pool.v[src_d]
            pool.visual_index[dst_d] = pool.visual_index[src_d]
        old_blocks, new_blocks = -(-old // self.block_size), -(-new // self.block_size)
        cols = torch.arange(self.max_blocks)[None, :]
        freed = self.tables[seat][(cols >= new_blocks[:, None]) & (cols < old_blocks[:, None])]
        self.pool.free(freed.tolist())
        self.lens[seat] = new
        return freed.numel()
