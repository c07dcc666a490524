"""engine/eviction.py against a plain per-(sequence, layer) Python version of the same rule."""
import pytest
import torch

from cache.block_pool import BlockPool
from engine.eviction import EvictionPlan, cap_bucket, evict
from scheduler.policy import ST3, removal_bound


def naive(vis_rows, scores, budgets, events, num_layers):
    """Per sequence: rank each event layer's members (highest score, lower index first), evict from it and
    every deeper layer, then compact each layer's entries as trim does (k-th hole <- k-th tail survivor)."""
    out = []
    for b, layers in enumerate(vis_rows):
        gone, kept_layers = set(), []
        gone_at = {}
        for k, e in enumerate(events):
            members = [v for v in layers[e] if v >= 0 and v not in gone]
            ranked = sorted(members, key=lambda v: (-float(scores[b, k, v]), v))
            gone |= set(ranked[int(budgets[b, k]):])
            gone_at[e] = set(gone)
        for layer, entries in enumerate(layers):
            deepest = max([e for e in events if e <= layer], default=None)
            drop = gone_at[deepest] if deepest is not None else set()
            removed = [i for i, v in enumerate(entries) if v >= 0 and v in drop]
            new_len = len(entries) - len(removed)
            result = list(entries)
            holes = [i for i in removed if i < new_len]
            sources = [i for i in range(new_len, len(entries)) if i not in removed]
            for h, s in zip(holes, sources):
                result[h] = entries[s]
            kept_layers.append(result[:new_len])
        out.append(kept_layers)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_device_eviction_equals_naive(seed):
    g = torch.Generator().manual_seed(seed)
    L, n, bs, B = 7, 20, 4, 3
    policy = ST3(start_layer=2, stride=2)
    events = policy.event_layers(L)
    pool = BlockPool(400, bs, 1, 2, torch.float32, "cpu")
    blocks = torch.randperm(400, generator=g).tolist()
    width = 12
    tables = torch.tensor(blocks[:B * L * width]).view(B, L, width)
    rows, lens = [], torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        text = torch.randint(2, 6, (1,), generator=g).item()
        kept = sorted(torch.randperm(n, generator=g)[:14].tolist())
        layers = []
        for layer in range(L):
            if layer in events:
                kept = sorted(torch.tensor(kept)[torch.randperm(len(kept), generator=g)[:max(1, len(kept) - 3)]]
                              .tolist())
            entries = [-1] * text + kept + [-1] * int(torch.randint(0, 5, (1,), generator=g))
            perm = torch.randperm(len(entries), generator=g).tolist()  # compaction leaves any order
            entries = [entries[i] for i in perm]
            layers.append(entries)
            slots = tables[b, layer, torch.arange(len(entries)) // bs] * bs + torch.arange(len(entries)) % bs
            pool.visual_index[slots] = torch.tensor(entries, dtype=torch.int32)
            pool.k[slots, 0, 0] = torch.tensor(entries, dtype=torch.float32) + 1000 * layer  # trace entries
            lens[b, layer] = len(entries)
        rows.append(layers)
    scores = torch.rand(B, len(events), n + 1, generator=g)
    scores[:, :, :5] = 0.5  # ties: the lower visual index wins
    budgets = torch.randint(1, 10, (B, len(events)), generator=g)
    plan = EvictionPlan.for_policy(policy, L, torch.device("cpu"))
    new_lens, moves = evict(pool, plan, policy, tables, lens, scores, budgets, cap=256)
    assert 0 < moves <= 256
    want = naive(rows, scores, budgets, events, L)
    for b in range(B):
        for layer in range(L):
            n_new = int(new_lens[b, layer])
            slots = tables[b, layer, torch.arange(n_new) // bs] * bs + torch.arange(n_new) % bs
            assert pool.visual_index[slots].tolist() == want[b][layer]
            assert pool.k[slots, 0, 0].tolist() == [v + 1000 * layer for v in want[b][layer]]  # K moved too


def test_overflow_is_reported_and_moves_nothing():
    policy = ST3(start_layer=1, stride=1)
    pool = BlockPool(20, 4, 1, 2, torch.float32, "cpu")
    tables = torch.arange(8).view(1, 2, 4)
    lens = torch.tensor([[16, 16]])
    # Layer 1: eight visual entries, then eight text ones; keeping one visual entry leaves 7 holes to fill.
    pool.visual_index[16:32] = torch.cat([torch.arange(8), torch.full((8,), -1)]).to(torch.int32)
    scores = torch.rand(1, 1, 17)
    before = (pool.k.clone(), pool.visual_index.clone())
    new_lens, moves = evict(pool, EvictionPlan.for_policy(policy, 2, torch.device("cpu")), policy, tables, lens,
                            scores, torch.tensor([[1]]), cap=2)
    # An overflowing eviction changes nothing, so it can be redone with a larger cap.
    assert moves == 7 and new_lens.tolist() == lens.tolist()
    assert torch.equal(pool.k, before[0]) and torch.equal(pool.visual_index, before[1])
    new_lens, moves = evict(pool, EvictionPlan.for_policy(policy, 2, torch.device("cpu")), policy, tables, lens,
                            scores, torch.tensor([[1]]), cap=8)
    assert moves == 7 and new_lens.tolist() == [[16, 9]]


def test_removal_bound_covers_every_step():
    """The per-step bound that sizes the move lists is at least what the budgets can take away."""
    for policy in (ST3(), ST3(anneal_curve="step", anneal_steps=8), ST3(start_layer=1, stride=1, ratio=0.5)):
        L, n0 = 12, 576
        held = policy.budgets(n0, L)
        for t in range(1, 70):
            now, before = policy.decode_budgets(n0, L, t), policy.decode_budgets(n0, L, t - 1)
            at_events = sum(max(0, before[e] - now[e]) for e in now)
            assert removal_bound(policy, n0, L, t) >= at_events
            assert removal_bound(policy, n0, L, t) <= sum(held)
    assert [cap_bucket(m) for m in (1, 64, 65, 97, 129, 4096, 4097)] == [64, 64, 96, 128, 192, 4096, 6144]
