"""A checkpoint directory's weight files, and the tensors in them: safetensors, else PyTorch .bin pickles.

.bin files are read with torch.load(weights_only=True), whose unpickler builds nothing but tensors and
plain containers, so a file that names any other object is refused rather than executed; every value
must then be a tensor. mmap=True leaves a multi-GB shard on disk until each tensor is copied in.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint with missing files, missing or unexpected tensors, or wrong shapes."""


# (index file, the files to take when there is no index), in order of preference.
FORMATS = [("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model*.bin")]


def _from_index(index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid weight index ({e})") from None
    files = [index.parent / n for n in names]
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard named in {index.name} is missing")
    return files


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: safetensors (by index, else every *.safetensors), else pytorch_model*.bin."""
    for index, pattern in FORMATS:
        if (model_dir / index).exists():
            return _from_index(model_dir / index)
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights found")


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    # mmap needs the zip format torch.save has written since 1.6; older files are read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError / EOFError / ...
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and m:
            raise CheckpointError(f"{path}: refused: the pickle asks for {m.group(1)!r}, an object other than "
                                  "tensors (only tensor weights are read from .bin files)") from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e)) or re.match(r"\s*(.+)", str(e))
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint "
                              f"({why.group(1).strip() if why else type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a dict of tensors")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def iter_tensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, read) for every tensor in one weight file; `read` fetches the tensor only when called."""
    if path.suffix != ".safetensors":
        for k, t in _read_bin(path).items():
            yield k, (lambda t=t: t)
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    with handle as f:
        for k in f.keys():
            yield k, (lambda k=k: f.get_tensor(k))
