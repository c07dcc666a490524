"""A paged decode-attention kernel for CUDA (Triton ships with CUDA builds of torch).

It reads the per-layer block tables and lengths straight from the static decode buffers, so no
gathered copy of K/V is ever made. One program per (sequence, KV head) handles the query heads that
share that KV head, with an online softmax over the layer's blocks. It is only used where
`pick_backend` has checked it against the portable gather + SDPA path and found it faster.

At ST3's score layers the same kernel also emits the score row: a second pass over the layer's blocks
turns each key's logits into probabilities with the final max and denominator, sums them over the
program's query heads and stores them by the entry's visual index into a [B, Hkv, N0max] buffer
(each program owns its row, so no atomics and the result is deterministic); the caller sums the KV
heads and divides by H. No key is gathered again and nothing is sized by max_model_len.
"""
from __future__ import annotations

import math
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None


if triton is not None:
    @triton.jit
    def _block_logits(q, k_ptr, tables, j, length, g, num_kv_heads, scale, t, d, D: tl.constexpr, BS: tl.constexpr):
        """Block j of a layer: its id, which of its entries are valid, their K/V offsets, and q . k * scale."""
        blk = tl.load(tables + j)
        tmask = (j * BS + t) < length
        kv_off = ((blk * BS + t[:, None]) * num_kv_heads + g) * D + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=tmask[:, None], other=0.0).to(tl.float32)
        return blk, tmask, kv_off, tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, vis_ptr, part_ptr, layer,
                             stride_tb, stride_tl, stride_lb, num_kv_heads, n_vis, scale, REP: tl.constexpr,
                             REP_P2: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, SCORES: tl.constexpr):
        b = tl.program_id(0)
        g = tl.program_id(1)
        length = tl.load(lens_ptr + b * stride_lb + layer)
        r = tl.arange(0, REP_P2)
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        rmask = r < REP
        q_off = ((b * num_kv_heads + g) * REP + r[:, None]) * D + d[None, :]
        q = tl.load(q_ptr + q_off, mask=rmask[:, None], other=0.0).to(tl.float32)
        m = tl.full([REP_P2], float("-inf"), tl.float32)
        denom = tl.zeros([REP_P2], tl.float32)
        acc = tl.zeros([REP_P2, D], tl.float32)
        tables = tables_ptr + b * stride_tb + layer * stride_tl
        for j in range(0, tl.cdiv(length, BS)):
            blk, tmask, kv_off, s = _block_logits(q, k_ptr, tables, j, length, g, num_kv_heads, scale, t, d, D, BS)
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + kv_off, mask=tmask[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / denom[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        if SCORES:
            for j in range(0, tl.cdiv(length, BS)):
                blk, tmask, kv_off, s = _block_logits(q, k_ptr, tables, j, length, g, num_kv_heads, scale, t, d, D,
                                                      BS)
                p = tl.exp(s - m[:, None]) / denom[:, None]
                p = tl.sum(tl.where(rmask[:, None] & tmask[None, :], p, 0.0), axis=0)   # [BS]
                vis = tl.load(vis_ptr + blk * BS + t, mask=tmask, other=-1)
                keep = tmask & (vis >= 0) & (vis < n_vis)
                tl.store(part_ptr + (b * num_kv_heads + g) * n_vis + vis, p, mask=keep)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, layer: int, block_size: int, scores: torch.Tensor | None = None,
                           visual_index: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] against layer `layer` of the paged pool ([slots, Hkv, D]); returns [B, H, D].

    With `scores` ([B, N0max + 1], last column the text sink) and the pool's `visual_index`, also writes
    the head-averaged probability of every visual entry there.
    """
    b, h, d = q.shape
    hkv = k_pool.shape[1]
    rep = h // hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    want = scores is not None
    n_vis = scores.shape[-1] - 1 if want else 1
    part = torch.zeros(b, hkv, n_vis, device=q.device, dtype=torch.float32) if want else out
    _paged_decode_kernel[(b, hkv)](
        q, k_pool, v_pool, block_tables, context_lens, out, visual_index if want else block_tables, part, layer,
        block_tables.stride(0), block_tables.stride(1), context_lens.stride(0), hkv, n_vis, 1.0 / math.sqrt(d),
        REP=rep, REP_P2=triton.next_power_of_2(rep), D=d, BS=block_size, SCORES=want)
    if want:
        scores[:, :n_vis].copy_(part.sum(1) / h)
        scores[:, n_vis:].zero_()
    return out


def pick_backend(gather_step, triton_step, inputs: tuple, atol: float) -> bool:
    """True if the Triton path matches the gather path on `inputs` and is faster on this GPU."""
    if triton is None:
        return False
    try:
        ref, got = gather_step(*inputs), triton_step(*inputs)
        if not torch.allclose(ref.float(), got.float(), atol=atol, rtol=0):
            return False
        times = []
        for fn in (gather_step, triton_step):
            for _ in range(3):
                fn(*inputs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn(*inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1] < times[0]
    except Exception:  # a kernel that fails to compile here simply is not used
        return False
