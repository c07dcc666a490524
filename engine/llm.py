"""LLM: the public engine. add_request / step / generate / stream / abort / kv_stats."""
from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from pathlib import Path

import torch

from cache.block_pool import BlockPool
from cache.layered import LayeredKVCache
from models.config import load_config
from models.dummy_weights import dummy_model
from models.image import load_preprocessor_config
from models.hub_cache import resolve_model_path
from models.loader import load_model
from models.tokenizer import Tokenizer
from scheduler.policy import Full, make_policy
from scheduler.scheduler import Scheduler

from .config import EngineConfig, kv_pool_blocks
from .entrypoints import Entrypoints
from .errors import EngineError, RequestError
from .model_runner import ModelRunner
from .outputs import RequestOutput, TextState, request_stats
from .parallel_sampling import Families
from .processor import InputProcessor
from .sampling import SamplingParams, sample, sampling_batch
from .thread_guard import exclusive
from scheduler.sequence import Sequence, Status

log = logging.getLogger("st3")


class LLM(Entrypoints):
    """A LLaVA model served with continuous batching over a layer-aware paged KV cache."""

    def __init__(self, model: str | Path | None = None, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", revision: str | None = None,
                 policy: str | Full = "full", policy_params: dict | None = None, num_kv_blocks: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, enforce_eager: bool = False, max_images_per_prompt: int = 1,
                 load_format: str = "auto", seed: int | None = None):
        """`seed` draws the seeds of requests that bring none: None = from the OS, an int = reproducible."""
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if not isinstance(max_images_per_prompt, int) or max_images_per_prompt < 1:  # before any weight loads
            raise EngineError(f"max_images_per_prompt must be an integer >= 1, got {max_images_per_prompt!r}")
        self.config = EngineConfig(device=device, dtype=dtype, block_size=block_size, num_kv_blocks=num_kv_blocks,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=max_model_len, enforce_eager=enforce_eager)
        if model is None:
            from .default_model import default_model_dir
            model = default_model_dir()
        self.model_dir = resolve_model_path(model, revision)  # a directory, or a hub id in the local HF cache
        self.model_config = load_config(self.model_dir)
        self.config.resolve_dtype(self.model_config.checkpoint_dtype)
        text = self.model_config.text
        self.policy = make_policy(policy, **(policy_params or {}))
        self.policy.validate(text.num_hidden_layers)
        self.max_model_len = min(max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        pad = self.model_config.image_aspect_ratio == "pad"
        pre_dir = self.model_dir if (self.model_dir / "preprocessor_config.json").exists() \
            else Path(self.model_config.vision_tower_path or self.model_dir)
        image_cfg = load_preprocessor_config(pre_dir, self.model_config.vision.image_size, pad=pad)
        self.processor = InputProcessor(self.model_config, self.tokenizer, image_cfg, self.max_model_len)
        dev = self.config.torch_device
        if load_format == "dummy":  # benchmarks at real geometry without a 14 GB checkpoint
            self.model = dummy_model(self.model_config, dev, self.config.torch_dtype)
        elif load_format == "auto":
            self.model = load_model(self.model_dir, dev, self.config.torch_dtype, self.model_config)
        else:
            raise EngineError(f"load_format must be 'auto' or 'dummy' (random weights), got {load_format!r}")
        blocks = kv_pool_blocks(self.config, self.model_config, self.model, self.max_model_len)
        pool = BlockPool(blocks, block_size, text.num_key_value_heads, text.head_dim,
                         self.config.torch_dtype, dev)
        log.info("KV pool: %d blocks of %d tokens, %.1f MiB, %s on %s", pool.num_blocks, block_size,
                 (pool.k.nbytes + pool.v.nbytes) / 2**20, self.config.dtype, dev)
        self.cache = LayeredKVCache(pool, text.num_hidden_layers, max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(self.cache, self.policy, text.num_hidden_layers, max_num_seqs,
                                   max(max_num_batched_tokens, self.max_model_len))
        # ST3 keeps one decode score row per visual token in static buffers sized for this many tokens.
        self.max_visual = max_images_per_prompt * self.model_config.image_seq_length
        self.runner = ModelRunner(self.model, self.cache, self.policy, dev, self.max_visual)
        self.runner.setup_decode(max_num_seqs, self.max_model_len,
                                 use_graphs=dev.type == "cuda" and not enforce_eager)
        self.eos_ids = frozenset(text.eos_token_id) | ({self.tokenizer.eos_token_id} - {None})
        self._seqs: dict[str, Sequence] = {}
        self._texts: dict[str, TextState] = {}
        self._owned: set[str] = set()  # ids that generate()/stream() collect themselves
        self._errors: dict[str, str] = {}  # owned ids whose step failed -> message
        self._families = Families()  # n > 1 requests and their completions
        self._ids = itertools.count()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        # Outputs of add_request users' requests made while generate()/stream() drove the engine:
        # the next step() hands them over first.
        self._undelivered: list[RequestOutput] = []

    # ---- requests ---------------------------------------------------------------------------
    @exclusive
    def add_request(self, request: dict | str, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request; returns its id. Bad requests raise RequestError."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.text.vocab_size
        if params.logprobs is not None and params.logprobs > vocab:
            raise RequestError(f"SamplingParams.logprobs={params.logprobs} exceeds the vocabulary size {vocab}")
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        p = self.processor.process(request)
        if p.num_visual and p.prompt_ids[-1] == self.model_config.image_token_index \
                and self.policy.event_layers(self.model_config.text.num_hidden_layers):
            raise RequestError(f"policy {self.policy.name!r} ranks visual tokens by the last prompt token's "
                               "attention, so the prompt must not end with <image>; add text after it")
        if p.num_visual > self.max_visual and self.policy.anneals:
            raise RequestError(f"the prompt has {p.num_visual} visual tokens; policy {self.policy.name!r} keeps decode "
                               f"scores for at most {self.max_visual} (max_images_per_prompt="
                               f"{self.max_visual // self.model_config.image_seq_length}); raise max_images_per_prompt")
        seq = Sequence(rid, p.prompt_ids, p.pixel_values, params,
                       seed=params.seed if params.seed is not None else self._rng.getrandbits(62),
                       eos_ids=frozenset() if params.ignore_eos else self.eos_ids, num_visual=p.num_visual)
        # Worst case: every layer's prefill entries plus one entry per generated token but the last.
        # A request that cannot fit even alone would be preempted and recomputed forever.
        grow = min(params.max_tokens or self.max_model_len, self.max_model_len - seq.prompt_len) - 1
        need = self.cache.blocks_for([n + grow for n in self.scheduler.prefill_lens(seq)])
        total = self.cache.pool.num_blocks
        if need > total:
            raise RequestError(f"request needs up to {need} KV blocks (prompt + max_tokens={params.max_tokens}), "
                               f"the pool has only {total} (raise num_kv_blocks, lower max_tokens or use a "
                               "pruning policy)")
        seq.prompt = p.prompt
        if params.n > 1:
            self._families.add(seq)
        self._register(seq, owned=False)
        self.scheduler.add(seq)
        return rid

    def _register(self, seq: Sequence, owned: bool) -> None:
        self._seqs[seq.request_id] = seq
        self._texts[seq.request_id] = TextState(self.tokenizer)
        if owned:
            self._owned.add(seq.request_id)

    @exclusive
    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown or finished ids are ignored)."""
        rid = str(request_id)
        seqs = self._families.stop_forking(rid) or [self._seqs.get(rid)]
        live = [s for s in seqs if s is not None and not s.is_finished]
        for seq in live:
            self.scheduler.finish(seq, "abort")
            seq.finish_time = time.perf_counter()
        if live and rid not in self._owned:
            self._forget(rid)

    def has_unfinished(self) -> bool:
        """Whether step() has anything left to do or to hand over."""
        return self.scheduler.has_work or bool(self._undelivered)

    # ---- the loop ---------------------------------------------------------------------------
    @exclusive
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward (under ST3 ending with the next token's eviction), sample, postprocess.

        Returns updated requests; outputs that generate()/stream() produced for requests added with
        add_request come first.
        """
        held_over, self._undelivered = self._undelivered, []
        return held_over + self._step()

    @exclusive
    def _drive(self) -> list[RequestOutput]:
        """One step for generate()/stream(): keeps the outputs of requests they do not own for step()."""
        outs = self._step()
        self._undelivered += [o for o in outs if o.request_id not in self._owned]
        return outs

    def _step(self) -> list[RequestOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        budgets = self.scheduler.eviction_budgets(seqs)
        try:
            logits, eviction = (self.runner.prefill if is_prefill else self.runner.decode)(seqs, budgets)
            if is_prefill and self._families:
                seqs, logits, eviction = self._families.fork(self, seqs, logits, eviction)
            tokens, logprobs = sample(logits, sampling_batch(seqs, logits.shape[-1], self.config.torch_device))
            tokens_l, new_lens = self.runner.read_back(tokens, eviction)
        except Exception as e:  # noqa: BLE001 - one bad batch must not take the engine down
            return self._fail(seqs, e)
        held = self.cache.blocks_held_many([s.seat for s in seqs])  # what this forward held
        want_lp = [s for s in seqs if s.params.logprobs is not None and not s.replaying]
        top = None
        if want_lp:
            k = max(s.params.logprobs for s in want_lp)
            top = torch.topk(logprobs, k) if k > 0 else None
        now = time.perf_counter()
        outputs = []
        for b, seq in enumerate(seqs):
            seq.kv_peak_blocks = max(seq.kv_peak_blocks, held[b])
            if seq.replaying:  # recompute after preemption: keep the recorded token
                seq.cursor += 1
                continue
            tok = tokens_l[b]
            seq.output_ids.append(tok)
            seq.cursor += 1
            if seq.token_times:
                seq.itl.append(now - seq.token_times[-1])
            seq.token_times.append(now)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.params.logprobs is not None:
                entry = {tok: float(logprobs[b, tok])}
                if top is not None:
                    for v, i in zip(top.values[b, :seq.params.logprobs].tolist(),
                                    top.indices[b, :seq.params.logprobs].tolist()):
                        entry[i] = v
                seq.logprobs.append(entry)
            self._check_stop(seq, tok)
            outputs.append(self._output(seq, self._texts[seq.request_id].delta(seq), held[b]))
            if seq.is_finished and seq.request_id not in self._owned:
                self._forget(seq.request_id)  # add_request/step users got their last output
        if new_lens is not None:
            # Only now, after the stop checks: a finished sequence frees all its blocks anyway, and its
            # stats keep the visual sets its last forward attended (the eviction was for a next token).
            live = [b for b, s in enumerate(seqs) if s.status is Status.RUNNING]
            if live:
                self.scheduler.apply_evictions([seqs[b] for b in live], new_lens[live])
        return self._families.merge(outputs)  # one output per request (n > 1: its completions together)

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> list[RequestOutput]:
        """Finish a failed step's requests with finish_reason "error" and free their blocks."""
        log.error("step failed for request(s) %s; finishing them with an error", [s.request_id for s in seqs],
                  exc_info=exc)
        message = f"internal error while running this request: {type(exc).__name__}: {exc}"
        outputs = []
        for seq in seqs:
            self.scheduler.finish(seq, "error")
            seq.finish_time = time.perf_counter()
            outputs.append(self._output(seq, self._texts[seq.request_id].delta(seq), 0))
            outputs[-1].error = message
            if seq.request_id in self._owned:
                self._errors[seq.request_id] = message
            else:
                self._forget(seq.request_id)
        return outputs

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        text = self._texts[seq.request_id]
        hit_stop_string = text.append(seq, tok)
        reason = "stop" if hit_stop_string or tok in seq.eos_ids or tok in seq.params.stop_token_ids else None
        if reason is None and (len(seq.output_ids) >= (seq.params.max_tokens or self.max_model_len)
                               or seq.prompt_len + len(seq.output_ids) >= self.max_model_len):
            reason = "length"
        if reason is None:
            return
        if not hit_stop_string and text.flush(seq):
            reason = "stop"  # the held-back tail (an open byte run) completed a stop string
        self.scheduler.finish(seq, reason)
        seq.finish_time = time.perf_counter()

    def _output(self, seq: Sequence, delta: str = "", blocks_now: int | None = None) -> RequestOutput:
        if self._families.of(seq) is not None:
            return self._families.output(self, seq, delta, blocks_now)
        return self._single_output(seq, delta, blocks_now)

    def _single_output(self, seq: Sequence, delta: str = "", blocks_now: int | None = None) -> RequestOutput:
        if blocks_now is None:
            blocks_now = self.cache.blocks_held(seq.seat) if seq.seat is not None else 0
        return RequestOutput(seq.request_id, seq.text, list(seq.output_ids), seq.finish_reason,
                             list(seq.logprobs) if seq.params.logprobs is not None else None,
                             request_stats(seq, blocks_now, self.policy.name), delta=delta,
                             prompt=seq.prompt, prompt_token_ids=seq.prompt_ids)

    def _done(self, rid: str) -> bool:
        fam = self._families.of(rid)
        return fam.done if fam is not None else self._seqs[rid].is_finished

    def _pop(self, rid: str) -> RequestOutput:
        out = self._output(self._seqs[rid])
        out.error = self._errors.pop(rid, None)
        self._forget(rid)
        return out

    def _forget(self, rid: str) -> None:
        fam = self._families.of(self._seqs[rid])
        if fam is not None and not fam.done:
            return  # a completion finished before its siblings: the request is forgotten as a whole
        for seq in self._families.members(self._seqs[rid].parent_id or rid, self._seqs):
            del self._seqs[seq.request_id], self._texts[seq.request_id]
            self._owned.discard(seq.request_id)
        if fam is not None:
            del self._families.by_id[fam.members[0].request_id]

    def kv_stats(self) -> dict:
        """Pool occupancy in blocks (a block = block_size tokens of one layer)."""
        pool = self.cache.pool
        return {"block_size": pool.block_size, "total_blocks": pool.num_blocks, "free_blocks": pool.num_free,
                "used_blocks": pool.num_used, "peak_used_blocks": pool.peak_used,
                "bytes_per_block": BlockPool.bytes_per_block(pool.block_size, pool.k.shape[1], pool.k.shape[2],
                                                             pool.k.dtype)}


__all__ = ["LLM", "RequestOutput", "SamplingParams", "EngineError", "RequestError", "Status"]
