"""Attention over the layered paged cache, plus the one score row ST3 needs.

The score of a layer is softmax(q_last · Kᵀ / √d) of the sequence's last query row, averaged over
query heads: one extra row beside the main attention, produced only at the layers a policy asks for.
GQA is handled by folding the query heads that share a KV head into the query-length axis, so keys
are never repeated in memory.

`PagedAttention` is the one module the model's layers call (through a ForwardBatch): it writes the
new keys and values into the pool, attends over the layer's pages, and drops score rows straight into
the batch's [B, score layers, N0max + 1] buffer, indexed by visual token.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cache.block_pool import BlockPool

from .triton_attention import paged_decode_attention

if TYPE_CHECKING:
    from .forward_batch import ForwardBatch


def _fold(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, D] -> [B, Hkv, H/Hkv, D]: query head h reads KV head h // (H/Hkv), as in LLaMA."""
    b, h, d = q.shape
    return q.view(b, num_kv_heads, h // num_kv_heads, d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                      want_scores: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Causal attention over packed rows [N, H, D], sequence by sequence; optional last-row scores [T_b]."""
    outs, scores, start = [], [] if want_scores else None, 0
    rep = q.shape[1] // k.shape[1]
    for n in seq_lens:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        # [T, H, D] -> [Hkv, rep*T... ] is awkward for causal masks, so repeat KV here (prefill is compute-bound).
        kr = ks.repeat_interleave(rep, dim=1).transpose(0, 1)
        vr = vs.repeat_interleave(rep, dim=1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qs.transpose(0, 1), kr, vr, is_causal=True).transpose(0, 1))
        if want_scores:
            logits = torch.einsum("hd,htd->ht", qs[-1].float(), kr.float()) / math.sqrt(q.shape[-1])
            scores.append(torch.softmax(logits, dim=-1).mean(0))
        start += n
    return torch.cat(outs), scores


def entry_slots(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, W] block ids -> [B, W*block_size] slot ids, in entry order."""
    b, _ = block_tables.shape
    offsets = torch.arange(block_size, device=block_tables.device)
    return (block_tables[:, :, None] * block_size + offsets).view(b, -1)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] slots -> [B, Hkv, T, D] keys or values (written into `out`, [B * T, Hkv, D], when given)."""
    # index_select, not cache[slots]: on CPU advanced indexing is several times slower here.
    b, t = slots.shape
    flat = torch.index_select(cache, 0, slots.reshape(-1), out=out) if out is not None \
        else cache.index_select(0, slots.reshape(-1))
    return flat.view(b, t, *cache.shape[1:]).transpose(1, 2)


