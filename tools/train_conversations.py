"""Training sequences for tools/train_demo.py: an easy-VQA image with its questions as token ids.

Two ways to lay an image's questions out, both computing its 256 visual tokens once:
Conversations.build_multi_turn (one shuffled conversation, the default) and Conversations.build
(every question packed as its own first turn behind one shared image prefix, with a mask).
"""
from __future__ import annotations

import functools
import random

import torch

from models.tokenizer import Tokenizer
from tools.easy_vqa_data import DESCRIBE, Example


class Conversations:
    """Training sequences for an Example: build_multi_turn() (the default) or build() (packed single turns).

    build() puts the image prompt once, then every question as its own sample: each question sees
    the shared prefix (BOS, "USER: ", the 256 visual tokens) and itself only, at the positions it
    would have as a lone first turn, so it trains exactly the single-turn samples the engine serves
    while the visual tokens are computed once per image. quick_accuracy() scores through it too.
    """

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

    def build(self, ex: Example) -> tuple[list[int], list[int], list[int], list[int]]:
        """(ids, labels, positions, segments): labels are -100 off the answers, segment 0 is the shared
        prefix and segment k the k-th question with its answer."""
        turns = list(ex.qa) + [(DESCRIBE, ex.caption)]
        prompts = [self.prompt(q) for q, _ in turns]
        shared = 0
        while all(len(p) > shared + 1 and p[shared] == prompts[0][shared] for p in prompts):
            shared += 1  # stops at least one token short of every prompt: each turn keeps its own text
        if shared < prompts[0].index(self.image_token) + self.num_visual:
            raise ValueError("packing: the questions differ before the image ends")
        ids, positions = prompts[0][:shared], list(range(shared))
        labels, segments = [-100] * shared, [0] * shared
        for k, ((_, answer), prompt) in enumerate(zip(turns, prompts), 1):
            ans = self._enc(answer) + [self.eos]
            own = prompt[shared:] + ans
            ids += own
            labels += [-100] * (len(prompt) - shared) + ans
            positions += range(shared, shared + len(own))
            segments += [k] * len(own)
        return ids, labels, positions, segments

    def build_multi_turn(self, ex: Example, rng: random.Random) -> tuple[list[int], list[int], list[int], list[int]]:
        """All of the image's questions as one shuffled multi-turn conversation (one segment, causal).

        Later turns can read earlier answers instead of the image; only the first turn must read it,
        and which question comes first changes every epoch. The recipe of the shipped model.
        """
        turns = list(ex.qa) + [(DESCRIBE, ex.caption)]
        rng.shuffle(turns)
        ids = list(self.prompt(turns[0][0]))
        labels = [-100] * len(ids)
        for k, (q, a) in enumerate(turns):
            if k:
                p = self._enc(f"USER: {q} ASSISTANT:")
                ids += p
                labels += [-100] * len(p)
            ans = self._enc(a) + [self.eos]
            ids += ans
            labels += ans
        return ids, labels, list(range(len(ids))), [0] * len(ids)


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> [B, T, T] bool: causal, and a token sees the prefix (0) and its own segment."""
    causal = torch.ones(segments.shape[-1], segments.shape[-1], dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return causal & (same | (segments[:, None, :] == 0))


def collate(seqs: list[tuple[list[int], list[int], list[int], list[int]]], pad: int):
    """Pad built sequences to the longest: ids, labels, positions, mask (padding is its own segment, -1)."""
    n = max(len(s[0]) for s in seqs)
    fill = (pad, -100, 0, -1)
    ids, labels, positions, segments = (torch.tensor([s[f] + [fill[f]] * (n - len(s[f])) for s in seqs])
                                        for f in range(4))
    # One segment (multi-turn conversations) is plain causal attention: leave it to SDPA's is_causal.
    mask = packed_mask(segments) if bool((segments > 0).any()) else None
    return ids, labels, positions, mask, segments


def batches(examples: list[Example], conv: Conversations, feats: torch.Tensor, batch: int,
            rng: random.Random, pad: int, single_turn: bool):
    """(ids, labels, positions, mask, vision features) batches of whole images, in a shuffled order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for s in range(0, len(order) - batch + 1, batch):
        rows = order[s:s + batch]
        build = conv.build if single_turn else functools.partial(conv.build_multi_turn, rng=rng)
        ids, labels, positions, mask, _ = collate([build(examples[i]) for i in rows], pad)
        yield ids, labels, positions, mask, feats[rows]
