"""Attention over the layered paged cache, plus the one score row ST3 needs.

The score of a layer is softmax(q_last · Kᵀ / √d) of the sequence's last query row, averaged over
query heads: one extra row beside the main attention, produced only at the layers a policy asks for.
GQA is handled by folding the query heads that share a KV head into the query-length axis, so keys
are never repeated in memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B, T] slots -> [B, Hkv, T, D] keys or values."""
    # index_select, not cache[slots]: on CPU advanced indexing is several times slower here.
    b, t = slots.shape
    return cache.index_select(0, slots.reshape(-1)).view(b, t, *cache.shape[1:]).transpose(1, 2)


def decode_probs(q: torch.Tensor, k_all: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """fp32 attention probabilities [B, Hkv, rep, T] of one query per sequence; entries >= lens get 0."""
    b, h, d = q.shape
    hkv, t = k_all.shape[1], k_all.shape[2]
    valid = torch.arange(t, device=q.device)[None, :] < lens[:, None]      # [B, T]
    logits = (_fold(q, hkv).float() @ k_all.float().transpose(-1, -2)) / math.sqrt(d)
    return torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)


def decode_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, lens: torch.Tensor,
                     want_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per sequence against its gathered entries; entries at index >= lens are padding.

    q [B, H, D]; k_all, v_all [B, Hkv, T, D]; lens [B]. Returns ([B, H, D], scores [B, T] or None).
    The score row is the query's attention averaged over heads (see the module docstring).
    """
    b, h, d = q.shape
    if not want_scores:
        valid = torch.arange(k_all.shape[2], device=q.device)[None, :] < lens[:, None]
        out = F.scaled_dot_product_attention(_fold(q, k_all.shape[1]), k_all, v_all,
                                             attn_mask=valid[:, None, None, :])
        return out.reshape(b, h, d), None
    probs = decode_probs(q, k_all, lens)
    out = (probs.to(v_all.dtype) @ v_all).reshape(b, h, d)
    return out, probs.mean(dim=(1, 2))