def _strided_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y over the [B, Hkv] dims, where y is a view of gathered keys or values ([B, T, Hkv, D] in memory).

    Neither dim alone can batch a 4-D matmul without first copying y into a new layout (3x slower on
    CPUs), but each one can batch a bmm with the other looped: loop over the shorter one.
    """
    b, h = y.shape[:2]
    if b <= h:
        return torch.stack([torch.bmm(x[i], y[i]) for i in range(b)])
    return torch.stack([torch.bmm(x[:, g], y[:, g]) for g in range(h)], 1)


def decode_probs(q: torch.Tensor, k_all: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
    """fp32 attention probabilities [B, Hkv, rep, T] of one query per sequence; entries >= lens get 0."""
    b, h, d = q.shape
    hkv, t = k_all.shape[1], k_all.shape[2]
    logits = _strided_bmm(_fold(q, hkv).float(), k_all.float().transpose(-1, -2)) / math.sqrt(d)
    if lens is not None:
        valid = torch.arange(t, device=q.device)[None, :] < lens[:, None]      # [B, T]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def decode_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, lens: torch.Tensor | None,
                     want_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per sequence against its gathered entries; entries at index >= lens are padding.

    q [B, H, D]; k_all, v_all [B, Hkv, T, D]; lens [B], or None when every entry is valid.
    Returns ([B, H, D], scores [B, T] or None). The score row is the query's attention averaged over
    heads (see the module docstring).
    """
    b, h, d = q.shape
    if not want_scores:
        mask = None
        if lens is not None:
            mask = (torch.arange(k_all.shape[2], device=q.device)[None, :] < lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(_fold(q, k_all.shape[1]), k_all, v_all, attn_mask=mask)
        return out.reshape(b, h, d), None
    probs = decode_probs(q, k_all, lens)
    out = _strided_bmm(probs.to(v_all.dtype), v_all).reshape(b, h, d)
    return out, probs.mean(dim=(1, 2))


class PagedAttention:
    """Attention over the layered paged cache for prefill (packed prompts) and decode (one row each)."""

    def __init__(self, pool: BlockPool, use_triton: bool = False):
        self.pool, self.block_size, self.use_triton = pool, pool.block_size, use_triton
        self._workspace: torch.Tensor | None = None  # CPU: [2, entries, Hkv, D], reused by every gather

    def _gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` [B, T] as [B, Hkv, T, D] views.

        On CPUs they land in one reused workspace: a fresh buffer of tens of MB is mapped and
        page-faulted in by the allocator on every call, which cost ~5x the copy itself (at batch 16).
        The workspace is as large as the largest single-layer gather so far; views of it are valid
        until the next layer's gather. CUDA's caching allocator reuses memory by itself.
        """
        pool = self.pool
        if pool.k.device.type != "cpu":
            return gather_kv(pool.k, slots), gather_kv(pool.v, slots)
        n = slots.numel()
        if self._workspace is None or self._workspace.shape[1] < n:  # headroom: gathers grow a row per step
            size = n if self._workspace is None else max(n, self._workspace.shape[1] * 3 // 2)
            self._workspace = pool.k.new_empty(2, size, *pool.k.shape[1:])
        work = self._workspace[:, :n]
        return gather_kv(pool.k, slots, work[0]), gather_kv(pool.v, slots, work[1])

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 batch: ForwardBatch) -> torch.Tensor:
        if batch.is_prefill:
            return self.prefill(layer, q, k, v, batch)
        return self.decode(layer, q, k, v, batch)

    def prefill(self, layer: int, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        pool, bs = self.pool, self.block_size
        owner, vis = batch.seq_of_row, batch.visual_of_row
        counts = torch.bincount(owner, minlength=batch.num_seqs)
        entry = torch.arange(owner.numel(), device=owner.device) - (torch.cumsum(counts, 0) - counts)[owner]
        slots = batch.block_tables[owner, layer, entry // bs] * bs + entry % bs
        pool.k.index_copy_(0, slots, k)
        pool.v.index_copy_(0, slots, v)
        pool.visual_index.index_copy_(0, slots, vis.to(torch.int32))
        want = layer in batch.score_layers
        out, rows = prefill_attention(q, k, v, counts.tolist(), want)
        if want:
            dst, sink = batch.scores[:, batch.score_layers.index(layer)], batch.scores.shape[-1] - 1
            for b, row in enumerate(rows):
                v_b = vis[owner == b]
                dst[b].index_copy_(0, torch.where(v_b >= 0, v_b, sink), row.to(dst.dtype))
        return out

    def decode(self, layer: int, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        """No host synchronisation here: this runs inside captured CUDA graphs."""
        pool, bs = self.pool, self.block_size
        slots, lens = batch.slot_mapping[layer], batch.context_lens[:, layer]
        pool.k.index_copy_(0, slots, k)
        pool.v.index_copy_(0, slots, v)
        pool.visual_index.index_fill_(0, slots, -1)  # generated tokens are never visual
        want = layer in batch.score_layers and layer not in batch.skip_scores
        dst = batch.scores[:, batch.score_layers.index(layer)] if want else None
        if self.use_triton:
            return paged_decode_attention(q, pool.k, pool.v, batch.block_tables, batch.context_lens, layer, bs,
                                          scores=dst, visual_index=pool.visual_index if want else None)
        tables, mask_lens = batch.block_tables[:, layer], lens
        if batch.layer_lens is None:
            slots_all = entry_slots(tables, bs)
        else:  # eager: gather exactly the longest row's entries; a lone row then needs no mask at all
            n = batch.layer_lens[layer]
            slots_all = entry_slots(tables[:, :-(-n // bs)], bs)[:, :n]
            mask_lens = None if q.shape[0] == 1 else lens
        out, row = decode_attention(q, *self._gather(slots_all), mask_lens, want)
        if want:
            vis = pool.visual_index.index_select(0, slots_all.reshape(-1)).view_as(slots_all)
            valid = torch.arange(vis.shape[1], device=vis.device)[None, :] < lens[:, None]
            sink = dst.shape[-1] - 1
            dst.scatter_(1, torch.where(valid & (vis >= 0), vis.long(), sink), row)  # stale ids past lens: sink
        return out
