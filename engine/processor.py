"""Turns a request dict into model inputs: checked prompt ids with `<image>` expanded, and pixels."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import LlavaConfig
from models.image import ImageProcessorConfig, load_image, preprocess
from models.tokenizer import Tokenizer

from .errors import RequestError

IMAGE_TAG = "<image>"


@dataclass
class ProcessedRequest:
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    num_visual: int


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
        unknown = set(request) - {"prompt", "image", "images"}
        if unknown:
            raise RequestError(f"unknown request field(s) {sorted(unknown)}; expected 'prompt' and 'image'")
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("request 'prompt' must be a non-empty string")
        check_unicode(prompt, "prompt")
        images = request.get("images")
        if images is None:
            images = [] if request.get("image") is None else [request["image"]]
        elif "image" in request:
            raise RequestError("give either 'image' or 'images', not both")
        n_tags = prompt.count(IMAGE_TAG)
        if n_tags != len(images):
            raise RequestError(f"prompt has {n_tags} <image> tag(s) but {len(images)} image(s) were given; "
                               "put exactly one <image> in the prompt per image")
        try:
            pixels = [preprocess(load_image(img), self.image_cfg) for img in images]
        except ValueError as e:
            raise RequestError(str(e)) from None
        ids = self.encode_prompt(prompt)
        per_image = self.cfg.image_seq_length
        expanded: list[int] = []
        for t in ids:
            expanded.extend([t] * per_image if t == self.cfg.image_token_index else [t])
        vocab = self.cfg.text.vocab_size
        bad = [t for t in ids if t != self.cfg.image_token_index and not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt encodes to token id {bad[0]}, outside the model's vocabulary of {vocab}")
        if len(expanded) >= self.max_model_len:
            raise RequestError(f"prompt is {len(expanded)} tokens ({len(images)} image(s) x {per_image} visual "
                               f"tokens included), the model's context is {self.max_model_len}")
        return ProcessedRequest(expanded, torch.stack(pixels) if pixels else None, len(images) * per_image)
