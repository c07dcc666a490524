"""Block accounting under ST3's device-side evictions mixed with finishes, aborts and preemptions."""
import random

import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams
from tools.fixtures.make_tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("blocks") / "m", text_layers=6, kv_heads=2, image_size=48, seed=9)


def check_accounting(llm: LLM) -> None:
    """Free = total - what the live sequences' lengths need; no block is held twice or held and free."""
    cache, pool = llm.cache, llm.cache.pool
    live = [s for s in llm.scheduler.running]
    held = []
    for seq in live:
        n = -(-cache.lens[seq.seat] // cache.block_size)
        for layer in range(cache.num_layers):
            held += cache.tables[seq.seat, layer, :int(n[layer])].tolist()
    free = list(pool._free)
    assert pool.num_free == pool.num_blocks - sum(cache.blocks_held(s.seat) for s in live)
    assert len(set(held)) == len(held), "a block is reachable from two (sequence, layer) tables"
    assert len(set(free)) == len(free) and not set(free) & set(held)
    assert sorted(free + held) == list(range(pool.num_blocks))
    for seq in live:  # the host's visual counts agree with the lengths the device left
        text = seq.prompt_len - seq.num_visual + seq.cursor - 1  # the prompt, then one entry per fed token
        assert [int(n) - text for n in cache.lens[seq.seat]] == seq.visual_per_layer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accounting_under_evictions_aborts_and_preemption(model_dir, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    img = lambda: Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy())  # noqa
    llm = LLM(model_dir, policy="st3", policy_params={"anneal_steps": 6, "anneal_floor": 0.2, "start_layer": 1,
                                                      "stride": 2},
              num_kv_blocks=160, block_size=4, max_num_seqs=5)
    ids, preempted, evicted = [], 0, 0
    for step in range(120):
        if rng.random() < 0.4 and len(ids) < 40:
            req = {"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "image": img()} if rng.random() < 0.8 \
                else {"prompt": "plain text " * rng.randint(1, 4)}
            ids.append(llm.add_request(req, SamplingParams(max_tokens=rng.randint(2, 30), ignore_eos=True,
                                                           temperature=0)))
        if ids and rng.random() < 0.1:
            llm.abort(rng.choice(ids))
        before = sum(s.visual_per_layer[-1] for s in llm.scheduler.running if s.num_visual)
        llm.step()
        evicted += before > sum(s.visual_per_layer[-1] for s in llm.scheduler.running if s.num_visual)
        preempted = max(preempted, sum(s.num_preemptions for s in llm._seqs.values()))
        check_accounting(llm)
    while llm.has_unfinished():
        llm.step()
        check_accounting(llm)
    assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]
    assert evicted and preempted, (evicted, preempted)  # the mix really happened
