"""VTA's decode-time eviction, on the device: fixed-shape tensor ops, so CUDA graphs can capture it.

The step that produces the score rows for token t also evicts what must be gone before token t+1:
rank each event layer's present visual entries by its score row (highest first, ties to the lower
visual index), a token evicted at one event layer leaves every deeper layer too, and each
(sequence, layer) is compacted so its survivors are entries 0..new_len-1: removed entries below the
new length are overwritten by the surviving entries above it, k-th hole by k-th source, so only as
many entries move as are removed. The new lengths come back to the host with the sampled tokens.

Why no block is handed out again before the compaction that reads it has run: the host learns which
tail blocks emptied only from the new lengths, which it reads after the step (the one device-to-host
transfer of a step); every kernel of the step, the compaction included, was queued on the stream
before that read, so any later write into a returned block is queued after it.

Move lists have a static length `cap`, so their shape is fixed. The safe cap is a worst-case bound
(scheduler.policy.removal_bound), typically ~5x the moves a step really makes, and every padded move
is a row copied (to a trash slot). So decode steps pass a cap sized from the moves the host expects;
a step whose moves exceed its cap moves nothing and leaves the lengths as they were. The host reads
the move count with the new lengths, and redoes such a step with the safe cap (its inputs, scores
included, are untouched).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.block_pool import BlockPool
from scheduler.policy import Full


@dataclass(frozen=True)
class EvictionPlan:
    """Static facts about a policy's decode evictions for one model depth."""
    events: tuple[int, ...]       # event layers
    first: int                    # layers below this never lose a visual entry
    event_of_layer: torch.Tensor  # [L - first] index of the deepest event layer at or below each layer
    event_rows: torch.Tensor      # [K] event layers counted from `first` (device tensors: no copy in a step)

    @classmethod
    def for_policy(cls, policy: Full, num_layers: int, device: torch.device) -> EvictionPlan | None:
        events = tuple(policy.event_layers(num_layers))
        if not policy.anneals or not events:
            return None
        k_of = [sum(e <= layer for e in events) - 1 for layer in range(events[0], num_layers)]
        return cls(events, events[0], torch.tensor(k_of, device=device),
                   torch.tensor([e - events[0] for e in events], device=device))


def cap_bucket(moves: int) -> int:
    """Static move-list length for a step: 64, 96, 128, 192, 256, 384, ... (few distinct CUDA graphs)."""
    cap = 64
    while cap < moves:
        cap = cap * 3 // 2 if cap & (cap - 1) == 0 else cap * 4 // 3  # 2^k -> 1.5 * 2^k -> 2^(k+1)
    return cap


def _pack(mask: torch.Tensor, cap: int) -> torch.Tensor:
    """Flat indices where `mask` holds, in row-major order, padded with -1 to length cap (fixed shape)."""
    count = torch.cumsum(mask.reshape(-1), 0, dtype=torch.int32)  # set entries up to and including each
    # The k-th set entry is where the running count first reaches k + 1: a search per output, not a
    # scatter over every entry (6x faster on CPUs at 1M entries).
    idx = torch.searchsorted(count, torch.arange(1, cap + 1, dtype=torch.int32, device=mask.device))
    return torch.where(idx < count.numel(), idx, -1)


def _slots(tables: torch.Tensor, entries: torch.Tensor, block_size: int, trash: int) -> torch.Tensor:
    """Slot ids of flat entry indices over tables [B, L, W] (entry = (b * L + l) * W * bs + j); -1 -> trash."""
    per_row = tables.shape[-1] * block_size
    f = entries.clamp(min=0)
    j = f % per_row
    slot = tables.reshape(-1, tables.shape[-1])[f // per_row, j // block_size] * block_size + j % block_size
    return torch.where(entries >= 0, slot, trash)


def evict(pool: BlockPool, plan: EvictionPlan, policy: Full, block_tables: torch.Tensor, lens: torch.Tensor,
          scores: torch.Tensor, budgets: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evict and compact on the device. Returns (new lens [B, L], moves []): no host sync.

    With more than `cap` moves, nothing is moved and the lengths are returned unchanged.
    block_tables [B, L, W]; lens [B, L] entries per layer; scores [B, K, N + 1] by visual index (column N:
    text sink); budgets [B, K] visual entries each event layer may keep.
    """
    bs, first = pool.block_size, plan.first
    tables, held = block_tables[:, first:], lens[:, first:]
    b, num_layers, w = tables.shape
    n = scores.shape[-1] - 1
    entry = torch.arange(w * bs, device=lens.device)
    valid = entry < held[..., None]
    # Whole blocks at a time: the visual index of every entry the tables span, [B, L', W * bs].
    vis = pool.visual_index[:-1].view(-1, bs).index_select(0, tables.reshape(-1)).view(b, num_layers, w * bs)
    # A request's visual indices are below its N0 <= n (add_request checks), so only padding needs masking.
    idx = torch.where(valid & (vis >= 0), vis, n).long()                         # [B, L', T], n: not visual
    present = torch.zeros(b, len(plan.events), n + 1, dtype=torch.bool, device=lens.device)
    present.scatter_(2, idx.index_select(1, plan.event_rows), True)
    gone = policy.evictions(present[..., :n], scores[..., :n].float(), budgets)  # [B, K, n]
    gone = torch.nn.functional.pad(gone, (0, 1))                                 # column n: never gone
    remove = gone.index_select(1, plan.event_of_layer).gather(2, idx)            # [B, L', T]
    new = held - remove.sum(2)
    below = entry < new[..., None]
    holes, sources = remove & below, ~remove & valid & ~below
    moves = holes.sum()
    overflow = moves > cap
    trash = pool.trash_slot
    dst = torch.where(overflow, trash, _slots(tables, _pack(holes, cap), bs, trash))
    src = _slots(tables, _pack(sources, cap), bs, trash)
    pool.k.index_copy_(0, dst, pool.k.index_select(0, src))
    pool.v.index_copy_(0, dst, pool.v.index_select(0, src))
    pool.visual_index.index_copy_(0, dst, pool.visual_index.index_select(0, src))
    new_lens = torch.cat([lens[:, :first], torch.where(overflow, held, new)], 1)
    return new_lens, moves
