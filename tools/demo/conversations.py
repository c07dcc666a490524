"""Training sequences for tools/demo/train.py: an easy-VQA image with its questions, as token ids.

Every image is laid out as one shared prefix (BOS, "USER: ", its 256 visual tokens) followed by
turns, so the visual tokens are computed once per image however many questions it has:

    [ prefix (P tokens) | turn 1, padded to L | turn 2, padded to L | ... | turn S ]

Each turn sees the whole prefix and itself (causally), at the positions it would have as a lone
first turn: exactly the single-turn samples the engine serves. `PrefixAttention` computes that
attention without a [T, T] mask, so training pays for prefix x turn and turn x turn scores only.
A multi-turn conversation is the same layout with one long turn (Conversations.build_multi_turn).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.llama import ForwardContext
from models.tokenizer import Tokenizer
from tools.demo.easy_vqa_data import DESCRIBE, Example


@dataclass
class Packed:
    """One image's training sample: the shared prefix and its turns as (ids, labels) pairs."""
    prefix: list[int]
    turns: list[tuple[list[int], list[int]]]  # labels are -100 except on answer tokens


class Conversations:
    """Builds Packed samples for an Example: build() (every question a first turn) or build_multi_turn()."""

    def __init__(self, tok: Tokenizer, image_token: int, num_visual: int):
        self.tok, self.image_token, self.num_visual = tok, image_token, num_visual
        self.eos = tok.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:  # no BOS: a continuation
        if text not in self._cache:
            ids = self.tok.encode(text)
            self._cache[text] = ids[1:] if ids and ids[0] == self.tok.bos_token_id else ids
        return self._cache[text]

    def prompt(self, question: str) -> list[int]:
        """Exactly what the engine feeds for a first turn, with `<image>` expanded to the visual tokens."""
        key = "\0prompt\0" + question
        if key not in self._cache:
            ids = self.tok.encode(self.tok.chat_prompt(question, 1))
            i = ids.index(self.image_token)
            self._cache[key] = ids[:i] + [self.image_token] * self.num_visual + ids[i + 1:]
        return self._cache[key]

    def _split(self, question: str) -> tuple[list[int], list[int]]:
        """A first-turn prompt cut after its last visual token: (prefix, the question's own tokens)."""
        p = self.prompt(question)
        end = p.index(self.image_token) + self.num_visual
        return p[:end], p[end:]

    def _answer(self, answer: str) -> list[int]:
        return self._enc(answer) + [self.eos]

    def build(self, ex: Example, describe: bool = True) -> Packed:
        """Every question (and "describe the image.") as its own first turn behind the shared prefix."""
        turns, prefix = [], None
        for q, a in list(ex.qa) + ([(DESCRIBE, ex.caption)] if describe else []):
            pre, own = self._split(q)
            if prefix not in (None, pre):
                raise ValueError("packing: the chat template puts question text before the image")
            prefix, ans = pre, self._answer(a)
            turns.append((own + ans, [-100] * len(own) + ans))
        return Packed(prefix, turns)

    def build_multi_turn(self, ex: Example, rng: random.Random) -> Packed:
        """All of the image's questions as one shuffled multi-turn conversation: a single long turn.

        Later turns can read earlier answers instead of the image; only the first turn must read it,
        and which question comes first changes every epoch.
        """
        turns = list(ex.qa) + [(DESCRIBE, ex.caption)]
        rng.shuffle(turns)
        prefix, ids = self._split(turns[0][0])
        labels = [-100] * len(ids)
        for k, (q, a) in enumerate(turns):
            if k:
                p = self._enc(f"USER: {q} ASSISTANT:")
                ids, labels = ids + p, labels + [-100] * len(p)
            ans = self._answer(a)
            ids, labels = ids + ans, labels + ans
        return Packed(prefix, [(ids, labels)])


@dataclass
class Batch:
    """Packed samples padded into one [B, P + S*L] batch (every prefix has the same length P)."""
    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    prefix_len: int
    num_turns: int
    turn_len: int

    def turn_view(self, t: torch.Tensor) -> torch.Tensor:
        """[B, P + S*L, ...] -> [B, S, L, ...]: the turns part of a per-token tensor."""
        return t[:, self.prefix_len:].unflatten(1, (self.num_turns, self.turn_len))


def collate(samples: list[Packed], pad: int) -> Batch:
    """Pad turns to the longest (L) and every sample to the most turns (S); padding is never trained."""
    P = len(samples[0].prefix)
    if any(len(s.prefix) != P for s in samples):
        raise ValueError("collate: prefixes of different lengths")
    S = max(len(s.turns) for s in samples)
    L = max(len(ids) for s in samples for ids, _ in s.turns)
    ids = torch.full((len(samples), S, L), pad)
    labels = torch.full((len(samples), S, L), -100)
    for b, s in enumerate(samples):
        for k, (t_ids, t_labels) in enumerate(s.turns):
            ids[b, k, :len(t_ids)] = torch.tensor(t_ids)
            labels[b, k, :len(t_labels)] = torch.tensor(t_labels)
    prefix = torch.tensor([s.prefix for s in samples])
    positions = torch.cat([torch.arange(P), (P + torch.arange(L)).repeat(S)]).expand(len(samples), -1)
    return Batch(torch.cat([prefix, ids.flatten(1)], 1),
                 torch.cat([torch.full_like(prefix, -100), labels.flatten(1)], 1), positions, P, S, L)


class PrefixAttention(ForwardContext):
    """Attention for a Batch's layout: the prefix is causal; each turn sees the prefix and itself, causally.

    Exactly softmax over [prefix keys ; the turn's own keys], computed as two small score blocks
    instead of one [T, T] block that is mostly masked out.
    """

    def __init__(self, batch: Batch):
        self.P, self.S, self.L = batch.prefix_len, batch.num_turns, batch.turn_len
        self.own_causal = torch.ones(self.L, self.L, dtype=torch.bool).tril()

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        P, S, L, own_causal = self.P, self.S, self.L, self.own_causal
        rep = q.shape[-2] // k.shape[-2]
        k, v = k.repeat_interleave(rep, -2), v.repeat_interleave(rep, -2)
        if S == 1:  # one turn (a multi-turn conversation): plain causal attention, SDPA's fused kernel
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
            return out.transpose(1, 2)
        B, _, H, D = q.shape
        kp, vp = k[:, :P], v[:, :P]
        head = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q[:, :P], kp, vp)), is_causal=True)
        qs, ks, vs = (t[:, P:].unflatten(1, (S, L)) for t in (q, k, v))
        scores = torch.cat([torch.einsum("bslhd,bphd->bshlp", qs, kp),
                            torch.einsum("bslhd,bsmhd->bshlm", qs, ks).masked_fill(~own_causal, float("-inf"))],
                           -1).mul(D ** -0.5).softmax(-1)
        turns = (torch.einsum("bshlp,bphd->bslhd", scores[..., :P], vp)
                 + torch.einsum("bshlm,bsmhd->bslhd", scores[..., P:], vs))
        return torch.cat([head.transpose(1, 2), turns.flatten(1, 2)], 1)


def batches(examples: list[Example], conv: Conversations, feats: torch.Tensor, batch: int,
            rng: random.Random, pad: int, multi_turn: bool, describe: bool = True):
    """(Batch, vision features) for whole images, in a shuffled order (describe: add the caption turn)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for s in range(0, len(order) - batch + 1, batch):
        rows = order[s:s + batch]
        build = (lambda e: conv.build_multi_turn(e, rng)) if multi_turn else (lambda e: conv.build(e, describe))
        yield collate([build(examples[i]) for i in rows], pad), feats[rows]
