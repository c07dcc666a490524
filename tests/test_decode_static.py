"""The static-buffer decode step: padded buckets equal the dynamic path, and nothing syncs with the host."""
import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams
from engine.decode_buffers import graph_buckets, width_buckets
from tools.fixtures.make_tiny_model import make_tiny_model
from tools.fixtures.sync_guard import HostSync, no_host_sync

POLICIES = [("full", {}), ("fastv", {}), ("pvtp", {}), ("st3", {"anneal_steps": 3, "anneal_floor": 0.2})]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # block_size 4 below makes tables cross block boundaries every few tokens.
    return make_tiny_model(tmp_path_factory.mktemp("static") / "m", text_layers=6, kv_heads=2, image_size=48, seed=5)


def _requests():
    g = torch.Generator().manual_seed(1)
    img = lambda w, h: Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())  # noqa
    reqs = [{"prompt": "USER: <image>\nWhat is this? ASSISTANT:", "image": img(40, 60)},
            {"prompt": "Just text."},
            {"prompt": "USER: <image>\nTell me more about the shapes. ASSISTANT:", "image": img(80, 30)},
            {"prompt": "USER: <image>\nAnd this? ASSISTANT:", "image": img(50, 50)},
            {"prompt": "Another plain prompt that is a bit longer than the first one."}]
    # Different lengths make the running batch shrink (and, with arrivals, grow) between steps.
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0) for n in (9, 3, 17, 6, 12)]
    return reqs, params


def _run(model_dir, kind, params, pad: bool, max_num_seqs=6, widths_seen=None):
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=700, block_size=4,
              max_num_seqs=max_num_seqs)
    llm.runner.pad_batches = pad
    if widths_seen is not None:
        inner = llm.runner.decode_forward

        def spy(input_ids, positions, slot_mapping, block_tables, *rest, **kw):
            widths_seen.add((input_ids.shape[0], block_tables.shape[-1]))
            return inner(input_ids, positions, slot_mapping, block_tables, *rest, **kw)
        llm.runner.decode_forward = spy
    reqs, sp = _requests()
    # Stagger arrivals: two requests first, the rest join after a few steps.
    ids, done = [llm.add_request(r, p) for r, p in zip(reqs[:2], sp[:2])], {}
    for _ in range(3):
        done.update({o.request_id: o for o in llm.step() if o.finished})
    ids += [llm.add_request(r, p) for r, p in zip(reqs[2:], sp[2:])]
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    outs = [done[i] for i in ids]
    assert not llm._seqs  # finished requests are not kept around
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]
    return outs


@pytest.mark.parametrize("kind,params", POLICIES, ids=[p[0] for p in POLICIES])
def test_padded_static_step_equals_dynamic(model_dir, kind, params):
    seen = set()
    dyn, static = _run(model_dir, kind, params, False), _run(model_dir, kind, params, True, widths_seen=seen)
    # The run must really move between buckets: batch sizes and table widths both change.
    rows, widths = {r for r, _ in seen}, {w for _, w in seen}
    assert len(rows) > 1 and len(widths) > 1, seen
    assert rows <= set(graph_buckets(6)) and widths <= set(width_buckets(-(-4096 // 4))), seen
    for a, b in zip(dyn, static):
        assert a.token_ids == b.token_ids
        for ea, eb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(ea[t] - eb[t]) < 1e-4
        assert a.stats["visual_tokens_per_layer"] == b.stats["visual_tokens_per_layer"]


def test_buckets():
    assert width_buckets(256) == [16, 32, 64, 128, 256]
    assert width_buckets(40) == [16, 32, 40]
    assert width_buckets(8) == [8] and width_buckets(16) == [16]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(1) == [1]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("kind,params", POLICIES, ids=[p[0] for p in POLICIES])
def test_decode_step_never_syncs_with_host(model_dir, kind, params, pad):
    """The device part of a decode step, ST3's eviction included, reads nothing back (aten-level guard)."""
    llm = LLM(model_dir, policy=kind, policy_params=params, num_kv_blocks=700, block_size=4, max_num_seqs=6)
    llm.runner.pad_batches = pad
    calls = []

    def guarded(name):
        inner = getattr(llm.runner, name)

        def run(*args, **kwargs):
            calls.append(name)
            with no_host_sync():
                return inner(*args, **kwargs)
        setattr(llm.runner, name, run)
    guarded("decode_forward")
    guarded("evict_step")
    reqs, sp = _requests()
    outs = llm.generate(reqs, sp)
    assert all(o.finish_reason == "length" for o in outs)
    assert "decode_forward" in calls and (("evict_step" in calls) == (kind == "st3")), set(calls)


@pytest.mark.parametrize("op", ["item", "mask", "nonzero", "repeat_interleave", "tolist", "bool"])
def test_sync_guard_fires(op):
    x = torch.arange(6.0)
    probes = {"item": lambda: x.sum().item(), "mask": lambda: x[x > 2], "nonzero": lambda: x.nonzero(),
              "repeat_interleave": lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long)),
              "tolist": lambda: x.tolist(), "bool": lambda: bool(x.sum() > 1)}
    with pytest.raises(HostSync), no_host_sync():
        probes[op]()


@pytest.mark.parametrize("pad", [False, True])
def test_score_rows_only_while_annealing(model_dir, pad):
    """ST3 decode forwards produce score rows during the anneal and skip them once budgets stop shrinking."""
    llm = LLM(model_dir, policy="st3", policy_params={"anneal_steps": 4, "anneal_floor": 0.2},
              num_kv_blocks=700, block_size=4, max_num_seqs=6)
    llm.runner.pad_batches = pad
    inner, calls = llm.runner.decode_forward, []

    def spy(*args, **kwargs):
        calls.append(bool(args[5]))  # score_layers
        return inner(*args, **kwargs)
    llm.runner.decode_forward = spy
    reqs, _ = _requests()
    llm.generate(reqs[:1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    # Token t's eviction uses forward t-1's scores; budgets stop shrinking at t = anneal_steps.
    assert calls == [True] * 3 + [False] * 8, calls
    assert llm.policy.needs_decode_scores(36, 6, 2, [36] * 6)
    floor = llm.policy.decode_budgets(36, 6, 9)  # event layers 2 and 4
    assert not llm.policy.needs_decode_scores(36, 6, 9, [36, 36, floor[2], floor[2], floor[4], floor[4]])
    assert llm.policy.needs_decode_scores(36, 6, 9, [36, 36, floor[2] + 1, floor[2], floor[4], floor[4]])
