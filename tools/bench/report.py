"""Benchmark summaries: percentiles, per-run metrics (the JSON `runs` entries), the side-by-side table, the plot."""
from __future__ import annotations

import math

from tools.bench.runner import RunRecord


def percentile(values, q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _dist(prefix: str, values) -> dict:
    values = [v for v in values if v is not None]
    return {f"{prefix}_p50_s": percentile(values, 50), f"{prefix}_p90_s": percentile(values, 90),
            f"{prefix}_p99_s": percentile(values, 99), f"{prefix}_mean_s": mean(values)}


def summarize(run: RunRecord, reference: RunRecord | None = None) -> dict:
    """One `runs` entry of the JSON report."""
    reqs, dur = run.requests, max(run.duration_s, 1e-9)
    out_tok = sum(r.generated_tokens for r in reqs)
    text_in = sum(r.text_prompt_tokens for r in reqs)
    vis_in = sum(r.visual_tokens for r in reqs)
    images = sum(1 for r in reqs if r.visual_tokens)
    L = run.num_layers or max((len(r.visual_tokens_per_layer) for r in reqs), default=0)
    per_layer = [mean(r.visual_tokens_per_layer[l] for r in reqs if len(r.visual_tokens_per_layer) > l)
                 for l in range(L)]
    bpb = run.bytes_per_block
    decode_kv = [b for b, pre in zip(run.kv_during_step, run.step_is_prefill) if not pre]
    running = [row[2] for row in run.timeline]
    # Mean concurrency over the run's wall time: each step's batch counts for as long as the step
    # took, idle waits for arrivals count as 0.
    mean_running = run.mean_running
    if mean_running is None and run.step_s:
        mean_running = sum(n * w for n, w in zip(run.step_running, run.step_s)) / dur
    steps = len(run.step_s) or None
    n_prefill = sum(run.step_is_prefill) if steps else None
    m = {
        "policy": run.policy,
        "num_requests": len(reqs),
        "duration_s": run.duration_s,
        "req_per_s": len(reqs) / dur,
        "output_tok_per_s": out_tok / dur,
        "total_tok_per_s": (out_tok + text_in + vis_in) / dur,
        "text_input_tok_per_s": text_in / dur,
        "visual_input_tok_per_s": vis_in / dur,
        "images_per_s": images / dur,
        "output_tokens": out_tok,
        "output_token_ids": sum(len(r.token_ids) for r in reqs),
        "text_input_tokens": text_in,
        "visual_input_tokens": vis_in,
        "images": images,
        **_dist("ttft", (r.ttft_s for r in reqs)),
        **_dist("tpot", (r.tpot_s for r in reqs)),
        **_dist("itl", (g for r in reqs for g in r.itl_s)),
        **_dist("e2e", (r.e2e_s for r in reqs)),
        "kv_total_blocks": run.kv_total_blocks,
        "kv_bytes_per_block": bpb,
        "kv_peak_blocks": run.kv_peak_blocks,
        "kv_peak_bytes": None if run.kv_peak_blocks is None or bpb is None else run.kv_peak_blocks * bpb,
        "kv_request_peak_blocks_mean": mean(r.kv_peak_blocks for r in reqs),
        # Estimate: a decode step reads (about) every block in use during it.
        "kv_read_per_decode_step_bytes_est": None if bpb is None or not decode_kv else mean(decode_kv) * bpb,
        "visual_tokens_kept_mean": mean(mean(r.visual_tokens_per_layer) for r in reqs if r.visual_tokens_per_layer),
        "visual_tokens_per_layer": per_layer,
        "peak_running": max(running, default=0),
        "mean_running": mean_running,
        "preemptions": sum(r.preemptions for r in reqs),
        "num_steps": steps,
        "prefill_steps": n_prefill,
        "decode_steps": None if steps is None else steps - n_prefill,
        "prefill_step_mean_s": mean(s for s, p in zip(run.step_s, run.step_is_prefill) if p),
        "decode_step_mean_s": mean(s for s, p in zip(run.step_s, run.step_is_prefill) if not p),
        "same_tokens_as_full": None,
        "note": run.note,
        "requests": [{"index": r.index, "prompt_tokens": r.prompt_tokens, "text_prompt_tokens": r.text_prompt_tokens,
                      "visual_tokens": r.visual_tokens, "generated_tokens": r.generated_tokens,
                      "num_token_ids": len(r.token_ids), "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s,
                      "kv_peak_blocks": r.kv_peak_blocks, "preemptions": r.preemptions,
                      "finish_reason": r.finish_reason} for r in reqs],
        "timeline": run.timeline,
    }
    if reference is not None and reference.requests:
        ref = {r.index: r.token_ids for r in reference.requests}
        m["same_tokens_as_full"] = sum(ref.get(r.index) == r.token_ids for r in reqs) / max(len(reqs), 1)
    return m


MiB = 1 << 20
# (label, key, scale, format); ratios are value / full's value.
ROWS = [
    ("requests/s", "req_per_s", 1, ".3f"),
    ("output tok/s", "output_tok_per_s", 1, ".2f"),
    ("total tok/s (in+out)", "total_tok_per_s", 1, ".1f"),
    ("  text input tok/s", "text_input_tok_per_s", 1, ".1f"),
    ("  visual input tok/s", "visual_input_tok_per_s", 1, ".1f"),
    ("images/s", "images_per_s", 1, ".3f"),
    ("duration s", "duration_s", 1, ".2f"),
    *[(f"{name} {p} ms", f"{key}_{p}_s", 1e3, ".1f") for name, key in
      (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e")) for p in ("p50", "p90", "p99", "mean")],
    ("KV pool blocks", "kv_total_blocks", 1, "d"),
    ("KV peak blocks", "kv_peak_blocks", 1, "d"),
    ("KV peak MiB", "kv_peak_bytes", 1 / MiB, ".1f"),
    ("KV blocks/request (peak, mean)", "kv_request_peak_blocks_mean", 1, ".1f"),
    ("KV read/decode step MiB (est.)", "kv_read_per_decode_step_bytes_est", 1 / MiB, ".2f"),
    ("visual tokens kept (mean/layer)", "visual_tokens_kept_mean", 1, ".1f"),
    ("running seqs peak", "peak_running", 1, "d"),
    ("running seqs mean (time-wtd)", "mean_running", 1, ".2f"),
    ("preemptions", "preemptions", 1, "d"),
    ("steps (prefill)", "prefill_steps", 1, "d"),
    ("steps (decode)", "decode_steps", 1, "d"),
    ("prefill step mean ms", "prefill_step_mean_s", 1e3, ".1f"),
    ("decode step mean ms", "decode_step_mean_s", 1e3, ".1f"),
    ("output tokens", "output_tokens", 1, "d"),
    ("text input tokens", "text_input_tokens", 1, "d"),
    ("visual input tokens", "visual_input_tokens", 1, "d"),
    ("same tokens as full (frac.)", "same_tokens_as_full", 1, ".2f"),
]


def _fmt(v, scale, fmt) -> str:
    if v is None:
        return "n/a"
    v = v * scale
    return format(int(round(v)), fmt) if fmt == "d" else format(v, fmt)


def format_table(runs: list[dict]) -> str:
    """One column per policy; every cell also shows its ratio to `full` when full ran."""
    full = next((r for r in runs if r["policy"] == "full"), None)
    header = ["metric"] + [r["policy"] for r in runs]
    rows = [header]
    for label, key, scale, fmt in ROWS:
        cells = [label]
        for r in runs:
            v = r.get(key)
            cell = _fmt(v, scale, fmt)
            f = None if full is None else full.get(key)
            if full is not None and r is not full and v is not None and f not in (None, 0):
                cell += f" ({v / f:.2f}x)"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = ["(x) = ratio to full." if full else "(no `full` run: no ratios)",
             "TTFT/E2E are measured from each request's scheduled arrival (image preprocessing and queueing "
             "included); KV read/decode step is an estimate (blocks in use during a decode step x bytes/block)."]
    for r in runs:
        per = r.get("visual_tokens_per_layer") or []
        if per:
            lines_per = " ".join(f"{x:.0f}" for x in per)
            notes.append(f"visual tokens kept per layer [{r['policy']}]: {lines_per}")
        if r.get("note"):
            notes.append(f"[{r['policy']}] {r['note']}")
    return "\n".join(lines + [""] + notes)


def plot_scales(runs: list[dict]) -> tuple[float, float]:
    """(KV-blocks top, running-sequences top) shared by every panel, so panels compare at a glance."""
    kv = max((max(r.get("kv_total_blocks") or 0, max((row[1] or 0) for row in r["timeline"]))
              for r in runs if r["timeline"]), default=0)
    running = max((max(row[2] for row in r["timeline"]) for r in runs if r["timeline"]), default=0)
    return kv * 1.05 + 1, running + 1


def plot(runs: list[dict], path: str, log=print) -> bool:
    """KV blocks in use (left axis) and running sequences (right axis) over time, one panel per policy,
    every panel on the same scales, with a legend; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"--plot {path}: matplotlib is needed for plots (pip install -e '.[bench]'); skipping the plot")
        return False
    runs = [r for r in runs if r["timeline"]]
    kv_top, running_top = plot_scales(runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * max(1, len(runs))), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], runs):
        t = [row[0] for row in r["timeline"]]
        blocks = [row[1] for row in r["timeline"]]
        if any(b is not None for b in blocks):
            ax.step(t, [b or 0 for b in blocks], where="post", color="tab:blue", label="KV blocks in use")
            if r.get("kv_total_blocks"):
                ax.axhline(r["kv_total_blocks"], color="tab:blue", linestyle=":", linewidth=1, label="KV pool")
        ax.set_ylabel("KV blocks", color="tab:blue")
        ax.set_ylim(0, kv_top)
        ax2 = ax.twinx()
        ax2.step(t, [row[2] for row in r["timeline"]], where="post", color="tab:orange", label="running seqs")
        ax2.set_ylabel("running", color="tab:orange")
        ax2.set_ylim(0, running_top)
        handles, labels = ax.get_legend_handles_labels()
        handles2, labels2 = ax2.get_legend_handles_labels()
        ax2.legend(handles + handles2, labels + labels2, loc="upper right", fontsize="small")
        ax.set_title(f"{r['policy']}: {r['output_tok_per_s']:.2f} output tok/s, peak {r['peak_running']} running")
    axes[-1, 0].set_xlabel("seconds since the first arrival")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return True
