"""Runs the model over the layered paged cache: batched prefill with PVTP pruning, batched decode."""
from __future__ import annotations

import functools
import logging
import time

import torch

from cache.layered import LayeredKVCache
from models.llava import LlavaForConditionalGeneration
from scheduler.policy import Full, keep_top

from .attention import decode_attention, decode_probs, entry_slots, gather_kv, prefill_attention
from .triton_attention import paged_decode_attention, pick_backend
from .decode_buffers import DecodeBuffers, DecodeGraphs, graph_buckets, width_buckets
from scheduler.sequence import Sequence

logger = logging.getLogger("st3")


def visual_index(prompt_ids: list[int], image_token: int) -> torch.Tensor:
    """Per prompt position: the index of its visual token (0..N0-1), or -1 for text."""
    ids = torch.tensor(prompt_ids)
    is_vis = ids == image_token
    return torch.where(is_vis, is_vis.long().cumsum(0) - 1, torch.full_like(ids, -1))


class ModelRunner:
    def __init__(self, model: LlavaForConditionalGeneration, cache: LayeredKVCache, policy: Full,
                 device: torch.device):
        self.model, self.cache, self.policy, self.device = model, cache, policy, device
        self.cfg = model.config
        self.num_layers = self.cfg.text.num_hidden_layers
        self.layers = model.language_model.model.layers
        self.lm = model.language_model
        self.pool = cache.pool

    # ---- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Run whole prompts (their seats already hold blocks for every layer's kept entries).

        Returns last-row logits [B, vocab] and, per sequence, its score rows [num score layers, N0].
        """
        dev, L, policy = self.device, self.num_layers, self.policy
        images = [s.pixel_values for s in seqs if s.pixel_values is not None]
        feats = self.model.encode_images(torch.cat(images).to(dev)) if images else None
        embeds, seq_of_row, pos, vis, offset = [], [], [], [], 0
        for b, s in enumerate(seqs):
            ids = torch.tensor(s.prompt_ids, device=dev)
            n_img = 0 if s.pixel_values is None else s.pixel_values.shape[0]
            embeds.append(self.model.embed(ids, feats[offset:offset + n_img] if n_img else None))
            offset += n_img
            seq_of_row.append(torch.full((len(ids),), b, device=dev))
            pos.append(torch.arange(len(ids), device=dev))
            vis.append(visual_index(s.prompt_ids, self.cfg.image_token_index).to(dev))
        h, seq_of_row, pos, vis = (torch.cat(x) for x in (embeds, seq_of_row, pos, vis))
        events = set(policy.event_layers(L))
        score_layers = policy.score_layers(L, decode=False)
        budgets = [policy.budgets(s.num_visual, L) for s in seqs]
        n0_max = max(s.num_visual for s in seqs)
        scores = torch.zeros(len(seqs), len(score_layers), n0_max + 1, device=dev)  # col n0_max: text sink
        last_scores: list[torch.Tensor] | None = None

        for layer_idx, layer in enumerate(self.layers):
            if layer_idx in events and last_scores is not None:
                keep = torch.ones_like(vis, dtype=torch.bool)
                for b in range(len(seqs)):
                    rows = ((seq_of_row == b) & (vis >= 0)).nonzero().squeeze(1)
                    if rows.numel() > budgets[b][layer_idx]:
                        # last_scores[b] covers this sequence's rows as they were at the layer below.
                        row_scores = last_scores[b][vis[seq_of_row == b] >= 0]
                        keep[rows] = keep_top(row_scores, budgets[b][layer_idx])
                h, seq_of_row, pos, vis = h[keep], seq_of_row[keep], pos[keep], vis[keep]
            seq_lens = torch.bincount(seq_of_row, minlength=len(seqs)).tolist()
            slots = torch.cat([self.cache.slots(s.seat, layer_idx, n) for s, n in zip(seqs, seq_lens)]).to(dev)
            want = (layer_idx + 1) in events
            captured: list = []

            def attend(_, q, k, v, slots=slots, seq_lens=seq_lens, want=want, captured=captured):
                self.pool.k.index_copy_(0, slots, k)
                self.pool.v.index_copy_(0, slots, v)
                self.pool.visual_index.index_copy_(0, slots, vis.to(torch.int32))
                out, sc = prefill_attention(q, k, v, seq_lens, want)
                captured.append(sc)
                return out

            cos, sin = self.lm.model.rotary_emb(pos, h.dtype)
            h = layer(h, cos, sin, attend)
            last_scores = captured[0]
            if want:
                k_idx = score_layers.index(layer_idx)
                for b, row in enumerate(last_scores):
                    v_b = vis[seq_of_row == b]
                    scores[b, k_idx].index_copy_(0, torch.where(v_b >= 0, v_b, n0_max), row.to(scores.dtype))
        for b, s in enumerate(seqs):
            s.visual_per_layer = list(budgets[b])
        if policy.anneals:
            self.cache.record_visual([s.seat for s in seqs if s.num_visual])
        last = torch.cumsum(torch.bincount(seq_of_row, minlength=len(seqs)), 0) - 1
        logits = self.lm.lm_head(self.lm.model.norm(h[last]))
        scores = scores.cpu() if score_layers else None  # read on the host, by the VTA scheduler
        return logits, [scores[b, :, :s.num_visual] if score_layers else None for b, s in enumerate(seqs)]

    # ---- decode ----------------------------------------------------------------------------
    def setup_decode(self, max_num_seqs: int, max_model_len: int, use_graphs: bool) -> None:
        """Allocate the static decode buffers, and capture CUDA graphs over them when asked."""
        dev, L = self.device, self.num_layers
        self.decode_score_layers = self.policy.score_layers(L, decode=True)
        self.score_width = max_model_len + 1  # by visual index, plus one sink column for text entries
        self.buffers = DecodeBuffers(max_num_seqs, L, self.cache.max_blocks, self.pool.trash_slot, dev)
        self.use_triton = dev.type == "cuda" and self._triton_wins()
        logger.info("decode attention backend: %s", "Triton paged kernel" if self.use_triton else "gather + SDPA")
        self.buckets = graph_buckets(max_num_seqs)
        self.widths = width_buckets(self.cache.max_blocks)
        self.graphs, self.pad_batches = None, False
        if use_graphs:
            # With decode score layers (ST3), a second set of graphs skips them for steps where no
            # sequence is still annealing.
            variants = (False, True) if self.decode_score_layers else (False,)
            steps = {v: functools.partial(self.decode_forward, score_layers=self.decode_score_layers if v else [],
                                          score_width=self.score_width) for v in variants}
            t0 = time.perf_counter()
            with torch.inference_mode():  # the same mode decode() replays in
                self.graphs = DecodeGraphs(steps, self.buffers, max_num_seqs, self.widths)
            logger.info("captured decode CUDA graphs (batch buckets %s) in %.1f s", self.buckets,
                        time.perf_counter() - t0)

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
        return pick_backend(gather, paged, (q, k, v, tables, lens), atol)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One token for every sequence; returns logits [B, vocab] and per-sequence score rows."""
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
        self.buffers.fill(n, rows, torch.tensor(tokens), torch.tensor(positions), slot_mapping,
                          self.cache.tables[seats][:, :, :width], lens)
        # Score rows only while some sequence's next eviction can still remove tokens (ST3's anneal).
        scored = bool(self.decode_score_layers) and any(
            self.policy.needs_decode_scores(s.num_visual, self.num_layers, s.cursor + 1, s.visual_per_layer)
            for s in seqs)
        if self.graphs is not None:
            logits, scores = self.graphs.replay(rows, width, scored)
        else:
            score_width = self.score_width if static else max(s.num_visual for s in seqs) + 1
            layer_widths = None if static else (-(-lens.max(0).values // self.cache.block_size)).tolist()
            logits, scores = self.decode_forward(*self.buffers.view(rows, width),
                                                 self.decode_score_layers if scored else [], score_width,
                                                 layer_widths)
        if not scored:
            return logits[:n], [None] * n
        scores = scores[:n].cpu()  # one transfer per step (a graph's outputs are overwritten next replay)
        return logits[:n], [scores[b, :, :s.num_visual] for b, s in enumerate(seqs)]

    def decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor, score_layers: list[int],
                       score_width: int, layer_widths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step proper: tensors in, tensors out, no host synchronisation (graph-capturable).

        `layer_widths` (eager only) trims each layer's block tables to the blocks it really uses.
        """
        pool, bs = self.pool, self.cache.block_size
        h = self.lm.model.embed_tokens(input_ids)
        cos, sin = self.lm.model.rotary_emb(positions, h.dtype)
        scores = torch.zeros(input_ids.shape[0], len(score_layers), score_width, device=h.device)
        sink = score_width - 1
        for layer in self.layers:
            def attend(l, q, k, v):
                slots = slot_mapping[l]
                pool.k.index_copy_(0, slots, k)
                pool.v.index_copy_(0, slots, v)
                pool.visual_index.index_fill_(0, slots, -1)
                want = l in score_layers
                if self.use_triton and not want:
                    return paged_decode_attention(q, pool.k, pool.v, block_tables, context_lens, l, bs)
                tables = block_tables[:, l] if layer_widths is None else block_tables[:, l, :layer_widths[l]]
                slots_all = entry_slots(tables, bs)
                k_all = gather_kv(pool.k, slots_all)
                if self.use_triton:  # a score layer: the kernel attends, the gathered keys give the score row
                    out = paged_decode_attention(q, pool.k, pool.v, block_tables, context_lens, l, bs)
                    sc = decode_probs(q, k_all, context_lens[:, l]).mean(dim=(1, 2))
                else:
                    out, sc = decode_attention(q, k_all, gather_kv(pool.v, slots_all), context_lens[:, l], want)
                if want:
                    vis = pool.visual_index.index_select(0, slots_all.reshape(-1)).view_as(slots_all)
                    valid = torch.arange(vis.shape[1], device=vis.device)[None, :] < context_lens[:, l, None]
                    idx = torch.where(valid & (vis >= 0), vis.long(), sink)  # padding may hold stale ids
                    scores[:, score_layers.index(l)].scatter_(1, idx, sc)
                return out
            h = layer(h, cos, sin, attend)
        return self.lm.lm_head(self.lm.model.norm(h)), scores
