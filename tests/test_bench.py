"""tools.bench on the tiny random-weight preset: every policy (and hf), the JSON report, argument errors."""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.policy import ST3, Full
from tools.bench import serving as bench
from tools.bench.report import percentile
from tools.bench.workload import parse_len_range

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = ["policy", "output_tok_per_s", "req_per_s", "total_tok_per_s",
              *[f"{m}_{p}_s" for m in ("ttft", "tpot", "itl", "e2e") for p in ("p50", "p90", "p99", "mean")],
              "kv_peak_blocks", "kv_peak_bytes", "visual_tokens_kept_mean", "visual_tokens_per_layer",
              "peak_running", "num_requests", "output_tokens", "text_input_tokens", "visual_input_tokens",
              "preemptions", "duration_s", "timeline", "images_per_s", "mean_running",
              "kv_read_per_decode_step_bytes_est", "requests"]
COMMON = ["--preset", "tiny", "--seed", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Presets go to a throwaway cache; the tiny one takes about a second to write.
    d = os.environ.get("ST3_BENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("st3cache"))
    return d


@pytest.fixture(scope="module")
def report(cache_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "all.json"
    rc = bench.main(COMMON + ["--cache-dir", cache_dir, "--num-requests", "4", "--output-len", "4:8",
                              "--policies", "full,fastv,pvtp,st3,hf", "--json-out", str(path)])
    assert rc == 0
    return json.loads(path.read_text())


def _has_transformers() -> bool:
    try:
        from transformers import LlavaForConditionalGeneration  # noqa: F401
        return True
    except Exception:
        return False


def test_every_policy_runs_with_all_fields(report):
    policies = [r["policy"] for r in report["runs"]]
    expected = ["full", "fastv", "pvtp", "st3"] + (["hf"] if _has_transformers() else [])
    assert policies == expected
    for run in report["runs"]:
        missing = [f for f in RUN_FIELDS if f not in run]
        assert not missing, (run["policy"], missing)
        assert run["num_requests"] == 4
        assert run["duration_s"] > 0 and run["output_tok_per_s"] > 0 and run["req_per_s"] > 0
    cfg = report["config"]
    assert cfg["random_weights"] and cfg["output_len"] == [4, 8] and cfg["num_requests"] == 4
    assert "engine_version" in cfg and cfg["torch_threads"] == 1
    assert all("load_avg_1m_start" in run and "load_avg_1m_end" in run for run in report["runs"])


def test_counts_add_up_and_match_across_policies(report):
    runs = report["runs"]
    for run in runs:
        reqs = run["requests"]
        assert len(reqs) == run["num_requests"]
        assert run["output_tokens"] == sum(r["generated_tokens"] for r in reqs) == \
            sum(r["num_token_ids"] for r in reqs) == run["output_token_ids"]
        assert all(4 <= r["generated_tokens"] <= 8 for r in reqs)   # ignore_eos: exactly the drawn length
        assert run["text_input_tokens"] == sum(r["text_prompt_tokens"] for r in reqs)
        assert run["visual_input_tokens"] == sum(r["visual_tokens"] for r in reqs) == 4 * 64
        assert all(r["prompt_tokens"] == r["text_prompt_tokens"] + r["visual_tokens"] for r in reqs)
        assert len(run["visual_tokens_per_layer"]) == 8
    # Same workload for every policy: identical token counts everywhere.
    for key in ("output_tokens", "text_input_tokens", "visual_input_tokens"):
        assert len({run[key] for run in runs}) == 1, key
    full = runs[0]
    assert full["visual_tokens_kept_mean"] == 64 and full["same_tokens_as_full"] == 1.0
    for run in runs[1:4]:
        assert run["visual_tokens_kept_mean"] < 64, run["policy"]   # the pruning policies prune


def test_percentiles_ordered_and_kv_within_pool(report):
    for run in report["runs"]:
        for m in ("ttft", "tpot", "itl", "e2e"):
            p50, p90, p99 = (run[f"{m}_{p}_s"] for p in ("p50", "p90", "p99"))
            assert p50 is not None and 0 <= p50 <= p90 <= p99, (run["policy"], m)
        assert run["ttft_p50_s"] <= run["e2e_p50_s"] + 1e-9
        if run["policy"] == "hf":
            assert run["peak_running"] == 1
            continue
        assert 0 < run["kv_peak_blocks"] <= run["kv_total_blocks"]
        assert run["kv_peak_bytes"] == run["kv_peak_blocks"] * run["kv_bytes_per_block"]
        assert run["timeline"] and all(len(row) == 3 for row in run["timeline"])
        assert all(0 <= row[1] <= run["kv_total_blocks"] for row in run["timeline"])
        assert max(row[2] for row in run["timeline"]) == run["peak_running"] >= 1
        times = [row[0] for row in run["timeline"]]
        assert times == sorted(times)


def test_hf_agrees_with_full(report):
    """Greedy fp32 on the same weights: the transformers baseline must produce the engine's tokens."""
    hf = [r for r in report["runs"] if r["policy"] == "hf"]
    if not hf:
        pytest.skip("transformers not installed")
    assert hf[0]["same_tokens_as_full"] == 1.0


def test_tight_pool_st3_runs_more_at_once(cache_dir, tmp_path):
    path = tmp_path / "tight.json"
    # A tiny request holds ~56 blocks under full (8 layers x 7 blocks): 140 blocks admit two of them.
    rc = bench.main(COMMON + ["--cache-dir", cache_dir, "--num-requests", "6", "--output-len", "6",
                              "--policies", "full,st3", "--num-kv-blocks", "140", "--no-progress",
                              "--json-out", str(path)])
    assert rc == 0
    full, st3 = json.loads(path.read_text())["runs"]
    assert full["kv_total_blocks"] == st3["kv_total_blocks"] == 140
    for run, policy in ((full, Full()), (st3, ST3())):
        budgets = policy.budgets(64, 8)
        for r in run["requests"]:  # each request's KV from the budgets: exact without VTA, bracketed with it
            blocks = lambda extra: sum(-(-(r["text_prompt_tokens"] + g + extra) // 16) for g in budgets)  # noqa
            low, high = blocks(0), blocks(r["generated_tokens"] - 1)
            assert (r["kv_peak_blocks"] == high) if run is full else (low <= r["kv_peak_blocks"] <= high)
        assert run["kv_peak_blocks"] >= max(r["kv_peak_blocks"] for r in run["requests"])
    assert st3["peak_running"] >= full["peak_running"]
    assert st3["peak_running"] > full["peak_running"] or st3["kv_peak_blocks"] < full["kv_peak_blocks"]
    assert full["output_tokens"] == st3["output_tokens"] == 36


def test_image_dir_and_poisson_arrivals(cache_dir, tmp_path):
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(40, 30), (20, 70)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(imgs / f"{i}.png")
    (imgs / "notes.txt").write_text("not an image")
    path = tmp_path / "dir.json"
    rc = bench.main(COMMON + ["--cache-dir", cache_dir, "--num-requests", "3", "--output-len", "2",
                              "--policies", "full", "--image-dir", str(imgs), "--request-rate", "20",
                              "--no-progress", "--json-out", str(path), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["config"]["request_rate"] == 20 and data["config"]["image_dir"] == str(imgs)
    run = data["runs"][0]
    assert run["images"] == 3 and run["output_tokens"] == 6
    assert all(r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] for r in run["requests"])
    assert 0 < run["mean_running"] <= run["peak_running"]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "p.png").stat().st_size > 0
    except ImportError:
        assert not (tmp_path / "p.png").exists()   # a message instead, and the run still succeeded


def test_bad_policy_exits_2_via_subprocess(cache_dir):
    p = subprocess.run([sys.executable, "-m", "tools.bench", "--cache-dir", cache_dir, "--policies", "full,nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--output-len", "8:4"], "--output-len"),
    (["--output-len", "x"], "--output-len"),
    (["--request-rate", "0"], "--request-rate"),
    (["--num-requests", "0"], "--num-requests"),
    (["--model", "/nonexistent/model/dir"], "nonexistent"),
    (["--preset", "tiny", "--image-dir", "/nonexistent/images"], "image-dir"),
    (["--preset", "tiny", "--layer", "99", "--policies", "fastv"], "layer"),
    (["--preset", "tiny", "--anneal-floor", "2", "--policies", "st3"], "anneal_floor"),
    (["--backend", "openai"], "--backend openai needs --url"),
    (["--url", "http://127.0.0.1:9"], "--url only applies with --backend openai"),
    (["--preset", "tiny", "--backend", "openai", "--url", "http://127.0.0.1:9"], "no OpenAI-compatible server"),
    (["--preset", "tiny", "--ratio", "0.5", "--policies", "full"], "--ratio does not apply to policy 'full'"),
    (["--preset", "tiny", "--layer", "1", "--policies", "full,st3,hf"], "--layer does not apply to any of"),
])
def test_bad_arguments_exit_2(cache_dir, capsys, argv, needle):
    assert bench.main(["--cache-dir", cache_dir] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and needle in err[-1]


def test_parse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "no-such-preset"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--request-rate", "fast"])
    assert e.value.code == 2


def test_percentile_matches_numpy_linear():
    rng = random.Random(0)
    np = pytest.importorskip("numpy")
    for n in (1, 2, 3, 7, 50):
        xs = [rng.uniform(-5, 5) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    assert percentile([], 50) is None


def test_len_range():
    assert parse_len_range("64", "x") == (64, 64)
    assert parse_len_range("4:8", "x") == (4, 8)
    for bad in ("0", "8:4", "1:2:3", "a", "-1:3"):
        with pytest.raises(ValueError):
            parse_len_range(bad, "x")


def test_help_says_weights_are_random():
    text = bench.build_parser().format_help()
    assert "RANDOM weights" in text and "cpu-32l" in text and "llava-1.5-7b-4l" in text


@pytest.mark.parametrize("option, path", [("--json-out", "missing-dir/out.json"), ("--plot", "missing-dir/p.png"),
                                          ("--json-out", "."), ("--plot", "")])
def test_output_paths_are_checked_before_the_run(tmp_path, capsys, option, path):
    """A bad --json-out/--plot is one error line before any model is written or run."""
    cache = tmp_path / "cache"
    target = str(tmp_path / path) if path else str(tmp_path)
    assert bench.main(["--cache-dir", str(cache), "--preset", "tiny", option, target]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {option}") and not cache.exists(), err


def test_json_is_not_an_abbreviation_of_json_out(capsys):
    with pytest.raises(SystemExit) as e:   # engine.generate's --json is a flag; here it would take a path
        bench.main(["--json", "out.json"])
    assert e.value.code == 2 and "--json" in capsys.readouterr().err


def test_a_missing_numpy_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)   # safetensors imports it when writing the preset
    assert bench.main(["--cache-dir", str(tmp_path), "--preset", "tiny", "--policies", "full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: writing the random-weight preset needs numpy (pip install -e '.[bench]')", err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_only_on_a_terminal():
    from tools.bench.runner import Progress
    for stream in (io.StringIO(), _Terminal()):
        bar = Progress("st3", 4, stream=stream)
        for done in range(4):
            bar.update(done, 10 * done)
        bar.update(4, 40, "done", force=True)
        bar.close()
        text = stream.getvalue()
        if isinstance(stream, _Terminal):
            assert text.startswith("\r[   st3] 0/4") and "\x1b[K" in text and text.endswith("\n")
        else:   # a pipe or a log: whole lines, the first and the last
            lines = text.splitlines()
            assert "\r" not in text and "\x1b" not in text and len(lines) == 2
            assert lines[0].startswith("[   st3] 0/4") and lines[1].startswith("[   st3] 4/4") and "done" in lines[1]


def test_plot_panels_share_their_scales():
    from tools.bench.report import plot_scales
    runs = [{"kv_total_blocks": 140, "timeline": [[0.0, 120, 2], [1.0, 50, 1]]},
            {"kv_total_blocks": 140, "timeline": [[0.0, 90, 7], [1.0, 160, 3]]},
            {"kv_total_blocks": None, "timeline": []}]
    assert plot_scales(runs) == (160 * 1.05 + 1, 8)


def test_openai_backend_against_engine_serve_matches_in_process(report, cache_dir, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from engine import LLM, AsyncLLM
    from engine.serve import build_app
    from tools.bench.workload import preset_model_dir
    from tools.fixtures.server_thread import ServerThread

    engine = AsyncLLM(LLM(preset_model_dir("tiny", Path(cache_dir)), policy="st3"))
    server = ServerThread(build_app(engine, "bench-tiny"))
    path = tmp_path / "http.json"
    try:
        rc = bench.main(COMMON + ["--cache-dir", cache_dir, "--num-requests", "4", "--output-len", "4:8",
                                  "--backend", "openai", "--url", server.url, "--json-out", str(path), "--no-progress"])
    finally:
        server.stop()
        engine.shutdown()
    assert rc == 0
    http = json.loads(path.read_text())["runs"]
    local = next(r for r in report["runs"] if r["policy"] == "st3")
    assert [r["policy"] for r in http] == ["http-st3"]
    run = http[0]
    for key in ("output_tokens", "visual_input_tokens", "text_input_tokens", "visual_tokens_per_layer"):
        assert run[key] == local[key], key
    assert [q["generated_tokens"] for q in run["requests"]] == [q["generated_tokens"] for q in local["requests"]]
    assert all(q["ttft_s"] > 0 and q["e2e_s"] >= q["ttft_s"] for q in run["requests"])
    assert run["itl_p50_s"] > 0 and run["tpot_p50_s"] > 0


def test_decode_bench_interleaves_engines_on_the_same_requests(tmp_path, monkeypatch, capsys):
    """tools.bench.decode: every engine decodes the same answer, step for step in turn, and reports a ratio
    to the first policy listed."""
    from tools.bench import decode
    monkeypatch.setenv("ST3_CACHE_DIR", str(tmp_path))
    decode.main(["--layers", "4", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                 "--batch", "2", "--policies", "pvtp,st3", "--tokens", "5", "--rounds", "1"])
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("engine")}
    assert set(rows) == {"pvtp", "st3"} and rows["pvtp"][-1] == "1.000"
    engines = {p: decode.LLM(decode.model_dir(decode.argparse.Namespace(
        layers=4, hidden=64, kv_heads=2)), policy=p, max_num_seqs=2) for p in ("pvtp", "st3")}
    params = decode.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    times = decode.interleaved_step_times(engines, decode.image_requests(engines["pvtp"], 2), params)
    assert [len(t) for t in times.values()] == [4, 4]  # 5 tokens: one from the prefill, four decode steps
