"""`python -m engine.generate`: streamed answers, --json, per-layer stats, and one-line errors (exit 2).

Every CLI run is a real subprocess. They are all started at once by one module fixture (torch's import
dominates each run), and the tests then check their results.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from models.tokenizer import Tokenizer
from tools.fixtures.make_tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
N0 = 16  # visual tokens of the tiny model: (32 / 8) ** 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = make_tiny_model(tmp / "model", preset="tiny", text_layers=4, image_size=32)
    png = tmp / "cat.png"
    Image.effect_noise((48, 40), 64).convert("RGB").save(png)
    truncated = tmp / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return {"model": str(model), "png": str(png), "truncated": str(truncated), "missing": str(tmp / "nope.png"),
            "no_model": str(tmp / "no-model"), "cache": str(tmp / "cache")}


def _cases(f):
    base = ["--model", f["model"], "--image", f["png"], "--prompt", "What is shown?"]
    return {
        "stream": base + ["--max-tokens", "8"],
        "json": base + ["--max-tokens", "7", "--json"],
        "st3": base + ["--max-tokens", "6", "--policy", "st3", "--anneal-steps", "2"],
        "default": ["--prompt", "hi", "--max-tokens", "3"],
        "bad_model_dir": ["--model", f["no_model"], "--image", f["png"], "--prompt", "q"],
        "bad_missing_image": ["--model", f["model"], "--image", f["missing"], "--prompt", "q"],
        "bad_truncated_png": ["--model", f["model"], "--image", f["truncated"], "--prompt", "q"],
        "bad_temperature": base + ["--temperature", "-1"],
        "bad_top_p": base + ["--top-p", "0"],
        "bad_policy": base + ["--policy", "nope"],
        "bad_raw_prompt": base + ["--raw-prompt"],
        # Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape).
        "bad_non_utf8_prompt": ["--model", f["model"], "--image", f["png"], "--prompt", b"caf\xe9?"],
        "bad_huge_seed": base + ["--seed", str(2 ** 70)],
    }


@pytest.fixture(scope="module")
def runs(files):
    env = {**os.environ, "ST3_CACHE_DIR": files["cache"], "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(args):
        return subprocess.run([sys.executable, "-m", "engine.generate", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    cases = _cases(files)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(cases, pool.map(run, cases.values())))


def _stats(stderr: str) -> dict:
    line = [ln for ln in stderr.splitlines() if ln.startswith("stats:")]
    assert len(line) == 1, stderr
    m = re.search(r"stats: (\d+) tokens generated \| prompt (\d+) tokens \((\d+) visual\) .*"
                  r"kv blocks peak (\d+) final (\d+) \| visual/layer ([\d,]+|-) \| policy (\w+)", line[0])
    assert m, line[0]
    layers = [] if m[6] == "-" else [int(x) for x in m[6].split(",")]
    return {"generated": int(m[1]), "prompt": int(m[2]), "visual": int(m[3]), "peak": int(m[4]),
            "final": int(m[5]), "layers": layers, "policy": m[7]}


def test_streamed_answer_and_stats_line(runs):
    r = runs["stream"]
    assert r.returncode == 0, r.stderr
    s = _stats(r.stderr)
    assert 0 < s["generated"] <= 8 and s["visual"] == N0 and s["prompt"] > N0
    assert s["layers"] == [N0] * 4 and s["policy"] == "full" and s["peak"] >= s["final"] > 0
    assert "ttft" in r.stderr and "tok/s" in r.stderr and "Traceback" not in r.stderr


def test_json_output(runs, files):
    r = runs["json"]
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole of stdout is one object
    assert set(out) == {"text", "token_ids", "finish_reason", "stats"}
    assert 0 < len(out["token_ids"]) <= 7 and out["finish_reason"] in ("length", "stop")
    tok = Tokenizer.from_dir(files["model"])  # lm_head rows past the tokenizer's vocabulary have no text
    assert out["text"] == tok.decode([i for i in out["token_ids"] if i < tok.vocab_size])
    assert out["stats"]["visual_tokens"] == N0 and out["stats"]["generated_tokens"] == len(out["token_ids"])
    assert r.stderr == ""


def test_st3_reports_per_layer_visual_tokens(runs):
    r = runs["st3"]
    assert r.returncode == 0, r.stderr
    s = _stats(r.stderr)
    assert s["policy"] == "st3" and len(s["layers"]) == 4
    assert s["layers"][:2] == [N0, N0] and s["layers"][2] < N0  # pruned at layer 2, then annealed


def test_default_model_is_the_shipped_demo_model(runs):
    r = runs["default"]
    assert r.returncode == 0, r.stderr
    assert "easy-vqa demo model" in r.stderr.lower()
    s = _stats(r.stderr)
    assert 0 < s["generated"] <= 3 and s["visual"] == 0


@pytest.mark.parametrize("case, message", [
    ("bad_model_dir", "model directory not found"), ("bad_missing_image", "image file not found"),
    ("bad_truncated_png", "truncated"), ("bad_temperature", "temperature"), ("bad_top_p", "top_p"),
    ("bad_policy", "unknown policy 'nope'"), ("bad_raw_prompt", "0 <image> tag(s) but 1 image(s)"),
    ("bad_non_utf8_prompt", "'prompt' is not valid Unicode"), ("bad_huge_seed", "seed must be an integer in [0, 2**63)")])
def test_bad_input_is_one_error_line(runs, case, message):
    r = runs[case]
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("extra, message", [
    (["--policy", "st3", "--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["--anneal-steps", "3"], "--anneal-steps does not apply to policy 'full'"),
    (["--policy", "fastv", "--layer", "9"], "fastv layer 9"),
    (["--num-kv-blocks", "4"], "KV blocks"),
    (["--dtype", "float7"], "dtype"),
    (["--max-tokens", "many"], "argument --max-tokens: invalid int value"),  # argparse's own errors, one line
    (["--stride"], "expected one argument")])
def test_more_bad_input_in_process(files, capsys, extra, message):
    from engine.generate import main  # same code path as the subprocess runs, without a new interpreter

    code = main(["--model", files["model"], "--image", files["png"], "--prompt", "q", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
