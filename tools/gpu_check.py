"""Everything that needs a GPU, in one prepared run (about 5 minutes on an H100).

  PYTHONPATH=. python tools/gpu_check.py [--out DIR] [--layers 8]

1. Parity on CUDA: our model vs transformers (fp32 within 1e-4; bf16 within a stated tolerance).
2. The engine vs the naive ST3 reference (tools/fixtures/st3_reference.py, run on the CPU) for every policy.
3. CUDA-graph replay equals eager decode token for token, every policy, with batches that shrink/grow.
4. The Triton paged decode kernel vs the gather + SDPA path, and which one the engine picked.
5. Decode ms/token at LLaVA-1.5-7B width (fewer layers): eager, graphs, transformers, HBM floor
   (tools/bench/gpu.py).
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

from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import decode_attention, entry_slots, gather_kv  # noqa: E402
from tools.bench.gpu import decode_speed  # noqa: E402
from tools.fixtures.make_tiny_model import make_tiny_model  # noqa: E402

POLICIES = [("full", {}), ("fastv", {}), ("pvtp", {}), ("st3", {"anneal_steps": 4}),
            ("st3", {"anneal_steps": 6, "anneal_floor": 0.2, "anneal_curve": "cosine"})]
RESULTS: dict = {"checks": {}, "bench": {}}
ARGS: argparse.Namespace


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
        llm = LLM(model_dir, device="cuda", dtype=name, num_kv_blocks=2000)
        hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).cuda().eval()
        req = requests()[0]
        p = llm.processor.process(req)
        ids = torch.tensor([p.prompt_ids], device="cuda")
        pix = p.pixel_values.cuda().to(dtype)
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
        torch.cuda.empty_cache()
    return out


@check("engine on CUDA equals the naive ST3 reference (CPU), every policy")
def reference(model_dir: Path) -> dict:
    from tools.fixtures.st3_reference import reference_generate
    cpu = LLM(model_dir, num_kv_blocks=50)
    out = {}
    for kind, params in POLICIES:
        llm = LLM(model_dir, device="cuda", policy=kind, policy_params=params, num_kv_blocks=2000)
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


@check("Triton paged kernel vs gather + SDPA")
def triton_kernel(model_dir: Path) -> dict:
    from engine.triton_attention import paged_decode_attention
    out = {}
    for dtype, hkv, h, d in ((torch.float32, 4, 16, 64), (torch.bfloat16, 8, 32, 128), (torch.float16, 32, 32, 128)):
        bs, nb, b, w = 16, 512, 6, 40
        k = torch.randn(nb * bs + 1, hkv, d, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        tables = torch.randperm(nb, device="cuda")[: b * 2 * w].view(b, 2, w)
        lens = torch.randint(1, w * bs + 1, (b, 2), device="cuda")
        q = torch.randn(b, h, d, device="cuda", dtype=dtype)
        for layer in (0, 1):
            slots = entry_slots(tables[:, layer], bs)
            ref = decode_attention(q, gather_kv(k, slots), gather_kv(v, slots), lens[:, layer], False)[0]
            got = paged_decode_attention(q, k, v, tables, lens, layer, bs)
            diff = (ref.float() - got.float()).abs().max().item()
            assert diff < (1e-4 if dtype == torch.float32 else 2e-2), f"{dtype}: {diff}"
        out[str(dtype)] = diff
    llm = LLM(model_dir, device="cuda")  # the pool sized from free memory, as users get it
    out["engine_uses_triton"] = llm.runner.use_triton
    out["default pool blocks"] = llm.kv_stats()["total_blocks"]
    assert llm.generate([requests()[0]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    return out


@check("decode speed at LLaVA-1.5-7B width")
def bench(work: Path, layers: int) -> dict:
    RESULTS["bench"] = out = {}  # filled as it goes, so a run cut short still writes what it measured
    return decode_speed(work, layers, image(3, 336, 336), out, write_results)


def write_results() -> None:
    """Write what is known so far, so a run cut off by a time limit still leaves its results."""
    (Path(ARGS.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", help="keep the generated checkpoints here (default: a temporary directory)")
    ap.add_argument("--only", help="comma-separated subset of: parity,reference,graphs,triton,bench")
    ARGS = args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device")
        return 2
    # fp32 parity means fp32: cuDNN would otherwise run the CLIP patch convolution in TF32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    only = set(args.only.split(",")) if args.only else {"parity", "reference", "graphs", "triton", "bench"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        small = work / "small"
        if not (small / "config.json").exists():
            make_tiny_model(small, text_layers=6, kv_heads=2, image_size=64, seed=7)
        for name, fn, fargs in (("parity", parity, (small,)), ("reference", reference, (small,)),
                                ("graphs", graphs, (small,)), ("triton", triton_kernel, (small,)),
                                ("bench", bench, (work, args.layers))):
            if name in only:
                fn(*fargs)
                write_results()
    failed = [k for k, v in RESULTS["checks"].items() if not v["ok"]]
    print(json.dumps({k: v for k, v in RESULTS.items() if k != "checks"}, indent=2))
    print(f"{len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
