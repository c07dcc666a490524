"""EngineConfig: the knobs of one LLM instance, validated."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.block_pool import BlockPool
from models.config import LlavaConfig
from models.llava import LlavaForConditionalGeneration

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# On CPU there is no free-memory probe worth trusting, so the KV pool gets a fixed budget
# (capped by what max_num_seqs full-length sequences could ever use).
CPU_KV_CACHE_BYTES = 2 << 30
GPU_MEMORY_UTILIZATION = 0.9


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enforce_eager: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        for name, low in (("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def kv_pool_blocks(c: EngineConfig, cfg: LlavaConfig, model: LlavaForConditionalGeneration, max_model_len: int
                   ) -> int:
    """KV blocks for the pool: as asked, else what fits the memory budget (never more than max_num_seqs can use)."""
    t = cfg.text
    if c.num_kv_blocks is not None:
        return c.num_kv_blocks
    per_block = BlockPool.bytes_per_block(c.block_size, t.num_key_value_heads, t.head_dim, c.torch_dtype)
    cap = c.max_num_seqs * t.num_hidden_layers * -(-max_model_len // c.block_size)
    if c.torch_device.type == "cuda":
        # Size the pool after the vision tower has run at full batch, so its activations stay free.
        v = cfg.vision
        with torch.inference_mode():
            model.encode_images(torch.zeros(min(c.max_num_seqs, 16), 3, v.image_size, v.image_size,
                                            device=c.torch_device, dtype=c.torch_dtype))
        torch.cuda.synchronize(c.torch_device)
        free, _ = torch.cuda.mem_get_info(c.torch_device)
        budget = int(free * GPU_MEMORY_UTILIZATION) - (1 << 30)  # leave room for activations
    else:
        budget = CPU_KV_CACHE_BYTES
    return max(1, min(cap, budget // per_block))
