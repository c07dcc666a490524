"""The Triton paged decode kernel (and its ST3 scoring pass) in Triton's CPU interpreter, when Triton is
installed (CPU builds of torch come without it, so CI skips this; tools/gpu_check.py runs it on a GPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from engine.attention import decode_attention, entry_slots, gather_kv
from engine.triton_attention import paged_decode_attention
torch.manual_seed(0)
bs, nb, B, H, Hkv, D, W, N = 4, 40, 3, 4, 2, 16, 6, 30
k = torch.randn(nb * bs + 1, Hkv, D); v = torch.randn_like(k)
tables = torch.randperm(nb)[:B * 2 * W].view(B, 2, W)   # no block shared between (sequence, layer)s
lens = torch.tensor([[5, 9], [17, 3], [24, 24]])
vis_idx = torch.full((nb * bs + 1,), -1, dtype=torch.int32)
for b in range(B):  # layer 1 holds visual entries (unique per sequence) between text ones
    sl = entry_slots(tables[b:b + 1, 1], bs)[0]
    vis_idx[sl] = torch.where(torch.rand(len(sl)) < 0.6, torch.randperm(N)[:len(sl)], -1).to(torch.int32)
q = torch.randn(B, H, D)
for layer in (0, 1):
    sl = entry_slots(tables[:, layer], bs)
    ref, row = decode_attention(q, gather_kv(k, sl), gather_kv(v, sl), lens[:, layer], True)
    vis = vis_idx[sl]
    valid = torch.arange(sl.shape[1])[None] < lens[:, layer, None]
    want = torch.zeros(B, N + 1).scatter_(1, torch.where(valid & (vis >= 0), vis.long(), N), row)
    want[:, N] = 0
    got = torch.full((B, N + 1), 7.0)
    out = paged_decode_attention(q, k, v, tables, lens, layer, bs, scores=got, visual_index=vis_idx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(paged_decode_attention(q, k, v, tables, lens, layer, bs), ref, atol=1e-5, rtol=0)
print("ok")
"""


def test_paged_kernel_and_scores_in_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
