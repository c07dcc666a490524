"""Everything that needs a GPU, in one prepared run (about 6 minutes on an H100/H200).

  PYTHONPATH=. python tools/gpu_check.py [--out DIR]              # on the GPU machine
  PYTHONPATH=. python tools/gpu_check.py --device cpu --smoke     # the same code on a CPU, tiny shapes

Checks, on a small random model:
1. Parity: our model vs transformers (fp32 within 1e-4; bf16 within a stated tolerance).
2. The engine vs the naive ST3 reference (tools/fixtures/st3_reference.py, run on the CPU) for every policy.
3. CUDA-graph replay equals eager decode token for token, every policy, with batches that shrink/grow.
4. The Triton paged decode kernel (and its ST3 score-row pass) vs the gather + SDPA path.
5. ST3's decode step, eviction included, under torch.cuda.set_sync_debug_mode("error"), graphs and eager
   (on a CPU: under the aten-level no_host_sync guard).
Measurements at LLaVA-1.5-7B geometry, every policy (tools/bench/gpu.py): prefill, decode ms/step with
graphs at batch 1/16/64, serving output tok/s under a KV budget, full's graph step vs the HBM floor.
Prints a summary and writes gpu_check.json (to --out, default $OUT or the cwd). Exit 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

from engine import LLM, SamplingParams
from engine.attention import decode_attention, entry_slots, gather_kv
from tools.bench.gpu import free_memory, measure, table
from tools.fixtures.make_tiny_model import make_tiny_model
from tools.fixtures.sync_guard import no_host_sync

POLICIES = [("full", {}), ("fastv", {}), ("pvtp", {}), ("st3", {"anneal_steps": 4}),
            ("st3", {"anneal_steps": 6, "anneal_floor": 0.2, "anneal_curve": "cosine"})]
RESULTS: dict = {"checks": {}, "bench": {}}
ARGS: argparse.Namespace
DEV = "cuda"


def image(seed: int, w: int, h: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def requests():
    return [{"prompt": "USER: <image>\nWhat is shown here? ASSISTANT:", "image": image(1, 70, 50)},
            {"prompt": "A text-only request."},
            {"prompt": "USER: <image>\nDescribe it in detail. ASSISTANT:", "image": image(2, 40, 90)}]


def check(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                detail = fn(*a, **k)
                RESULTS["checks"][name] = {"ok": True, "detail": detail, "s": round(time.perf_counter() - t0, 1)}
            except Exception as e:  # keep going: one failed check must not hide the others
                RESULTS["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                           "trace": traceback.format_exc()[-2000:]}
            print(f"[{'ok' if RESULTS['checks'][name]['ok'] else 'FAIL'}] {name}: "
                  f"{RESULTS['checks'][name].get('detail') or RESULTS['checks'][name].get('error')}", flush=True)
        return run
    return wrap


@check("parity fp32 and bf16 vs transformers on CUDA")
def parity(model_dir: Path) -> dict:
    from transformers import LlavaForConditionalGeneration
    out = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.25)):
        name = str(dtype).split(".")[1]
        llm = LLM(model_dir, device=DEV, dtype=name, num_kv_blocks=2000)
        hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(DEV).eval()
        req = requests()[0]
        p = llm.processor.process(req)
        ids = torch.tensor([p.prompt_ids], device=DEV)
        pix = p.pixel_values.to(DEV, dtype)
        eos = sorted(llm.eos_ids)
        with torch.inference_mode():
            ref = hf(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids)).logits.float()
            ours = llm.model(ids, pix).float()
            hf_tokens = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                    pad_token_id=hf.config.pad_token_id)[0, ids.shape[1]:].tolist()
        diff = (ref - ours).abs().max().item()
        tokens = llm.generate([req], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
        out[name] = {"max_logit_diff": diff, "tol": tol, "logit_absmax": ref.abs().max().item(),
                     "greedy_equal": tokens == hf_tokens}
        assert diff < tol, f"{name}: logits differ by {diff} > {tol}"
        if dtype == torch.float32:
            assert tokens == hf_tokens, f"greedy tokens differ: {tokens} vs {hf_tokens}"
        del llm, hf
        free_memory(DEV)
    return out


@check("engine on CUDA equals the naive ST3 reference (CPU), every policy")
def reference(model_dir: Path) -> dict:
    from tools.fixtures.st3_reference import reference_generate
    cpu = LLM(model_dir, num_kv_blocks=50)
    out = {}
    for kind, params in POLICIES:
        llm = LLM(model_dir, device=DEV, policy=kind, policy_params=params, num_kv_blocks=2000)
        outs = llm.generate(requests(), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0))
        worst = 0.0
        for req, o in zip(requests(), outs):
            p = cpu.processor.process(req)
            ref = reference_generate(cpu.model, p.prompt_ids, p.pixel_values, {"kind": kind, **params}, 12)
            assert o.token_ids == ref["token_ids"], f"{kind} {params}: {o.token_ids} vs {ref['token_ids']}"
            worst = max(worst, max(abs(e[t] - r) for e, t, r in zip(o.logprobs, o.token_ids, ref["logprobs"])))
        assert worst < 1e-3, f"{kind}: logprobs differ by {worst}"
        out[f"{kind}{params or ''}"] = {"max_logprob_diff": worst}
    return out


def staggered(llm: LLM) -> list[list[int]]:
    """Requests that arrive over time and finish at different steps, so batches shrink and grow."""
    reqs = requests() * 3
    sp = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 5, 33, 9, 14, 40, 3, 25, 17)]
    ids, done, steps = [llm.add_request(r, p) for r, p in zip(reqs[:3], sp[:3])], {}, 0
    while llm.has_unfinished() or len(ids) < len(reqs):
        if steps % 4 == 3 and len(ids) < len(reqs):
            ids.append(llm.add_request(reqs[len(ids)], sp[len(ids)]))
        done.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
        steps += 1
    return [done[i] for i in ids]


@check("CUDA-graph replay equals eager, every policy")
def graphs(model_dir: Path) -> dict:
    out = {}
    for kind, params in POLICIES:
        runs = []
        for eager in (True, False):
            llm = LLM(model_dir, device="cuda", policy=kind, policy_params=params, num_kv_blocks=3000,
                      max_num_seqs=16, enforce_eager=eager, block_size=8)
            assert (llm.runner.graphs is None) == eager
            runs.append(staggered(llm))
            assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]
        assert runs[0] == runs[1], f"{kind}: graph replay differs from eager"
        out[kind] = "equal"
    return out


@check("Triton paged kernel and its score rows vs gather + SDPA")
def triton_kernel(model_dir: Path) -> dict:
    from engine.triton_attention import paged_decode_attention
    out = {}
    for dtype, hkv, h, d in ((torch.float32, 4, 16, 64), (torch.bfloat16, 8, 32, 128), (torch.float16, 32, 32, 128)):
        bs, nb, b, w, n = 16, 512, 6, 40, 576
        k = torch.randn(nb * bs + 1, hkv, d, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        vis = torch.full((k.shape[0],), -1, dtype=torch.int32, device="cuda")
        tables = torch.randperm(nb, device="cuda")[: b * 2 * w].view(b, 2, w)
        for row in range(b):  # layer 1: unique visual indices per sequence between text entries
            sl = entry_slots(tables[row:row + 1, 1], bs)[0]
            vis[sl] = torch.where(torch.rand(len(sl), device="cuda") < 0.6,
                                  torch.randperm(n, device="cuda")[:len(sl)], -1).to(torch.int32)
        lens = torch.randint(1, w * bs + 1, (b, 2), device="cuda")
        q = torch.randn(b, h, d, device="cuda", dtype=dtype)
        worst = {}
        for layer in (0, 1):
            slots = entry_slots(tables[:, layer], bs)
            ref, row_ref = decode_attention(q, gather_kv(k, slots), gather_kv(v, slots), lens[:, layer], True)
            got = paged_decode_attention(q, k, v, tables, lens, layer, bs)
            scores = torch.zeros(b, n + 1, device="cuda")
            got_s = paged_decode_attention(q, k, v, tables, lens, layer, bs, scores=scores, visual_index=vis)
            valid = torch.arange(slots.shape[1], device="cuda")[None, :] < lens[:, layer, None]
            want = torch.zeros(b, n + 1, device="cuda").scatter_(
                1, torch.where(valid & (vis[slots] >= 0), vis[slots].long(), n), row_ref)
            worst[layer] = max((ref.float() - got.float()).abs().max().item(),
                               (ref.float() - got_s.float()).abs().max().item())
            sdiff = (scores[:, :n] - want[:, :n]).abs().max().item()
            assert worst[layer] < (1e-4 if dtype == torch.float32 else 2e-2), f"{dtype}: {worst[layer]}"
            assert sdiff < 1e-3, f"{dtype}: score rows differ by {sdiff}"
        out[str(dtype)] = {"attention": max(worst.values()), "scores": sdiff}
    for policy in ("full", "st3"):  # the pool sized from free memory, as users get it
        llm = LLM(model_dir, device="cuda", policy=policy)
        out[f"engine uses triton ({policy})"] = llm.runner.attention.use_triton
        out["default pool blocks"] = llm.kv_stats()["total_blocks"]
        assert llm.generate([requests()[0]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
        del llm
    return out


@check("ST3 decode step with eviction makes no host sync (graphs and eager)")
def no_sync(model_dir: Path) -> dict:
    """Run twice: the first run captures every graph it needs; the second replays under the sync guard."""
    out = {}
    for eager in (True, False) if DEV == "cuda" else (True,):
        llm = LLM(model_dir, device=DEV, policy="st3", policy_params={"anneal_steps": 6, "anneal_floor": 0.2},
                  num_kv_blocks=2000, max_num_seqs=16, enforce_eager=eager, block_size=8)
        first = staggered(llm)
        names = ["decode_forward", "evict_step"]
        if not eager:
            replay = llm.runner.graphs.replay
            llm.runner.graphs.replay = lambda *a: guarded(replay, *a)
        for name in names:
            fn = getattr(llm.runner, name)
            setattr(llm.runner, name, lambda *a, _fn=fn, **k: guarded(_fn, *a, **k))
        assert staggered(llm) == first, "the guarded run differs from the first"
        out["eager" if eager else "graphs"] = "no sync"
        if not eager:
            out["eviction graphs captured"] = len(llm.runner.evict_graphs.graphs)
            assert llm.runner.evict_graphs.failed is None, f"eviction graph capture: {llm.runner.evict_graphs.failed}"
    return out


def guarded(fn, *args, **kwargs):
    """Call fn with any host synchronisation an error."""
    if DEV != "cuda":
        with no_host_sync():
            return fn(*args, **kwargs)
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@check("every policy at LLaVA-1.5-7B geometry")
def bench(work: Path) -> dict:
    RESULTS["bench"] = out = {}  # filled as it goes, so a run cut short still writes what it measured
    return measure(work, out, write_results, device=DEV, smoke=ARGS.smoke)


def write_results() -> None:
    """Write what is known so far, so a run cut off by a time limit still leaves its results."""
    (Path(ARGS.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))


def main() -> int:
    global ARGS, DEV
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", help="keep the generated checkpoints here (default: a temporary directory)")
    ap.add_argument("--only", help="comma-separated subset of: parity,reference,graphs,triton,sync,bench")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to test this script itself")
    ap.add_argument("--smoke", action="store_true", help="tiny widths for the measurements (a test of the script)")
    ARGS = args = ap.parse_args()
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (or --device cpu --smoke to test the script)")
        return 2
    # fp32 parity means fp32: cuDNN would otherwise run the CLIP patch convolution in TF32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    RESULTS["device"] = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    RESULTS["torch"] = torch.__version__
    only = set(args.only.split(",")) if args.only else {"parity", "reference", "graphs", "triton", "sync", "bench"}
    if DEV != "cuda":
        only -= {"graphs", "triton"}  # CUDA graphs and Triton exist only there
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        small = work / "small"
        if not (small / "config.json").exists():
            make_tiny_model(small, text_layers=6, kv_heads=2, image_size=64, seed=7)
        for name, fn, fargs in (("parity", parity, (small,)), ("reference", reference, (small,)),
                                ("graphs", graphs, (small,)), ("triton", triton_kernel, (small,)),
                                ("sync", no_sync, (small,)), ("bench", bench, (work,))):
            if name in only:
                fn(*fargs)
                write_results()
    failed = [k for k, v in RESULTS["checks"].items() if not v["ok"]]
    print(json.dumps({k: v for k, v in RESULTS.items() if k != "checks"}, indent=2))
    print(table(RESULTS["bench"]))
    print(f"{len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
