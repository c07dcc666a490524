"""EngineConfig: the knobs of one LLM instance, validated."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.block_pool import BlockPool
from models.config import LlavaConfig
from models.llava import LlavaForConditionalGeneration

from .errors import ArgumentError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEVICE_TYPES = ("cpu", "cuda", "mps")
# dtype="auto" on CPU: half-precision checkpoints run in fp32. Measured with tools/bench/cpu_dtype.py on the
# dev CPU (AVX-512, no native bf16): decode steps equal within ~5%, but a 576-token image prefill 3.3x
# slower in bf16 and 6.6x in fp16 (docs/checkpoints.md). Pass dtype="bfloat16" to halve memory instead.
CPU_AUTO_DTYPE = {"float16": "float32", "bfloat16": "float32"}

# On CPU there is no free-memory probe worth trusting, so the KV pool gets a fixed budget
# (capped by what max_num_seqs full-length sequences could ever use).
CPU_KV_CACHE_BYTES = 2 << 30
GPU_MEMORY_UTILIZATION = 0.9


def _dtype_name(dtype) -> str:
    """'float32' / 'float16' / 'bfloat16' / 'auto' from a name or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ArgumentError(f"dtype {dtype} is not supported (use torch.float32, torch.float16 or torch.bfloat16)")
        return DTYPE_NAMES[dtype]
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name == "auto":
        return name
    if name not in DTYPES:
        raise ArgumentError(f"dtype must be 'auto', a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPE_NAMES[DTYPES[name]]


def check_device(device) -> str:
    """The device as a string, or a one-line ArgumentError when it is unknown or its backend is missing."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"unknown device {device!r} (use 'cpu', 'cuda', 'cuda:N' or 'mps')") from None
    if dev.type not in DEVICE_TYPES:
        raise ArgumentError(f"device {device!r} is not supported (use 'cpu', 'cuda', 'cuda:N' or 'mps')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {str(device)!r} asked for, but CUDA is not available "
                                "(no GPU, or a CPU-only PyTorch build)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} "
                                "CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError(f"device {str(device)!r} asked for, but the MPS backend is not available "
                            "(it needs Apple silicon and a PyTorch build with MPS)")
    return str(dev)


def auto_dtype(checkpoint_dtype: str | None, device_type: str) -> str:
    """dtype="auto": the checkpoint's saved dtype (float32 when absent or unusual), but fp32 on CPU for half types."""
    name = DTYPE_NAMES.get(DTYPES.get((checkpoint_dtype or "").removeprefix("torch.")), "float32")
    return CPU_AUTO_DTYPE.get(name, name) if device_type == "cpu" else name


@dataclass
class EngineConfig:
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "float32"  # or "auto": the checkpoint's, see resolve_dtype
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enforce_eager: bool = False

    def __post_init__(self):
        self.dtype = _dtype_name(self.dtype)
        self.device = check_device(self.device)
        for name, low in (("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ArgumentError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ArgumentError(f"{name} must be a positive integer or None, got {v!r}")

    def resolve_dtype(self, checkpoint_dtype: str | None) -> None:
        """Turn dtype="auto" into what auto_dtype picks for the checkpoint's dtype on this device."""
        if self.dtype == "auto":
            self.dtype = auto_dtype(checkpoint_dtype, self.torch_device.type)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ArgumentError("dtype='auto' is resolved from the checkpoint's config; call resolve_dtype first")
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
