"""ForwardBatch: everything one engine forward carries through the model's layer loop.

nano-vllm keeps this in a global context; here it is passed, so the model code stays the same for
the dense reference and training (models/llama.py `ForwardContext`). The model calls `attend` at
every layer, which hands the batch to the one paged-attention module, and `before_layer` between
layers, where PVTP drops the visual rows a prefill no longer keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.llama import ForwardContext

from .attention import PagedAttention


@dataclass(eq=False)
class ForwardBatch(ForwardContext):
    attention: PagedAttention
    is_prefill: bool
    block_tables: torch.Tensor          # [B, L, W] block ids per (sequence, layer)
    context_lens: torch.Tensor          # [B, L] entries per layer once this forward has written its rows
    score_layers: tuple[int, ...]       # layers whose last-row attention this forward records
    scores: torch.Tensor                # [B, len(score_layers), N0max + 1], by visual index; last column: text sink
    # Decode: one row per sequence, static buffers (CUDA-graph inputs).
    slot_mapping: torch.Tensor | None = None   # [L, B] where each layer writes its new entry
    layer_lens: list[int] | None = None        # eager decode: entries of each layer's longest row
    skip_scores: frozenset[int] = frozenset()  # eager decode: score layers no eviction reads this step
    # Prefill: the prompts' rows packed together, pruned between layers.
    seq_of_row: torch.Tensor | None = None     # [N] which sequence a row belongs to
    visual_of_row: torch.Tensor | None = None  # [N] its visual index (0..N0-1), or -1 for text
    event_budgets: dict[int, list[int]] | None = None  # PVTP: event layer -> visual rows each sequence keeps
    num_seqs: int = 0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attention(layer_idx, q, k, v, self)

    def before_layer(self, layer_idx: int, h: torch.Tensor, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """At a PVTP event layer, keep each sequence's top visual rows by the layer below's score row."""
        if not self.is_prefill or not self.event_budgets or layer_idx not in self.event_budgets:
            return h, positions
        k = self.score_layers.index(layer_idx - 1)
        vis, owner = self.visual_of_row, self.seq_of_row
        is_vis = vis >= 0
        # Rank every visual row within its sequence at once: by score, highest first (stable, so ties go
        # to the lower row = the lower position), then grouped by sequence keeping that order; text rows
        # sort after their sequence's visual rows and are always kept.
        key = torch.where(is_vis, -self.scores[owner, k, vis.clamp(min=0)], torch.inf)
        order = torch.sort(key, stable=True).indices
        order = order[torch.sort(owner[order], stable=True).indices]
        counts = torch.bincount(owner, minlength=self.num_seqs)
        start = torch.cumsum(counts, 0) - counts                                 # each sequence's first slot
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - start[owner[order]]
        budget = torch.tensor(self.event_budgets[layer_idx], device=owner.device)[owner]
        keep = ~is_vis | (rank < budget)
        self.seq_of_row, self.visual_of_row = owner[keep], vis[keep]
        return h[keep], positions[keep]

    def last_rows(self) -> torch.Tensor:
        """Index of each prefill sequence's last row (the one whose logits pick the first token)."""
        return torch.cumsum(torch.bincount(self.seq_of_row, minlength=self.num_seqs), 0) - 1
