"""LLaMA decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU) with Hugging Face module names.

The layers do not own their attention. One explicit per-forward object, a `ForwardContext`, travels
through the model's single layer loop: it says how attention reads and writes keys and values, and
may change the rows between layers. The base class is plain causal attention (the dense reference);
the engine passes its paged, pruned `ForwardBatch` and training its packed-conversation layout, so
all of them run the same model code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class ForwardContext:
    """Dense causal attention over rows [..., T, H, D]; subclasses page, prune or re-mask it."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [..., T, H, D], k and v [..., T, Hkv, D] (RoPE applied) -> [..., T, H, D]."""
        rep = q.shape[-2] // k.shape[-2]
        q, k, v = (t.transpose(-3, -2) for t in (q, k.repeat_interleave(rep, -2), v.repeat_interleave(rep, -2)))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(-3, -2)

    def before_layer(self, layer_idx: int, h: torch.Tensor, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (and their positions) that enter layer `layer_idx`; PVTP drops visual rows here."""
        return h, positions


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference, then cast back before the weight.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the frequencies on the CPU in fp32, as the reference does, then move them."""
        d, device = self.cfg.head_dim, self.inv_freq.device
        if device.type == "meta":
            return
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.inv_freq = (inv_freq / self.cfg.rope_scaling_factor).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, head_dim], computed in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., heads, head_dim] with cos/sin [..., head_dim]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=b)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, *self.qkv).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(*lead, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=b), nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _stack(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the rows of `linears`, whose parameters become views of it."""
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=m.bias.requires_grad)
        start += n
    return weight, bias


def fuse_projections(lm: "LlamaForCausalLM") -> None:
    """Stack q/k/v and gate/up into one matrix each: 4 weight reads per layer instead of 7.

    At decode a step is one matrix-vector product per weight, bound by memory bandwidth, and a few
    large products stream closer to the machine's bandwidth than many small ones. The per-module
    parameters stay (as views), so names, state_dict and memory use are unchanged.
    """
    for layer in lm.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv = _stack([a.q_proj, a.k_proj, a.v_proj])
        m.gate_up = _stack([m.gate_proj, m.up_proj])


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(cfg)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The only layer loop: embeddings [..., T, C] at `positions` -> last hidden states (before the norm)."""
        cos, sin = self.rotary_emb(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h, kept = ctx.before_layer(i, h, positions)
            if kept is not positions:  # rows were dropped: their rotary tables go with them
                positions = kept
                cos, sin = self.rotary_emb(positions, h.dtype)
            h = layer(h, cos, sin, ctx)
        return h


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over hidden rows."""
        return self.lm_head(self.model.norm(h))

    def forward_dense(self, embeds: torch.Tensor, positions: torch.Tensor,
                      ctx: ForwardContext | None = None) -> torch.Tensor:
        """Plain causal forward over [B, T, C] embeddings (no cache, no pruning): the reference path.

        `ctx` replaces causal attention, e.g. for training's packed samples (tools/demo/conversations.py).
        """
        return self.logits(self.model(embeds, positions, ctx or ForwardContext()))
