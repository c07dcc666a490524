"""Model ids resolve to snapshots of a local Hugging Face cache (a fake cache tree here), never the network."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.generate import main as generate_main
from models.config import load_config
from models.hub_cache import cache_dirs, resolve_model_path
from models.loader import load_model
from tools.fixtures.make_tiny_model import make_tiny_model

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_src")
    return {"main": make_tiny_model(root / "main", text_layers=1, vision_layers=2, seed=0),
            "v1": make_tiny_model(root / "v1", text_layers=1, vision_layers=2, seed=1)}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No HF variables set and HOME in tmp_path, so only the caches a test builds exist."""
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def fake_repo(cache, repo_id, snapshots: dict, refs: dict):
    """models--org--name/{refs/<name> -> commit, snapshots/<commit>/...} as huggingface_hub lays it out."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, src in snapshots.items():
        shutil.copytree(src, repo / "snapshots" / commit)
    for name, commit in refs.items():
        (repo / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit + "\n")  # huggingface_hub writes no newline; tolerate one
    return repo


def test_refs_main_and_revisions(env, tmp_path, tiny):
    cache = tmp_path / "hub"
    env.setenv("HF_HUB_CACHE", str(cache))
    repo = fake_repo(cache, "org/name", {MAIN: tiny["main"], V1: tiny["v1"]}, {"main": MAIN, "v1.0": V1})
    assert resolve_model_path("org/name") == repo / "snapshots" / MAIN
    assert resolve_model_path("org/name", revision="v1.0") == repo / "snapshots" / V1
    assert resolve_model_path("org/name", revision=V1) == repo / "snapshots" / V1  # a commit names its snapshot
    with pytest.raises(ValueError, match="no local Hugging Face cache snapshot of 'org/name' at revision 'dev'"):
        resolve_model_path("org/name", revision="dev")


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "default"])
def test_every_cache_location(env, tmp_path, tiny, where):
    base = tmp_path / where
    cache = {"HF_HUB_CACHE": base, "HF_HOME": base / "hub", "XDG_CACHE_HOME": base / "huggingface" / "hub",
             "default": tmp_path / "home" / ".cache" / "huggingface" / "hub"}[where]
    if where != "default":
        env.setenv(where, str(base))
    assert cache in cache_dirs()
    fake_repo(cache, "llava-hf/tiny", {MAIN: tiny["main"]}, {"main": MAIN})
    assert resolve_model_path("llava-hf/tiny") == cache / "models--llava-hf--tiny" / "snapshots" / MAIN


def test_not_found_lists_where_it_looked(env, tmp_path):
    env.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    env.setenv("HF_HOME", str(tmp_path / "b"))
    with pytest.raises(ValueError) as e:
        resolve_model_path("org/missing")
    msg = str(e.value)
    assert "model directory not found" in msg and "\n" not in msg
    for d in (tmp_path / "a", tmp_path / "b" / "hub", tmp_path / "home" / ".cache" / "huggingface" / "hub"):
        assert str(d / "models--org--missing" / "refs" / "main") in msg
    # A snapshot named by a ref but absent is reported as that snapshot path.
    repo = tmp_path / "a" / "models--org--missing"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    with pytest.raises(ValueError, match=str(repo / "snapshots" / MAIN)):
        resolve_model_path("org/missing")


@pytest.mark.parametrize("name", ["./org/name", "/abs/org/name", "a/b/c", "../x"])
def test_paths_are_not_hub_ids(env, name):
    with pytest.raises(ValueError, match="model directory not found$"):
        resolve_model_path(name)


def test_bad_revision(env):
    with pytest.raises(ValueError, match="not a valid revision"):
        resolve_model_path("org/name", revision="../../etc")


def test_local_directory_wins(env, tiny):
    assert resolve_model_path(tiny["main"]) == tiny["main"]
    assert resolve_model_path(str(tiny["main"]), revision="ignored") == tiny["main"]


def test_llm_and_cli_load_a_hub_id(env, tmp_path, tiny, capsys):
    cache = tmp_path / "hub"
    env.setenv("HF_HUB_CACHE", str(cache))
    fake_repo(cache, "org/tiny", {MAIN: tiny["main"], V1: tiny["v1"]}, {"main": MAIN})
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    want = {rev: LLM(tiny[rev], num_kv_blocks=64).generate("hello there", params)[0].token_ids for rev in tiny}
    assert want["main"] != want["v1"]  # the two snapshots really differ
    assert LLM("org/tiny", num_kv_blocks=64).generate("hello there", params)[0].token_ids == want["main"]
    got = LLM("org/tiny", revision=V1, num_kv_blocks=64).generate("hello there", params)[0].token_ids
    assert got == want["v1"]
    for rev in ("main", V1):
        assert generate_main(["--model", "org/tiny", "--revision", rev, "--prompt", "hello there", "--raw-prompt",
                              "--max-tokens", "4", "--temperature", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"][:4] == want["main" if rev == "main" else "v1"]
    assert generate_main(["--model", "org/absent", "--prompt", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: org/absent: model directory not found") and err.count("\n") == 1
    assert "models--org--absent" in err


def test_original_llava_clip_tower_from_the_cache(env, tmp_path):
    """Released original-LLaVA configs name their CLIP by hub id (openai/clip-vit-large-patch14-336)."""
    src = make_tiny_model(tmp_path / "orig", layout="original", text_layers=1, vision_layers=2)
    ref = load_model(src)
    cache = tmp_path / "hub"
    env.setenv("HF_HUB_CACHE", str(cache))
    fake_repo(cache, "openai/clip-tiny", {MAIN: src / "clip-vision"}, {"main": MAIN})
    shutil.rmtree(src / "clip-vision")
    cfg = (src / "config.json").read_text().replace('"clip-vision"', '"openai/clip-tiny"')
    (src / "config.json").write_text(cfg)
    assert load_config(src).vision_tower_path == str(cache / "models--openai--clip-tiny" / "snapshots" / MAIN)
    ours = load_model(src).state_dict()
    assert all(torch.equal(t, ours[k]) for k, t in ref.state_dict().items())


def test_server_serves_a_cached_hub_id_at_a_revision_under_that_id(env, tmp_path, tiny):
    """engine.serve takes the same model ids and engine flags as engine.generate; a hub id is the served name."""
    pytest.importorskip("fastapi")
    from engine.serve import build_parser, make_server
    cache = tmp_path / "hub"
    env.setenv("HF_HUB_CACHE", str(cache))
    fake_repo(cache, "org/name", {MAIN: tiny["main"], V1: tiny["v1"]}, {"main": MAIN, "v1.0": V1})
    args = build_parser().parse_args(["--model", "org/name", "--revision", "v1.0",
                                      "--max-images-per-prompt", "2", "--enforce-eager", "--seed", "7",
                                      "--max-num-batched-tokens", "4096", "--num-kv-blocks", "64"])
    engine, _, name = make_server(args)
    try:
        llm = engine.llm
        assert name == "org/name" and llm.model_dir.name == V1
        assert (llm.config.max_num_batched_tokens, llm.config.enforce_eager) == (4096, True)
        assert llm.max_visual == 2 * llm.model_config.image_seq_length
    finally:
        engine.shutdown()
