"""Stage 1 of the demo model: pretrain its CLIP-style vision tower to see the image's labels.

Real LLaVA starts from a CLIP tower pretrained on 400M image-text pairs and keeps it frozen.
Nothing pretrained can be downloaded here, so the demo model earns its tower the same way in
miniature: a supervised pretraining on what each easy-VQA image shows (shape, colour, size, row,
column; five linear heads on the mean of the patch features LLaVA reads), then frozen for stage 2.

Why a separate stage: trained jointly with the decoder through the language loss, the tower
learned colour within minutes but never shape (43% on shape questions, chance is 33%, after
38 minutes). Shape is a property of the whole outline; on its own objective the tower first
plateaus near chance and then learns it abruptly after a few hundred steps, and each step here
costs a fraction of a full LLaVA step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.clip import CLIPVisionModel
from tools.demo.easy_vqa_data import COLORS, SHAPES, Example
from tools.demo.lr_schedule import TimeBoxedCosine, train_time_boxed

SIZES_WORDS, ROWS, COLS = ("small", "medium", "large"), ("top", "middle", "bottom"), ("left", "center", "right")
HEADS = (("shape", SHAPES), ("colour", COLORS), ("size", SIZES_WORDS), ("row", ROWS), ("column", COLS))


def tower_labels(examples: list[Example]) -> torch.Tensor:
    """[N, 5] class indices (shape, colour, size, row, column), read off each image's labels and caption."""
    rows = []
    for e in examples:
        w = e.caption.rstrip(".").split()  # 'a large teal circle in the top left'
        rows.append([SHAPES.index(e.shape), COLORS.index(e.color), SIZES_WORDS.index(w[1]),
                     ROWS.index(w[-2]), COLS.index(w[-1])])
    return torch.tensor(rows)


def init_sincos_positions(tower: CLIPVisionModel, scale: float = 0.5) -> None:
    """Start the learned position table at a 2-D sin/cos code (still learned): rows and columns are
    told apart from step one instead of being discovered, which the size/position labels need."""
    emb = tower.vision_model.embeddings
    d = emb.position_embedding.weight.shape[1]
    side = int(round((emb.position_embedding.weight.shape[0] - 1) ** 0.5))
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    q = d // 4
    freqs = 1.0 / 100 ** (torch.arange(q) / q)
    code = torch.cat([f(c.flatten()[:, None].float() * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)], 1)
    with torch.no_grad():
        pe = emb.position_embedding.weight
        pe.zero_()
        pe[1:, :code.shape[1]] = code * scale


class LabelHeads(nn.Module):
    """One linear classifier per label over the mean of the patch features (CLS dropped, as LLaVA does)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, len(classes)) for _, classes in HEADS)

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        pooled = feats[:, 1:].mean(1)
        return [h(pooled) for h in self.heads]


@torch.no_grad()
def label_accuracy(tower: CLIPVisionModel, heads: LabelHeads, pixels: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 250) -> dict[str, float]:
    """Per-label accuracy of the heads on (pixels, labels)."""
    was = tower.training
    tower.eval()
    preds = [torch.cat(p) for p in zip(*(
        [o.argmax(-1) for o in heads(tower(pixels[s:s + chunk]))] for s in range(0, len(pixels), chunk)))]
    tower.train(was)
    return {name: round((p == labels[:, k]).float().mean().item(), 3) for k, ((name, _), p) in enumerate(zip(HEADS, preds))}


def pretrain_tower(tower: CLIPVisionModel, pixels: torch.Tensor, labels: torch.Tensor,
                   test_pixels: torch.Tensor, test_labels: torch.Tensor, *, minutes: float, batch: int = 32,
                   lr: float = 3e-3, seed: int = 0, log=print) -> dict[str, float]:
    """Train `tower` (in place) on the label heads for about `minutes`; returns its test accuracy per label."""
    g = torch.Generator().manual_seed(seed)
    heads = LabelHeads(tower.vision_model.embeddings.patch_embedding.out_channels)
    with torch.no_grad():
        for h in heads.heads:
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * 0.02)
            h.bias.zero_()
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    steps_per_epoch = len(pixels) // batch
    sched = TimeBoxedCosine(lr, minutes, max_steps=steps_per_epoch * 1000)

    def shuffled_batches():
        while True:
            order = torch.randperm(len(pixels), generator=g)
            yield from (order[s:s + batch] for s in range(0, steps_per_epoch * batch, batch))

    source = shuffled_batches()

    def next_loss() -> torch.Tensor:
        idx = next(source)
        return sum(F.cross_entropy(o, labels[idx, k]) for k, o in enumerate(heads(tower(pixels[idx]))))

    tower.train()
    train_time_boxed(sched, opt, params, next_loss,
                     lambda: f"test accuracy {label_accuracy(tower, heads, test_pixels, test_labels)}", log,
                     name="tower", log_every=20, eval_every=250)
    acc = label_accuracy(tower, heads, test_pixels, test_labels)
    tower.requires_grad_(False)
    tower.eval()
    return acc
