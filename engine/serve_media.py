"""Image URLs of chat requests to decoded images: data URIs, http(s) (opt-out), local files (opt-in).

As in vLLM, a server fetches http(s) image URLs unless told not to (--no-fetch-urls), and reads
local files only through file:// URLs under --allowed-local-media-path. Every fetch has a timeout
and a byte cap; every image passes models.image's pixel and aspect-ratio limits before decoding.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from models.image import load_image

from .serve_protocol import APIError


@dataclass
class MediaPolicy:
    fetch_urls: bool = True
    allowed_local_path: Path | None = None
    timeout_s: float = 10.0
    max_bytes: int = 20 << 20


async def load_images(urls: list[str], policy: MediaPolicy) -> list:
    """Decoded RGB images for the URLs (decoding runs in a worker thread, off the event loop)."""
    images = []
    for i, url in enumerate(urls):
        data = await _image_bytes(url, policy)
        try:
            images.append(await asyncio.to_thread(load_image, data))
        except ValueError as e:
            raise APIError(f"image {i}: {str(e).split(': ', 1)[-1]}", "messages") from None
    return images


async def _image_bytes(url: str, policy: MediaPolicy) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_uri(url, policy)
    if scheme in ("http", "https"):
        if not policy.fetch_urls:
            raise APIError("fetching image URLs is disabled on this server (--no-fetch-urls); send the image as a "
                           "base64 data URI (data:image/png;base64,...)", "messages")
        return await _fetch(url, policy)
    if scheme == "file":
        return _local_file(url, policy)
    raise APIError(f"unsupported image URL {url[:40]!r}: use a data:image/...;base64 URI"
                   f"{', an http(s) URL' if policy.fetch_urls else ''}"
                   f"{' or a file:// URL' if policy.allowed_local_path else ''}", "messages")


def _data_uri(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError("image data URI must look like data:image/png;base64,<data>", "messages")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise APIError(f"image data is over the {policy.max_bytes:,}-byte limit", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError("image data URI is not valid base64", "messages") from None


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    import httpx  # the serve extra
    try:
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise APIError(f"fetching image {url[:80]!r} gave HTTP {r.status_code}", "messages")
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise APIError(f"image at {url[:80]!r} is over the {policy.max_bytes:,}-byte limit",
                                       "messages")
                return bytes(data)
    except httpx.TimeoutException:
        raise APIError(f"fetching image {url[:80]!r} timed out after {policy.timeout_s:g} s", "messages") from None
    except httpx.HTTPError as e:
        raise APIError(f"cannot fetch image {url[:80]!r}: {type(e).__name__}", "messages") from None


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise APIError("local files are not served; start the server with --allowed-local-media-path DIR to allow "
                       "file:// URLs under DIR", "messages")
    parsed = urlparse(url)
    path = Path(unquote(parsed.path)).resolve()
    root = policy.allowed_local_path.resolve()
    if parsed.netloc not in ("", "localhost") or not path.is_relative_to(root):
        raise APIError(f"file {str(path)!r} is outside --allowed-local-media-path {str(root)!r}", "messages")
    if not path.is_file():
        raise APIError(f"file {str(path)!r} not found", "messages")
    if path.stat().st_size > policy.max_bytes:
        raise APIError(f"file {str(path)!r} is over the {policy.max_bytes:,}-byte limit", "messages")
    return path.read_bytes()
