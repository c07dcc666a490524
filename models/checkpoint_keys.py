"""Checkpoint key spellings -> our module names, by rules on key parts rather than a table per version.

Our modules carry the llava-hf 4.x hub names:
  language_model.model.{embed_tokens,layers,norm}.*      language_model.lm_head.weight
  vision_tower.vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}.*
  multi_modal_projector.linear_{1,2}.*
Every spelling transformers or LLaVA has written differs from these only in wrapper segments:
  4.x hub files               the names above
  4.52-4.57 save_pretrained   model.language_model.* / model.vision_tower.vision_model.* /
                              model.multi_modal_projector.* / lm_head.*
  5.x save_pretrained         language_model.model.* / vision_tower.{embeddings,encoder,...}.* (no vision_model level)
  5.x state_dict()            model.language_model.{layers,...}.* / model.vision_tower.embeddings.* / lm_head.*
  original LLaVA              model.{layers,embed_tokens,norm}.* / model.mm_projector.{0,2}.* / lm_head.*
  a CLIP checkpoint           vision_model.* (CLIPModel / CLIPVisionModel 4.x) or bare embeddings.* (5.x)
So the rules are: drop a `model.` that wraps a component; `vision_model.` under the vision tower is
optional; `model.` under the language model is optional; `lm_head` may sit at the top.
"""
from __future__ import annotations

COMPONENTS = {"language_model", "vision_tower", "multi_modal_projector", "mm_projector", "lm_head"}
TEXT_PARTS = {"embed_tokens", "layers", "norm", "rotary_emb"}
# Parts of a full CLIPModel checkpoint that LLaVA never uses.
CLIP_UNUSED = {"text_model", "visual_projection", "text_projection", "logit_scale"}
# Original LLaVA's projector is nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
MM_PROJECTOR = {"0": "linear_1", "2": "linear_2"}


def _vision(parts: list[str]) -> str:
    if parts[:1] == ["vision_model"]:
        parts = parts[1:]
    return "vision_tower.vision_model." + ".".join(parts)


def canonical_key(key: str, source: str = "llava") -> str | None:
    """Our parameter name for checkpoint key `key`, or None for a tensor LLaVA never uses.

    source: "llava" (a llava-hf checkpoint in any version's spelling), "original" (the LLaVA repo's
    checkpoint, whose vision tower comes from its own CLIP directory) or "clip" (that CLIP directory).
    A key no rule recognises comes back unchanged, so the caller reports it as unexpected.
    """
    parts = key.split(".")
    if source == "clip":
        return None if parts[0] in CLIP_UNUSED else _vision(parts)
    if parts[0] == "model" and len(parts) > 1 and parts[1] in COMPONENTS:
        parts = parts[1:]
    head, rest = parts[0], parts[1:]
    if head == "vision_tower":
        # Original LLaVA checkpoints saved by DeepSpeed carry a copy of the CLIP the model never reads.
        return None if source == "original" else _vision(rest)
    if head == "multi_modal_projector":
        return ".".join(parts)
    if head == "mm_projector" and rest:
        return ".".join(["multi_modal_projector", MM_PROJECTOR.get(rest[0], rest[0]), *rest[1:]])
    if head == "lm_head":
        return "language_model." + ".".join(parts)
    if head == "language_model" and rest:
        if rest[0] == "lm_head":
            return ".".join(parts)
        return "language_model.model." + ".".join(rest[1:] if rest[0] == "model" else rest)
    if head == "model" and rest and rest[0] in TEXT_PARTS:  # original LLaVA / a LlamaForCausalLM
        return "language_model.model." + ".".join(rest)
    return key
