"""Per-(sequence, layer) block tables and lengths over one BlockPool.

Each running sequence owns a seat (a row of the tables). Layer l of seat s holds `lens[s, l]`
entries in blocks `tables[s, l, :ceil(len / block_size)]`: every layer has its own length because
ST3 keeps a different number of visual tokens per layer. Entries carry their RoPE'd keys, so their
order in a layer does not matter to decode attention, and `trim` may fill holes with tail entries.

The tables live on the CPU (host bookkeeping, vectorised); the model runner copies the rows it
needs to the device each step. For VTA the host also mirrors which visual token each prefill entry
holds (`visual`), so deciding what to evict never waits on the device.
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
        # [seat, layer, entry] visual index (-1 = text), filled after prefill for VTA. Entries past
        # the widest prefill seen are generated tokens, never visual, so it grows only that wide.
        self.visual = torch.full((max_num_seqs, num_layers, 0), -1, dtype=torch.int32)

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

    def fork(self, seat: int) -> int:
        """A new seat holding a copy of every layer's entries of `seat` (n > 1 completions, one prefill).

        Copies, not shared blocks: trim() compacts each (seat, layer) in place and frees its tail blocks,
        so a block shared by two seats would be rewritten or freed under the other one; sharing would
        need per-block reference counts that trim and free respect. A prompt's copy is cheap next to
        the prefill it saves.
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
        self.visual[new] = self.visual[seat]
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
        self.visual[seat] = -1
        self._free_seats.append(seat)

    # ---- trimming ---------------------------------------------------------------------------
    def layer_slots(self, seats: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of every entry of every layer of these seats as [B, L, maxlen] (padded), and the valid mask."""
        lens = self.lens[seats]
        idx = torch.arange(int(lens.max()))
        slots = self.tables[seats][:, :, idx // self.block_size] * self.block_size + idx % self.block_size
        return slots, idx < lens[..., None]

    def record_visual(self, seats: list[int]) -> None:
        """Copy the device's per-slot visual index of these seats' entries to the host mirror (after prefill)."""
        if not seats:
            return
        slots, valid = self.layer_slots(seats)
        vis = self.pool.visual_index.index_select(0, slots.view(-1).to(self.pool.visual_index.device))
        vis = torch.where(valid, vis.cpu().view_as(slots), -1)
        if vis.shape[2] > self.visual.shape[2]:
            with torch.inference_mode(False):  # a normal tensor: the scheduler updates it outside inference mode
                grown = torch.full((*self.visual.shape[:2], vis.shape[2]), -1, dtype=torch.int32)
                grown[:, :, :self.visual.shape[2]] = self.visual
            self.visual = grown
        self.visual[seats] = -1
        self.visual[seats, :, :vis.shape[2]] = vis

    def _mirror(self, seats: list[int], width: int) -> torch.Tensor:
        """The host mirror of these seats over entries 0..width-1 as a fresh [B, L, width] (-1 past its columns)."""
        vis = torch.full((len(seats), self.num_layers, width), -1, dtype=torch.int32)
        w = min(self.visual.shape[2], width)
        vis[:, :, :w] = self.visual[seats, :, :w]
        return vis

    def entry_visual(self, seats: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visual index of every entry of these seats as [B, L, maxlen] (-1: text, generated, padding), slots, valid."""
        slots, valid = self.layer_slots(seats)
        return torch.where(valid, self._mirror(seats, slots.shape[2]), -1), slots, valid

    def trim(self, seats: list[int], remove: torch.Tensor,
             slots_valid: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Remove entries (mask [B, L, maxlen] over layer_slots(seats)) from every layer of every seat.

        Holes below each layer's new length are filled by that layer's surviving tail entries, so only
        as many entries move as are removed, and the emptied tail blocks go back to the pool. Returns
        (blocks freed, dst slots, src slots): the caller must `move(dst, src)` before the pool hands
        out blocks again (the sources sit in freed blocks). `slots_valid`: layer_slots(seats), if at hand.
        """
        slots, valid = slots_valid if slots_valid is not None else self.layer_slots(seats)
        remove = remove & valid
        old = self.lens[seats]
        new = old - remove.sum(2)
        below = torch.arange(slots.shape[2]) < new[..., None]
        holes, sources = remove & below, ~remove & valid & ~below
        # Row-major nonzero pairs the k-th hole of a (seat, layer) with the k-th source of the same one.
        dst, src = slots[holes], slots[sources]
        w = min(self.visual.shape[2], slots.shape[2])
        if w:
            vis = self._mirror(seats, slots.shape[2])
            vis[holes] = vis[sources]
            vis[~below] = -1  # later appends land here, and they are not visual
            self.visual[seats, :, :w] = vis[:, :, :w]
        old_blocks, new_blocks = -(-old // self.block_size), -(-new // self.block_size)
        cols = torch.arange(self.max_blocks)
        freed = self.tables[seats][(cols >= new_blocks[..., None]) & (cols < old_blocks[..., None])]
        self.pool.free(freed.tolist())
        self.lens[seats] = new
        return freed.numel(), dst, src

    def move(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy entries (K, V and visual index) from src slots to dst slots on the device."""
        if dst.numel():
            pool = self.pool
            dst, src = dst.to(pool.k.device), src.to(pool.k.device)
            pool.k.index_copy_(0, dst, pool.k.index_select(0, src))
            pool.v.index_copy_(0, dst, pool.v.index_select(0, src))
            pool.visual_index.index_copy_(0, dst, pool.visual_index.index_select(0, src))
