"""Benchmark drivers: the engine under one policy (continuous batching, timed arrivals) and the
transformers baseline (one request at a time). Both return a RunRecord of raw measurements."""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field

from tools.bench.workload import BenchRequest


@dataclass
class ReqRecord:
    index: int
    token_ids: list[int]
    generated_tokens: int
    prompt_tokens: int
    text_prompt_tokens: int
    visual_tokens: int
    ttft_s: float | None           # from the scheduled arrival (includes preprocessing and queueing)
    tpot_s: float | None
    itl_s: list[float]
    e2e_s: float                   # from the scheduled arrival
    kv_peak_blocks: int | None
    visual_tokens_per_layer: list[int]
    preemptions: int
    finish_reason: str | None


@dataclass
class RunRecord:
    policy: str
    duration_s: float
    requests: list[ReqRecord]
    # [t, used_blocks, running]: one row per step at its start, holding what the step's forward held
    # (values last until the next row), plus a row whenever the engine falls idle.
    timeline: list[list]
    step_s: list[float] = field(default_factory=list)
    step_is_prefill: list[bool] = field(default_factory=list)
    kv_during_step: list[int] = field(default_factory=list)   # blocks in use during each step's forward
    step_running: list[int] = field(default_factory=list)     # sequences holding KV during each step
    mean_running: float | None = None   # set by drivers without steps (hf); else derived from steps
    kv_peak_blocks: int | None = None
    kv_total_blocks: int | None = None
    bytes_per_block: int | None = None
    num_layers: int = 0
    note: str = ""


class Progress:
    """A live status on stderr (no dependencies): one line redrawn ~10 times a second on a terminal;
    elsewhere (a pipe, a log file) a plain line every 10 s and the last one, with no control characters."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self.t0, self.last, self.shown = time.perf_counter(), 0.0, False

    def update(self, done: int, tokens: int, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < (0.1 if self.live else 10.0)):
            return
        self.last, self.shown = now, True
        rate = tokens / max(now - self.t0, 1e-9)
        line = f"[{self.label:>6}] {done}/{self.total} requests  {tokens} tok  {rate:8.1f} tok/s  {extra}"
        self.stream.write(f"\r{line}\x1b[K" if self.live else line.rstrip() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.shown and self.live:
            self.stream.write("\n")
            self.stream.flush()


class BenchError(ValueError):
    """A benchmark setting that cannot run (reported as `error: ...`, exit code 2)."""


def _greedy(n: int):
    from engine import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_engine(llm, label: str, workload: list[BenchRequest], warmup: BenchRequest,
               progress: bool = True) -> RunRecord:
    """Warm up with one short request, then replay the workload's arrivals through llm.step()."""
    llm.add_request({"prompt": warmup.prompt, "image": warmup.image}, _greedy(2))
    while llm.has_unfinished():
        llm.step()
    pool = getattr(getattr(llm, "cache", None), "pool", None)
    if pool is not None and hasattr(pool, "reset_peak"):
        pool.reset_peak()
    kv0 = llm.kv_stats()
    waiting = getattr(llm.scheduler, "waiting", ())
    pending = sorted(workload, key=lambda r: (r.arrival_s, r.index))
    by_rid: dict[str, tuple[BenchRequest, float]] = {}   # rid -> (request, added-at offset from arrival)
    finals: dict[int, object] = {}
    timeline, step_s, is_prefill, kv_during, step_running = [], [], [], [], []
    bar = Progress(label, len(workload), progress)
    tokens, max_out = 0, max(r.output_len for r in workload)
    idle_steps, stall_limit = 0, 4 * max_out + 200
    t0 = time.perf_counter()
    while pending or llm.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            rid = llm.add_request({"prompt": r.prompt, "image": r.image}, _greedy(r.output_len))
            # The engine clocks TTFT/E2E from when the sequence was queued; the bench adds the lag
            # between the scheduled arrival and that moment (image preprocessing, the step in progress).
            queued = getattr(getattr(llm, "_seqs", {}).get(rid), "arrival_time", None)
            by_rid[rid] = (r, (queued if queued is not None else time.perf_counter()) - t0 - r.arrival_s)
            now = time.perf_counter() - t0
        if not llm.has_unfinished():
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        n_wait = len(waiting)
        ts = time.perf_counter()
        outs = llm.step()
        te = time.perf_counter()
        n_finished, freed = 0, 0
        for o in outs:
            if o.finished:
                n_finished += 1
                freed += o.stats.get("kv_blocks_final") or 0
                finals[by_rid[o.request_id][0].index] = (o, by_rid[o.request_id][1])
        new_tokens = len(outs)
        tokens += new_tokens
        idle_steps = 0 if new_tokens else idle_steps + 1
        if idle_steps > stall_limit:
            raise BenchError(f"{label}: no token produced in {idle_steps} steps (the KV pool of "
                             f"{kv0['total_blocks']} blocks cannot hold a request at its longest; "
                             "raise --num-kv-blocks)")
        kv = llm.kv_stats()
        # What the forward held: sequences that finished in this step returned their blocks after it.
        running = len(llm.scheduler.running) + n_finished
        used = kv["used_blocks"] + freed
        step_s.append(te - ts)
        is_prefill.append(len(waiting) < n_wait)   # admissions only happen in prefill steps
        kv_during.append(used)
        step_running.append(running)
        timeline.append([round(ts - t0, 6), used, running])
        if not llm.has_unfinished():
            timeline.append([round(te - t0, 6), kv["used_blocks"], len(llm.scheduler.running)])
        bar.update(len(finals), tokens, f"running {running:3d}  kv {kv['used_blocks']}/{kv['total_blocks']}")
    duration = time.perf_counter() - t0
    bar.update(len(finals), tokens, "done", force=True)
    bar.close()
    kv = llm.kv_stats()
    peak = max([kv["peak_used_blocks"]] + [row[1] for row in timeline] + [0])
    reqs = []
    for idx in sorted(finals):
        o, lag = finals[idx]
        s = o.stats
        reqs.append(ReqRecord(idx, list(o.token_ids), s["generated_tokens"], s["prompt_tokens"],
                              s["text_prompt_tokens"], s["visual_tokens"],
                              None if s["ttft_s"] is None else s["ttft_s"] + lag, s["tpot_s"], list(s["itl_s"]),
                              s["e2e_s"] + lag, s["kv_peak_blocks"], list(s["visual_tokens_per_layer"]),
                              s["preemptions"], o.finish_reason))
    return RunRecord(label, duration, reqs, timeline, step_s, is_prefill, kv_during, step_running, None, peak,
                     kv["total_blocks"], kv["bytes_per_block"], llm.model_config.text.num_hidden_layers)


