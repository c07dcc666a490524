"""LLaVA-1.5: CLIP vision tower + MLP projector + LLaMA, image features spliced in at `<image>` tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPVisionModel
from .config import LlavaConfig
from .llama import LlamaForCausalLM


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        d_out = cfg.text.hidden_size
        self.linear_1 = nn.Linear(d_in, d_out, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(d_out, d_out, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact (erf) GELU, as LLaVA trained it


class LlavaForConditionalGeneration(nn.Module):
    """Module names follow the llava-hf (legacy) checkpoint layout; the loader maps the others onto it."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionModel(cfg.vision, cfg.feature_layers)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg.text)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels -> [N, visual tokens per image, text hidden] projected features."""
        feats = self.vision_tower(pixel_values)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        proj = self.multi_modal_projector
        return proj(feats.to(proj.linear_1.weight.dtype))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with rows at `<image>` ids replaced, in order, by image feature rows."""
        is_image = input_ids == self.config.image_token_index
        if image_features is None:
            # No images: an in-vocabulary <image> id (e.g. a generated one) embeds its own row, as in
            # transformers and the engine's decode; only a sentinel outside the vocabulary (-200) is masked.
            return self.language_model.model.embed_tokens(input_ids.masked_fill(input_ids < 0, 0))
        emb = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        feats = image_features.reshape(-1, emb.shape[-1]).to(emb.dtype)
        if int(is_image.sum()) != feats.shape[0]:
            raise ValueError(f"{int(is_image.sum())} <image> token positions but {feats.shape[0]} image feature rows")
        return emb.masked_scatter(is_image.unsqueeze(-1), feats)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Dense reference forward: [B, T] ids (image ids already expanded) -> [B, T, vocab] logits."""
        return self.dense_logits(input_ids, pixel_values)

    def dense_logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` with autograd on: what tools/demo/train.py trains through."""
        feats = self.encode_images(pixel_values) if pixel_values is not None else None
        embeds = self.embed(input_ids, feats)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        return self.language_model.forward_dense(embeds, positions)
