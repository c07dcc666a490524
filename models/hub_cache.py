"""Model ids ("org/name") -> a snapshot directory in the local Hugging Face cache, with no network.

The cache layout huggingface_hub writes:
  <cache>/models--org--name/refs/<revision>     a text file holding the commit hash the revision points at
  <cache>/models--org--name/snapshots/<commit>/ the files of that commit (symlinks into blobs/)
A revision that is itself a 40-hex commit hash names its snapshot directly.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .config import ConfigError

# huggingface_hub's repo-id rule, simplified: optional "org/", then a name; no path-like pieces.
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cache_dirs() -> list[Path]:
    """Where huggingface_hub may have put its cache, most specific first: HF_HUB_CACHE, HF_HOME/hub, default."""
    env = os.environ
    dirs = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE"),
            env.get("HF_HOME") and os.path.join(env["HF_HOME"], "hub"),
            env.get("XDG_CACHE_HOME") and os.path.join(env["XDG_CACHE_HOME"], "huggingface", "hub"),
            os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")]
    out: list[Path] = []
    for d in dirs:
        if d and Path(d).expanduser() not in out:
            out.append(Path(d).expanduser())
    return out


def is_repo_id(name: str) -> bool:
    """True for strings shaped like a hub id ("org/name" or "name"), never for paths like "./x" or "/x"."""
    return bool(REPO_ID.match(name)) and ".." not in name and "--" not in name


def find_snapshot(repo_id: str, revision: str | None = None) -> tuple[Path | None, list[str]]:
    """(snapshot dir or None, the places looked at) for `repo_id` at `revision` (default "main")."""
    rev = revision or "main"
    if rev.startswith("/") or ".." in rev.split("/"):
        raise ConfigError(f"revision {rev!r} is not a valid revision name")
    looked = []
    for cache in cache_dirs():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        if COMMIT.match(rev):
            snap = repo / "snapshots" / rev
        else:
            ref = repo / "refs" / rev
            if not ref.is_file():
                looked.append(str(ref))
                continue
            snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap, looked
        looked.append(str(snap))
    return None, looked


def resolve_model_path(model: str | Path, revision: str | None = None) -> Path:
    """A local directory as given, else the cached snapshot of hub id `model`; ConfigError says where it looked."""
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if not is_repo_id(name):
        raise ConfigError(f"{name}: model directory not found")
    snap, looked = find_snapshot(name, revision)
    if snap is None:
        at = f" at revision {revision!r}" if revision else ""
        raise ConfigError(f"{name}: model directory not found, and no local Hugging Face cache snapshot of "
                          f"{name!r}{at} (looked for {', '.join(looked)}); the engine does not download: "
                          f"fetch it first, e.g. `huggingface-cli download {name}`")
    return snap
