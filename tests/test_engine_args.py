"""LLM(dtype=..., device=...): "auto", torch.dtype objects, and one-line errors for devices this machine lacks."""
from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, EngineError
from engine.config import EngineConfig, auto_dtype
from engine.errors import ArgumentError
from engine.generate import main as generate_main
from models.config import load_config
from tools.fixtures.make_tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def half_ckpt(tmp_path_factory):
    """A checkpoint saved in float16 (config.json says so, as llava-hf's do)."""
    return make_tiny_model(tmp_path_factory.mktemp("args") / "fp16", text_layers=1, vision_layers=2, dtype="float16")


@pytest.mark.parametrize("given, name", [
    (torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.half, "float16"),
    ("torch.bfloat16", "bfloat16"), ("fp16", "float16"), ("bf16", "bfloat16"), ("auto", "auto")])
def test_dtype_spellings(given, name):
    assert EngineConfig(dtype=given).dtype == name


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "float64", "int4", None, 16])
def test_bad_dtype(bad):
    with pytest.raises(ArgumentError, match="dtype") as e:
        EngineConfig(dtype=bad)
    assert isinstance(e.value, ValueError) and isinstance(e.value, EngineError) and "\n" not in str(e.value)


def test_auto_dtype_rule():
    # On a GPU: what the checkpoint was saved in.
    assert [auto_dtype(d, "cuda") for d in ("float16", "bfloat16", "float32", None, "float64", "torch.float16")] \
        == ["float16", "bfloat16", "float32", "float32", "float32", "float16"]
    # On CPU: half types run in fp32 (measured slower here; docs/checkpoints.md).
    assert [auto_dtype(d, "cpu") for d in ("float16", "bfloat16", "float32", None)] == ["float32"] * 4


def test_checkpoint_dtype_read_from_config(half_ckpt, tmp_path):
    assert load_config(half_ckpt).checkpoint_dtype == "float16"
    cfg = json.loads((half_ckpt / "config.json").read_text())
    cfg.pop("torch_dtype")
    cfg["dtype"] = "bfloat16"  # transformers 5 writes `dtype`
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path).checkpoint_dtype == "bfloat16"
    del cfg["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path).checkpoint_dtype is None


def test_llm_dtype_auto_and_torch_dtype(half_ckpt):
    auto = LLM(half_ckpt, dtype="auto", num_kv_blocks=32)
    want = torch.float32  # on CPU, auto keeps half-precision checkpoints in fp32
    assert auto.config.dtype == "float32"
    assert {p.dtype for p in auto.model.parameters()} == {want} and auto.cache.pool.k.dtype == want
    bf16 = LLM(half_ckpt, dtype=torch.bfloat16, num_kv_blocks=32)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.cache.pool.k.dtype == torch.bfloat16


def test_device_spellings():
    assert EngineConfig(device=torch.device("cpu")).device == "cpu"
    assert EngineConfig(device="cpu").torch_device == torch.device("cpu")


def _missing_backend_cases():
    cases = []
    if not torch.backends.mps.is_available():
        cases.append(("mps", "MPS backend is not available"))
    if not torch.cuda.is_available():
        cases += [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available")]
    else:
        cases.append((f"cuda:{torch.cuda.device_count()}", "CUDA device"))
    return cases


@pytest.mark.parametrize("device, needle", _missing_backend_cases() + [
    ("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"), ("xpu", "not supported"),
    ("meta", "not supported")])
def test_bad_device_is_one_line(device, needle):
    with pytest.raises(ArgumentError, match=needle) as e:
        EngineConfig(device=device)
    assert "\n" not in str(e.value) and repr(device) in str(e.value)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_backend_fails_before_loading(half_ckpt, capsys):
    with pytest.raises(ArgumentError, match="MPS"):
        LLM(half_ckpt / "does-not-matter", device="mps")
    assert generate_main(["--model", str(half_ckpt), "--device", "mps", "--prompt", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'mps' asked for") and err.count("\n") == 1
