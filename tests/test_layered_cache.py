"""LayeredKVCache bookkeeping: a failed allocation takes nothing (no seat, no block)."""
from __future__ import annotations

import pytest
import torch

from cache.block_pool import BlockPool
from cache.layered import LayeredKVCache


def make_cache(num_blocks=8, block_size=4, layers=2, seqs=3, max_len=16) -> LayeredKVCache:
    return LayeredKVCache(BlockPool(num_blocks, block_size, 1, 2, torch.float32, "cpu"), layers, seqs, max_len)


def test_too_long_a_sequence_takes_no_seat():
    cache = make_cache()
    with pytest.raises(ValueError, match="max_model_len"):
        cache.allocate([17, 3])
    assert cache.num_free_seats == 3 and cache.pool.num_free == 8


def test_an_exhausted_pool_takes_no_seat():
    cache = make_cache()
    seat = cache.allocate([8, 8])                       # 4 of the 8 blocks
    with pytest.raises(RuntimeError, match="exhausted"):
        cache.allocate([16, 4])                         # 5 more
    assert cache.num_free_seats == 2 and cache.pool.num_free == 4
    assert cache.allocate([8, 8]) != seat               # the pool still serves what fits
    assert cache.num_free_seats == 1 and cache.pool.num_free == 0


def test_no_free_seat_takes_no_block():
    cache = make_cache(seqs=1)
    cache.allocate([1, 1])
    with pytest.raises(ValueError, match="seat"):
        cache.allocate([1, 1])
    assert cache.pool.num_free == 6
