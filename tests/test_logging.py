"""The engine reports through the `st3` logger and prints nothing itself."""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tools.fixtures.make_tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["engine", "models", "scheduler", "cache"]
CLIS = {"engine/generate.py", "engine/serve.py"}  # command-line front ends: printing is their job


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("log") / "m", text_layers=2, vision_layers=2)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "st3"]


def test_startup_logs_pool_and_backend(model, caplog):
    caplog.set_level(logging.INFO, logger="st3")
    llm = LLM(model, num_kv_blocks=48, block_size=8)
    msgs = _messages(caplog)
    pool = llm.cache.pool
    mib = (pool.k.nbytes + pool.v.nbytes) / 2**20
    assert f"KV pool: 48 blocks of 8 tokens, {mib:.1f} MiB, float32 on cpu" in msgs
    assert "decode attention: gather + SDPA" in msgs  # the Triton kernel is CUDA-only
    assert not any(m.startswith("captured") for m in msgs)  # nothing is captured on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_capture_time_logged(model, caplog):
    caplog.set_level(logging.INFO, logger="st3")
    LLM(model, device="cuda", num_kv_blocks=48, max_num_seqs=2)
    assert any(m.startswith("captured ") and "decode graphs in" in m for m in _messages(caplog))


def test_preemptions_logged(model, caplog):
    caplog.set_level(logging.INFO, logger="st3")
    big = LLM(model, num_kv_blocks=256, block_size=4)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = ["describe a long story", "another request here", "and a third one"]
    need = max(big.cache.blocks_for([len(big.processor.process(p).prompt_ids) + 39] * 2) for p in prompts)
    small = LLM(model, num_kv_blocks=need + 2, block_size=4)
    caplog.clear()
    outs = small.generate(prompts, params)
    preempted = [m for m in _messages(caplog) if m.startswith("preempted request")]
    assert len(preempted) == sum(o.stats["preemptions"] for o in outs) > 0


def test_library_prints_nothing(model, capsys):
    """Except generate()'s tqdm bar over a list, which vLLM shows too and use_tqdm=False turns off."""
    llm = LLM(model, num_kv_blocks=64)
    llm.generate(["hello", "hi there"], SamplingParams(max_tokens=3), use_tqdm=False)
    llm.generate("hello", SamplingParams(max_tokens=3))
    for _ in llm.stream("hello", SamplingParams(max_tokens=2)):
        pass
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_no_print_calls_outside_clis():
    found = []
    for pkg in LIBRARY:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in CLIS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    found.append(f"{rel}:{node.lineno}")
    assert found == []


def test_null_handler_installed():
    import engine  # noqa: F401  (installs it)
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("st3").handlers)


def test_cli_verbose_shows_the_log(model, capsys):
    from engine.generate import main
    log = logging.getLogger("st3")
    before, level = list(log.handlers), log.level
    try:
        assert main(["--model", str(model), "--prompt", "hi", "--raw-prompt", "--max-tokens", "2", "-v"]) == 0
    finally:
        log.handlers, log.level = before, level
    err = capsys.readouterr().err
    assert "st3: KV pool: " in err and "st3: decode attention: gather + SDPA" in err
