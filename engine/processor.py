"""Turns a request into model inputs: checked prompt ids with `<image>` expanded, and pixels.

A request is a prompt string, or a dict: {"prompt": str} or vLLM's {"prompt_token_ids": [...]}, with
images as "image", "images" or vLLM's "multi_modal_data": {"image": one or a list}.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from models.config import LlavaConfig
from models.image import ImageProcessorConfig, preprocess
from models.tokenizer import Tokenizer

from .errors import RequestError
from .image_input import load_any_image, short

IMAGE_TAG = "<image>"
REQUEST_FIELDS = {"prompt", "prompt_token_ids", "image", "images", "multi_modal_data"}


@dataclass
class ProcessedRequest:
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    num_visual: int
    prompt: str | None = None  # None for a request given as prompt_token_ids


def check_unicode(text: str, field: str) -> None:
    """RequestError unless text is valid Unicode (a lone surrogate, e.g. from undecodable bytes, is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"request {field!r} is not valid Unicode: {text[e.start:e.end]!r} at position {e.start} "
                           "(a lone surrogate, e.g. from bytes that are not UTF-8)") from None


class InputProcessor:
    def __init__(self, cfg: LlavaConfig, tokenizer: Tokenizer, image_cfg: ImageProcessorConfig, max_model_len: int):
        self.cfg, self.tokenizer, self.image_cfg, self.max_model_len = cfg, tokenizer, image_cfg, max_model_len

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids with one image-token id per `<image>` (not yet expanded)."""
        image_id = self.cfg.image_token_index
        if self.tokenizer.image_token_id is not None:
            ids = self.tokenizer.encode(prompt)
            return [image_id if t == self.tokenizer.image_token_id else t for t in ids]
        # Original LLaVA tokenizers have no <image> token: split on the tag and splice the id in,
        # dropping the BOS of every chunk after the first, as LLaVA's tokenizer_image_token does.
        chunks = [self.tokenizer.encode(c) for c in prompt.split(IMAGE_TAG)]
        bos = self.tokenizer.bos_token_id
        ids = chunks[0]
        for c in chunks[1:]:
            ids = ids + [image_id] + (c[1:] if c and c[0] == bos else c)
        return ids

    def process(self, request) -> ProcessedRequest:
        """Validate and convert one request; every problem is a RequestError naming it."""
        if isinstance(request, str):
            request = {"prompt": request}
        if not isinstance(request, dict):
            raise RequestError(f"a request must be a dict with 'prompt' (and 'image'), got {type(request).__name__}")
        unknown = set(request) - REQUEST_FIELDS
        if unknown:
            raise RequestError(f"unknown request field(s) {sorted(unknown)}; expected 'prompt' or 'prompt_token_ids', "
                               "and 'image', 'images' or 'multi_modal_data'")
        images = request_images(request)
        prompt, expanded_already = request.get("prompt"), False
        if "prompt_token_ids" in request:
            if "prompt" in request:
                raise RequestError("give either 'prompt' or 'prompt_token_ids', not both")
            ids, expanded_already = self.check_token_ids(request["prompt_token_ids"], len(images))
        elif not isinstance(prompt, str) or not prompt:
            raise RequestError("request 'prompt' must be a non-empty string")
        elif prompt.count(IMAGE_TAG) != len(images):
            raise RequestError(f"prompt has {prompt.count(IMAGE_TAG)} <image> tag(s) but {len(images)} image(s) were "
                               "given; put exactly one <image> in the prompt per image")
        if prompt is not None:
            check_unicode(prompt, "prompt")
        try:
            pixels = [preprocess(load_any_image(img), self.image_cfg) for img in images]
        except ValueError as e:
            raise RequestError(str(e)) from None
        if prompt is not None:
            ids = self.encode_prompt(prompt)
        per_image = self.cfg.image_seq_length
        expanded: list[int] = list(ids) if expanded_already else []
        for t in ([] if expanded_already else ids):
            expanded.extend([t] * per_image if t == self.cfg.image_token_index else [t])
        vocab = self.cfg.text.vocab_size
        bad = [t for t in ids if t != self.cfg.image_token_index and not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt encodes to token id {bad[0]}, outside the model's vocabulary of {vocab}")
        if len(expanded) >= self.max_model_len:
            raise RequestError(f"prompt is {len(expanded)} tokens ({len(images)} image(s) x {per_image} visual "
                               f"tokens included), the model's context is {self.max_model_len}")
        return ProcessedRequest(expanded, torch.stack(pixels) if pixels else None, len(images) * per_image, prompt)

    def check_token_ids(self, ids, num_images: int) -> tuple[list[int], bool]:
        """vLLM-style prompt_token_ids as ints, and whether their image ids are already expanded."""
        if not isinstance(ids, (list, tuple)) or not ids:
            raise RequestError(f"'prompt_token_ids' must be a non-empty list of ints, got {short(repr(ids))}")
        out = []
        for t in ids:
            try:  # operator.index takes numpy/torch integer scalars, not floats or strings
                out.append(operator.index(t) if not isinstance(t, bool) else operator.index(None))
            except TypeError:
                raise RequestError(f"'prompt_token_ids' must hold only ints, got {type(t).__name__}") from None
        ids = out
        image_id, per_image = self.cfg.image_token_index, self.cfg.image_seq_length
        count = ids.count(image_id)
        if count == num_images:
            return ids, False
        if num_images and count == num_images * per_image:
            return ids, True  # one id per visual token already, as vLLM's prompt_token_ids show them
        raise RequestError(f"'prompt_token_ids' hold {count} image token id(s) ({image_id}) but {num_images} image(s) "
                           f"were given; put one {image_id} per image (or {per_image} per image, expanded)")


def request_images(request: dict) -> list:
    """The request's images from 'image', 'images' or vLLM's multi_modal_data={'image': one or a list}."""
    mm = request.get("multi_modal_data")
    if mm is not None:
        if request.get("image") is not None or request.get("images") is not None:
            raise RequestError("give images either in 'multi_modal_data' or as 'image'/'images', not both")
        if not isinstance(mm, dict):
            raise RequestError(f"'multi_modal_data' must be a dict like {{'image': ...}}, got {type(mm).__name__}")
        other = sorted(set(mm) - {"image"})
        if other:
            raise RequestError(f"multi_modal_data: unsupported modality {short(str(other[0]))}; only 'image' is "
                               "supported")
        images = mm.get("image")
        return list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
    images = request.get("images")
    if images is None:
        return [] if request.get("image") is None else [request["image"]]
    if "image" in request:
        raise RequestError("give either 'image' or 'images', not both")
    if not isinstance(images, (list, tuple)):
        raise RequestError(f"'images' must be a list of images, got {type(images).__name__}; use 'image' for one")
    return list(images)