def make_processor(model_dir):
    """The engine's request processor without loading weights (prompt ids + pixels for the HF baseline)."""
    from pathlib import Path

    from engine.processor import InputProcessor
    from models.config import load_config
    from models.image import load_preprocessor_config
    from models.tokenizer import Tokenizer
    d = Path(model_dir)
    cfg = load_config(d)
    tok = Tokenizer.from_dir(d)
    pre_dir = d if (d / "preprocessor_config.json").exists() else Path(cfg.vision_tower_path or d)
    image_cfg = load_preprocessor_config(pre_dir, cfg.vision.image_size, pad=cfg.image_aspect_ratio == "pad")
    return InputProcessor(cfg, tok, image_cfg, cfg.text.max_position_embeddings), cfg


def hf_available() -> str | None:
    """None when the transformers baseline can run, else why not."""
    try:
        import transformers  # noqa: F401
        from transformers import LlavaForConditionalGeneration  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"transformers is not importable ({type(e).__name__}: {e})"
    return None


def run_hf(model_dir, workload: list[BenchRequest], warmup: BenchRequest, device: str = "cpu",
           progress: bool = True) -> RunRecord:
    """transformers' LlavaForConditionalGeneration.generate in fp32, one request at a time in arrival order."""
    import warnings

    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    processor, cfg = make_processor(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    model = model.to(device).eval()
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.ids, self.prompt_seen = [], [], False

        def put(self, value):
            if not self.prompt_seen:      # generate() first streams the prompt
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())
            self.ids.extend(value.reshape(-1).tolist())

        def end(self):
            pass

    def generate(r: BenchRequest, n: int, clock: Clock):
        p = processor.process({"prompt": r.prompt, "image": r.image})
        ids = torch.tensor([p.prompt_ids], device=device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # min_new_tokens == max_new_tokens is the transformers spelling of ignore_eos.
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=p.pixel_values.to(device, torch.float32), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=pad_id, streamer=clock)
        return p

    generate(warmup, 2, Clock())
    pending = sorted(workload, key=lambda r: (r.arrival_s, r.index))
    bar = Progress("hf", len(workload), progress)
    reqs, timeline, tokens, L, busy = [], [], 0, cfg.text.num_hidden_layers, 0.0
    t0 = time.perf_counter()
    for r in pending:
        now = time.perf_counter() - t0
        if r.arrival_s > now:
            time.sleep(r.arrival_s - now)
        start = time.perf_counter()
        timeline.append([round(start - t0, 6), None, 1])
        clock = Clock()
        p = generate(r, r.output_len, clock)
        end = time.perf_counter()
        busy += end - start
        timeline.append([round(end - t0, 6), None, 0])
        arrival = t0 + r.arrival_s
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        n_vis = p.num_visual
        reqs.append(ReqRecord(r.index, clock.ids, len(clock.ids), len(p.prompt_ids), len(p.prompt_ids) - n_vis,
                              n_vis, clock.times[0] - arrival if clock.times else None,
                              sum(gaps) / len(gaps) if gaps else None, gaps, end - arrival, None, [n_vis] * L,
                              0, "length"))
        tokens += len(clock.ids)
        bar.update(len(reqs), tokens, "running   1", force=True)
    duration = time.perf_counter() - t0
    bar.close()
    del model
    gc.collect()
    return RunRecord("hf", duration, reqs, timeline, mean_running=busy / max(duration, 1e-9), num_layers=L,
                     note="transformers generate, fp32, batch 1; KV figures do not apply")
