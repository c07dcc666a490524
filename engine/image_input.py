"""Every image kind a request may carry, turned into a PIL image for models/image.py.

Accepted: a path (str or pathlib.Path, `file://` URLs too), raw bytes, a PIL image, a numpy HWC
uint8 array, a torch CHW tensor (uint8, or float in [0, 1]) and a `data:` URI. Each wrong kind gets
its own one-line error, and no message ever embeds a long payload (a data URI is megabytes).
"""
from __future__ import annotations

import base64
import binascii
import ctypes
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

import torch
from PIL import Image

from models.image import ImageError, load_image

KINDS = "a path, bytes, a PIL image, a numpy HWC uint8 array, a torch CHW tensor or a data: URI"


def short(text: str, keep: int = 60) -> str:
    """text, or its head and length when it is too long to quote in a one-line error."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}... ({len(text)} characters)"


def load_any_image(src) -> Image.Image:
    """An RGB PIL image from any accepted kind; anything else raises a one-line ImageError."""
    if isinstance(src, str):
        if src.startswith("data:"):
            return load_image(_data_uri_bytes(src))
        if src.startswith(("http://", "https://")):
            raise ImageError(f"image URL {short(src)}: remote images are not fetched (the engine never uses "
                             "the network); download it and pass the file's path, bytes or a data: URI")
        path = unquote(src[len("file://"):]) if src.startswith("file://") else src
        try:
            found = Path(path).is_file()
        except (OSError, ValueError):  # a name too long for the OS, or with a NUL byte
            found = False
        if not found:
            raise ImageError(f"image file not found: {short(path)}")
        return load_image(path)
    if isinstance(src, (Path, bytes, bytearray, memoryview, Image.Image)):
        return load_image(src)
    if isinstance(src, torch.Tensor):
        return load_image(_tensor_image(src))
    if type(src).__module__ == "numpy" and type(src).__name__ == "ndarray":
        return load_image(_numpy_image(src))
    if isinstance(src, (list, tuple)):
        raise ImageError(f"an image must be one image, got a {type(src).__name__}; give several images as "
                         "'images': [...] or multi_modal_data={'image': [...]}")
    raise ImageError(f"an image must be {KINDS}; got {type(src).__name__}")


def _data_uri_bytes(uri: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError(f"data URI {short(uri, 40)}: no ',' between the media type and the data")
    media, *params = head[len("data:"):].split(";")
    if media and not media.lower().startswith("image/"):
        raise ImageError(f"data URI: media type {short(media, 40)} is not an image type (image/png, image/jpeg, ...)")
    if "base64" not in (p.lower() for p in params):
        return unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"data URI ({media or 'no media type'}, {len(payload)} characters): the base64 data "
                         "is not valid") from None


def _numpy_image(arr) -> Image.Image:
    if arr.dtype.name != "uint8":
        raise ImageError(f"a numpy image must have dtype uint8 (0..255), got {arr.dtype.name}; "
                         "convert with (x * 255).round().astype('uint8') for values in [0, 1]")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or arr.ndim == 3 and arr.shape[2] in (3, 4)):
        raise ImageError(f"a numpy image must be HxWxC with C = 1, 3 or 4 (or HxW), got shape {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise ImageError(f"image has zero size {arr.shape[1]}x{arr.shape[0]}")
    return Image.fromarray(arr.copy(order="C"))


def _tensor_image(x: torch.Tensor) -> Image.Image:
    if x.dim() == 4:
        raise ImageError(f"a tensor image must be one CxHxW image, got a batch of shape {tuple(x.shape)}; "
                         "pass its images separately")
    if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
        raise ImageError(f"a tensor image must be CxHxW with C = 1, 3 or 4, got shape {tuple(x.shape)}")
    c, h, w = x.shape
    if h == 0 or w == 0:
        raise ImageError(f"image has zero size {w}x{h}")
    x = x.detach().cpu()
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise ImageError("a float tensor image must hold values in [0, 1] (no NaN or inf); "
                             "use a uint8 tensor for 0..255")
        x = (x.float() * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise ImageError(f"a tensor image must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    hwc = x.permute(1, 2, 0).contiguous()
    # Raw bytes straight from the tensor's memory: torch does not require numpy.
    raw = ctypes.string_at(hwc.data_ptr(), hwc.numel())
    return Image.frombytes({1: "L", 3: "RGB", 4: "RGBA"}[c], (w, h), raw)
