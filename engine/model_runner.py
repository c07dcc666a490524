"""Runs the model over the layered paged cache: prepare a ForwardBatch, call the model, read its outputs.

Prefill packs whole prompts and prunes them between layers (PVTP); decode runs one token per sequence
over static buffers, eagerly or by CUDA-graph replay. Under ST3 both end with the device-side eviction
(engine/eviction.py) that the next forward's budgets require, and hand back the new per-layer lengths.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import torch

from cache.layered import LayeredKVCache
from models.llava import LlavaForConditionalGeneration
from scheduler.policy import Full
from scheduler.scheduler import EvictionDue
from scheduler.sequence import Sequence

from .attention import PagedAttention, decode_attention, entry_slots, gather_kv
from .decode_buffers import DecodeBuffers, DecodeGraphs, LazyGraphs, graph_buckets, width_buckets
from .eviction import EvictionPlan, cap_bucket, evict
from .forward_batch import ForwardBatch
from .triton_attention import paged_decode_attention, pick_backend

log = logging.getLogger("st3")


@dataclass
class Eviction:
    """An eviction queued on the device, not yet read back."""
    new_lens: torch.Tensor  # [B, L] per-layer lengths it leaves
    moves: torch.Tensor     # [] entries it moves; above `cap` it changed nothing
    cap: int
    expected: float = 0.0   # decode: the removals the host expected (sizes the next steps' caps)
    retry: tuple[int, int, int] | None = None  # decode: (rows, width, safe cap) to redo it with on overflow


def visual_index(prompt_ids: list[int], image_token: int) -> torch.Tensor:
    """Per prompt position: the index of its visual token (0..N0-1), or -1 for text."""
    ids = torch.tensor(prompt_ids)
    is_vis = ids == image_token
    return torch.where(is_vis, is_vis.long().cumsum(0) - 1, torch.full_like(ids, -1))


class ModelRunner:
    def __init__(self, model: LlavaForConditionalGeneration, cache: LayeredKVCache, policy: Full,
                 device: torch.device, max_visual: int):
        self.model, self.cache, self.policy, self.device = model, cache, policy, device
        self.cfg = model.config
        self.num_layers = self.cfg.text.num_hidden_layers
        self.lm = model.language_model
        self.pool = cache.pool
        self.max_visual = max_visual  # N0 of the largest request the decode score buffers hold
        self.attention = PagedAttention(self.pool)
        self.plan = EvictionPlan.for_policy(policy, self.num_layers, device)
        self.eviction_retries = 0  # decode evictions redone with the safe move cap (see engine/eviction.py)
        self.move_ratio = 1.5      # moves per expected removal, learned from read-backs (see move_cap)

    # ---- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], due: EvictionDue | None = None
                ) -> tuple[torch.Tensor, Eviction | None]:
        """Run whole prompts (their seats already hold blocks for every layer's kept entries).

        Returns last-row logits [B, vocab] and, under ST3, the eviction for the first decode step.
        """
        dev, L, policy = self.device, self.num_layers, self.policy
        images = [s.pixel_values for s in seqs if s.pixel_values is not None]
        feats = self.model.encode_images(torch.cat(images).to(dev)) if images else None
        embeds, owner, pos, vis, offset = [], [], [], [], 0
        for b, s in enumerate(seqs):
            ids = torch.tensor(s.prompt_ids, device=dev)
            n_img = 0 if s.pixel_values is None else s.pixel_values.shape[0]
            embeds.append(self.model.embed(ids, feats[offset:offset + n_img] if n_img else None))
            offset += n_img
            owner.append(torch.full((len(ids),), b, device=dev))
            pos.append(torch.arange(len(ids), device=dev))
            vis.append(visual_index(s.prompt_ids, self.cfg.image_token_index).to(dev))
        seats = [s.seat for s in seqs]
        lens = self.cache.lens[seats]
        width = -(-int(lens.max()) // self.cache.block_size)
        budgets = [policy.budgets(s.num_visual, L) for s in seqs]
        score_layers = tuple(policy.score_layers(L, decode=False))
        batch = ForwardBatch(
            self.attention, True, self.cache.tables[:, :, :width][seats].to(dev), lens.to(dev), score_layers,
            torch.zeros(len(seqs), len(score_layers), max(s.num_visual for s in seqs) + 1, device=dev),
            seq_of_row=torch.cat(owner), visual_of_row=torch.cat(vis), num_seqs=len(seqs),
            event_budgets={e: [g[e] for g in budgets] for e in policy.event_layers(L)})
        h = self.lm.model(torch.cat(embeds), torch.cat(pos), batch)
        logits = self.lm.logits(h[batch.last_rows()])
        if due is None:
            return logits, None
        # The safe cap at once: a prefill's siblings (n > 1) copy its cache before the read-back.
        cap = cap_bucket(due.bound)
        return logits, Eviction(*evict(self.pool, self.plan, policy, batch.block_tables, batch.context_lens,
                                       batch.scores, torch.tensor(due.budgets, device=dev), cap), cap)

    def read_back(self, tokens: torch.Tensor, eviction: Eviction | None) -> tuple[list[int], torch.Tensor | None]:
        """The step's one device-to-host transfer: sampled tokens, plus the per-layer lengths an eviction left."""
        if eviction is None:
            return tokens.tolist(), None
        n = len(tokens)
        host = torch.cat([tokens.view(-1, 1).long(), eviction.new_lens, eviction.moves.expand(n, 1)], 1).cpu()
        moves = int(host[0, -1]) if n else 0
        if moves > eviction.cap:
            if eviction.retry is None:
                raise RuntimeError("VTA eviction moved more entries than its bound allowed (engine bug)")
            # Its move lists were sized for the expected moves and fell short, so it changed nothing, and its
            # inputs (scores, budgets, tables) are still in the decode buffers: redo it with the safe cap.
            self.eviction_retries += 1
            rows, width, cap = eviction.retry
            new_lens, _ = self.evict_step(rows, width, cap)
            host[:, 1:-1] = new_lens[:n].cpu()
        if eviction.expected:  # moves per expected removal, decaying slowly to what recent steps needed
            self.move_ratio = max(0.25, 0.95 * self.move_ratio, 1.25 * moves / eviction.expected)
        return host[:, 0].tolist(), host[:, 1:-1]

    # ---- decode ----------------------------------------------------------------------------
    def setup_decode(self, max_num_seqs: int, max_model_len: int, use_graphs: bool) -> None:
        """Allocate the static decode buffers, and capture CUDA graphs over them when asked."""
        dev, L = self.device, self.num_layers
        self.decode_score_layers = tuple(self.policy.score_layers(L, decode=True))
        self.buffers = DecodeBuffers(max_num_seqs, L, self.cache.max_blocks, self.pool.trash_slot, dev,
                                     len(self.decode_score_layers), len(self.plan.events) if self.plan else 0,
                                     self.max_visual if self.decode_score_layers else 0)
        self.attention.use_triton = dev.type == "cuda" and self._triton_wins()
        log.info("decode attention: %s", "triton paged kernel" if self.attention.use_triton else "gather + SDPA")
        self.buckets = graph_buckets(max_num_seqs)
        self.widths = width_buckets(self.cache.max_blocks)
        self.graphs, self.evict_graphs, self.pad_batches = None, None, False
        if use_graphs:
            # With decode score layers (ST3), a second set of graphs skips them for steps where no
            # sequence is still annealing.
            variants = (False, True) if self.decode_score_layers else (False,)
            steps = {v: functools.partial(self.decode_forward, score_layers=self.decode_score_layers if v else ())
                     for v in variants}
            t0 = time.perf_counter()
            with torch.inference_mode():  # the same mode decode() replays in
                self.graphs = DecodeGraphs(steps, self.buffers, max_num_seqs, self.widths)
            self.evict_graphs = LazyGraphs(self.graphs.pool) if self.plan else None
            log.info("captured %d decode graphs in %.1f s", len(self.graphs.graphs), time.perf_counter() - t0)

    def _triton_wins(self) -> bool:
        """Check the Triton paged kernel against gather + SDPA on a synthetic paged batch; use it if faster."""
        t, bs, dev = self.cfg.text, self.cache.block_size, self.device
        g = torch.Generator(device=dev).manual_seed(0)
        nb, b, w = 256, 8, 32
        k = torch.randn(nb * bs + 1, t.num_key_value_heads, t.head_dim, device=dev, generator=g).to(self.pool.k.dtype)
        v = torch.randn_like(k)
        tables = torch.randperm(nb, device=dev, generator=g)[: b * w].view(b, 1, w)
        lens = torch.randint(1, w * bs + 1, (b, 1), device=dev, generator=g)
        q = torch.randn(b, t.num_attention_heads, t.head_dim, device=dev, generator=g).to(k.dtype)
        gather = lambda q, k, v, tb, ln: decode_attention(  # noqa: E731
            q, gather_kv(k, entry_slots(tb[:, 0], bs)), gather_kv(v, entry_slots(tb[:, 0], bs)), ln[:, 0], False)[0]
        paged = lambda q, k, v, tb, ln: paged_decode_attention(q, k, v, tb, ln, 0, bs)  # noqa: E731
        atol = 1e-4 if k.dtype == torch.float32 else 2e-2
        if not pick_backend(gather, paged, (q, k, v, tables, lens), atol):
            return False
        if not self.decode_score_layers:
            return True
        # ST3's score layers run the kernel's scoring variant: check it too, against the gather path.
        n = 64
        vis = torch.where(torch.rand(k.shape[0], device=dev, generator=g) < 0.5,
                          torch.randint(0, n, (k.shape[0],), device=dev, generator=g), -1).to(torch.int32)
        slots = entry_slots(tables[:, 0], bs)
        _, row = decode_attention(q, gather_kv(k, slots), gather_kv(v, slots), lens[:, 0], True)
        valid = torch.arange(slots.shape[1], device=dev)[None, :] < lens
        want = torch.zeros(b, n + 1, device=dev).scatter_(1, torch.where(valid & (vis[slots] >= 0),
                                                                          vis[slots].long(), n), row)
        try:
            got = torch.zeros(b, n + 1, device=dev)
            paged_decode_attention(q, k, v, tables, lens, 0, bs, scores=got, visual_index=vis)
        except Exception:  # noqa: BLE001 - a kernel that fails to compile here is simply not used
            return False
        return bool(torch.allclose(got[:, :n], want[:, :n], atol=1e-3, rtol=0))

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], due: EvictionDue | None = None
               ) -> tuple[torch.Tensor, Eviction | None]:
        """One token for every sequence: logits [B, vocab], and the eviction when budgets are given."""
        n = len(seqs)
        seats = torch.tensor([s.seat for s in seqs])
        slot_mapping = self.cache.append_slots(seats).T                        # [L, B]
        lens = self.cache.lens[seats]                                          # [B, L]
        tokens, positions = zip(*(s.next_input() for s in seqs))
        # Graphs (and the `padded` mode that reproduces their inputs eagerly, for tests) run a bucket
        # of rows over full-width tables; plain eager runs gather, layer by layer, only the blocks
        # that layer holds: under ST3 deep layers are a fraction of the first ones.
        static = self.graphs is not None or self.pad_batches
        width = -(-int(lens.max()) // self.cache.block_size)
        rows = n
        if static:
            rows = min(b for b in self.buckets if b >= n)
            width = min(w for w in self.widths if w >= width)
        scored = due is not None
        self.buffers.fill(n, rows, torch.tensor(tokens), torch.tensor(positions), slot_mapping,
                          self.cache.tables[:, :, :width][seats], lens,
                          torch.tensor(due.budgets) if scored else None)
        if self.graphs is not None:
            logits = self.graphs.replay(rows, width, scored)
        else:
            layer_lens, skip = None, frozenset()
            if not static:  # eager: gather each layer's entries only, score only where an eviction ranks
                layer_lens = lens.max(0).values.tolist()
                if scored:
                    skip = frozenset(s for s, r in zip(self.decode_score_layers, due.ranks()) if not r)
            logits = self.decode_forward(*self.buffers.view(rows, width),
                                         self.decode_score_layers if scored else (), layer_lens, skip)
        if not scored:
            return logits[:n], None
        return logits[:n], self._decode_eviction(due, lens, rows, static)

    def _decode_eviction(self, due: EvictionDue, lens: torch.Tensor, rows: int, static: bool) -> Eviction:
        """Queue the eviction the next token needs, over the decode buffers this step filled (lens: host [B, L])."""
        # It spans only the layers from the first event on, which hold a fraction of layer 0's entries.
        width = -(-int(lens[:, self.plan.first:].max()) // self.cache.block_size)
        if static:
            width = min(w for w in self.widths if w >= width)
        safe = cap_bucket(due.bound)
        # On CPUs the padded rows of the safe-size move lists were close to half the eviction's time. On GPUs
        # they cost little, while each distinct cap is one more captured graph and each redo a second sync.
        expected = 0.0 if self.device.type == "cuda" else due.expected_removals()
        cap = min(safe, self.move_cap(expected)) if expected else safe
        new_lens, moves = self.evict_step(rows, width, cap)
        n = len(lens)
        return Eviction(new_lens[:n], moves, cap, expected, (rows, width, safe) if cap < safe else None)

    def move_cap(self, expected: float) -> int:
        """Move-list length for a decode eviction the host expects to remove `expected` entries.

        The estimate (EvictionDue.expected_removals) takes deeper sets to lose the same share as shallower
        ones; how far the real moves stray from it depends on how alike the model's layers rank, so the
        ratio is learned from the steps read back. A step that still outgrows its cap is redone (read_back).
        """
        return cap_bucket(math.ceil(expected * self.move_ratio) + 16)

    def decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor, score_layers: tuple[int, ...],
                       layer_lens: list[int] | None = None, skip_scores: frozenset[int] = frozenset()
                       ) -> torch.Tensor:
        """The decode forward proper: tensors in, logits out, no host synchronisation (graph-capturable).

        Score rows land in the static `buffers.scores`. `layer_lens` (eager only) trims each layer's
        gather to the entries it really holds; `skip_scores` (eager only) are score layers whose rows no
        eviction ranks by this step (their event layers hold no more than their budgets): their columns stay zero.
        """
        rows = input_ids.shape[0]
        scores = self.buffers.scores[:rows]
        if score_layers:
            scores.zero_()
        batch = ForwardBatch(self.attention, False, block_tables, context_lens, score_layers, scores,
                             slot_mapping=slot_mapping, layer_lens=layer_lens, skip_scores=skip_scores)
        h = self.lm.model(self.lm.model.embed_tokens(input_ids), positions, batch)
        return self.lm.logits(h)

    def evict_step(self, rows: int, width: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eviction over the decode buffers (a captured graph per (rows, width, cap) on CUDA)."""
        b = self.buffers
        step = functools.partial(self.evict_forward, rows, width, cap)
        if self.evict_graphs is None:
            return step()

        def neutralise():  # all lengths 0: nothing is valid, every move goes trash -> trash
            saved = b.context_lens[:rows].clone()
            b.context_lens[:rows].zero_()
            return saved
        return self.evict_graphs.run((rows, width, cap), step, neutralise, b.context_lens[:rows].copy_)

    def evict_forward(self, rows: int, width: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.buffers
        return evict(self.pool, self.plan, self.policy, b.block_tables[:rows, :, :width], b.context_lens[:rows],
                     b.scores[:rows], b.budgets[:rows], cap)
