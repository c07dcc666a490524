"""A deliberately naive reference for the four visual-token policies: full, FastV, PVTP, ST3.

Written straight from the normative definition, for one sequence at a time: per-layer Python lists of
per-token K/V entries, explicit position lists, fp32 math, no paging, no batching. It shares only the
weights (and the RoPE / norm / MLP modules) with the engine; the attention math is done here by hand
(q/k/v projections, RoPE, GQA by repeating kv heads, explicit softmax(q.k^T / sqrt(d)), o_proj).

Public API:
    reference_generate(model, input_ids, pixel_values, policy, max_tokens, eos_token_id=None) -> dict
    budgets(policy, n0, num_layers) -> list[int]        G_l for every layer
    phi(policy, t) -> float                             the VTA annealing factor before a decode forward
    event_layers(policy, num_layers) -> list[int]
    resolve_policy(policy) -> dict                      the policy with its defaults filled in
    recompute_logits(model, prompt_ids, pixel_values, generated, step_sets) -> the logits of every chosen
        token, recomputed in one cache-free pass from the per-forward sets a run reports ("step_sets").

Resolutions of points the definition leaves open (see also the module's self-check tests):
  * Rounding is floor(x + 0.5) evaluated in Python float (IEEE double): G_l = max(min_keep,
    floor(n0 * (1 - ratio) ** (floor((l - K) / S) + 1) + 0.5)); VTA B = max(min_keep, floor(G_l * phi + 0.5)).
    Budgets are not clamped to N0 (a budget >= the set size just keeps everything).
  * An event layer l needs scores a_{l-1}, so event layer 0 (FastV layer=0, PVTP/ST3 start_layer=0) is
    rejected with ValueError. Event layers >= L simply do not exist (FastV layer >= L is a no-op).
  * Pruning needs the last prompt row to be a text row (the score's query row and the row whose logits
    give the first token); a prompt ending in an image token is rejected whenever the policy has an event
    layer below L ("full" always accepts it).
  * Scores: probabilities are averaged over the query heads (mean of the per-head softmax rows), in fp32;
    ties in "highest score" are exact fp32 equality, broken toward the lower position.
  * All images of the prompt form one pool V (N0 = total image tokens of the sequence).
  * Generated tokens are embedded with model.embed(ids, None) and are never visual, whatever their id.
  * VTA: t = len(tokens generated so far); applied before every decode forward, never after the last
    token (no forward is run for the final token). Scores used are a_{l-1} from the most recent forward,
    all taken before this step's removals. "sets"/"visual_per_layer" in the result are the sets after the
    last VTA step, i.e. the ones the last forward used.
  * Greedy: argmax of the fp32 logits, ties to the lower token id; logprob = log_softmax(fp32 logits)[id].
"""
from __future__ import annotations

import math

import torch

from models.llama import apply_rope

DEFAULTS: dict[str, dict] = {
    "full": {},
    "fastv": dict(layer=2, ratio=0.5, min_keep=1),
    "pvtp": dict(start_layer=2, stride=2, ratio=0.3, min_keep=1),
    "st3": dict(start_layer=2, stride=2, ratio=0.3, min_keep=1,
                anneal_steps=64, anneal_floor=0.5, anneal_curve="linear"),
}
KNOWN_KEYS = {"kind", "layer", "ratio", "start_layer", "stride", "min_keep",
              "anneal_steps", "anneal_floor", "anneal_curve"}


def round_half_up(x: float) -> int:
    """floor(x + 0.5), the rounding the definition uses everywhere."""
    return int(math.floor(x + 0.5))


def resolve_policy(policy: dict) -> dict:
    """Fill in the defaults for the policy's kind; keys of other kinds are ignored, unknown keys rejected."""
    kind = policy.get("kind")
    if kind not in DEFAULTS:
        raise ValueError(f"unknown policy kind {kind!r}")
    unknown = set(policy) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown policy keys {sorted(unknown)}")
    out = {"kind": kind}
    for key, default in DEFAULTS[kind].items():
        out[key] = policy.get(key, default)
    if kind == "fastv" and out["layer"] < 1:
        raise ValueError("FastV layer must be >= 1 (an event layer l needs the scores of layer l-1)")
    if kind in ("pvtp", "st3"):
        if out["start_layer"] < 1:
            raise ValueError("start_layer must be >= 1 (an event layer l needs the scores of layer l-1)")
        if out["stride"] < 1:
            raise ValueError("stride must be >= 1")
    if kind == "st3":
        if out["anneal_curve"] not in ("linear", "cosine", "step"):
            raise ValueError(f"unknown anneal_curve {out['anneal_curve']!r}")
        if out["anneal_curve"] != "step" and out["anneal_steps"] < 1:
            raise ValueError("anneal_steps must be >= 1 for the linear and cosine curves")
    return out


def event_layers(policy: dict, num_layers: int) -> list[int]:
    """FastV: {layer}; PVTP/ST3: {K, K+S, K+2S, ...} below L; full: none."""
    p = resolve_policy(policy)
    if p["kind"] == "fastv":
        return [p["layer"]] if p["layer"] < num_layers else []
    if p["kind"] in ("pvtp", "st3"):
        return list(range(p["start_layer"], num_layers, p["stride"]))
    return []


def budgets(policy: dict, n0: int, num_layers: int) -> list[int]:
    """G_l for l = 0..L-1 (N0 below the first event layer)."""
    p = resolve_policy(policy)
    out = []
    for l in range(num_layers):
        if p["kind"] == "fastv" and l >= p["layer"]:
            g = max(p["min_keep"], round_half_up(n0 * (1 - p["ratio"])))
        elif p["kind"] in ("pvtp", "st3") and l >= p["start_layer"]:
            k = (l - p["start_layer"]) // p["stride"] + 1
            g = max(p["min_keep"], round_half_up(n0 * (1 - p["ratio"]) ** k))
        else:
            g = n0
        out.append(g)
    return out


def phi(policy: dict, t: int) -> float:
    """VTA factor before a decode forward, t = tokens generated so far. 1.0 for non-ST3 policies."""
    p = resolve_policy(policy)
    if p["kind"] != "st3":
        return 1.0
    steps, floor_, curve = p["anneal_steps"], p["anneal_floor"], p["anneal_curve"]
    if curve == "step":
        return 1.0 if t < steps else float(floor_)
    frac = min(t, steps) / steps
    if curve == "linear":
        return 1.0 - (1.0 - floor_) * frac
    return floor_ + (1.0 - floor_) * (1.0 + math.cos(math.pi * frac)) / 2.0


def select_top(members: list[int], scores: dict[int, float], k: int) -> list[int]:
    """The k members with the highest score, ties to the lower position, returned in position order."""
    if k >= len(members):
        return sorted(members)
    ranked = sorted(members, key=lambda pos: (-scores[pos], pos))
    return sorted(ranked[:k])


# ----------------------------------------------------------------------------------------------------
# One decoder layer, attention done by hand.


def _layer(model, l: int, h: torch.Tensor, pos: list[int], ctx: list[dict], visible=None):
    """Run layer l on rows h [R, C] at positions `pos`, attending to the cached entries `ctx` (each
    {"pos", "k", "v"}) plus the rows themselves, causal by position. `visible(query_row_index, key_pos)`
    can hide further keys (used only by the cache-free recompute below).

    Returns (new h [R, C], k [R, Hkv, D], v [R, Hkv, D], scores) where scores(r) = {key position: the
    softmax probability row r gives that key, averaged over query heads} (masked keys get 0).
    """
    cfg = model.config.text
    lm = model.language_model.model
    layer = lm.layers[l]
    attn = layer.self_attn
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    R = h.shape[0]

    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(R, H, D).float()
    k = attn.k_proj(x).view(R, Hkv, D).float()
    v = attn.v_proj(x).view(R, Hkv, D).float()
    cos, sin = lm.rotary_emb(torch.tensor(pos, dtype=torch.long), torch.float32)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    key_pos = [e["pos"] for e in ctx] + list(pos)
    keys = torch.cat([torch.stack([e["k"] for e in ctx]), k]) if ctx else k   # [M, Hkv, D]
    vals = torch.cat([torch.stack([e["v"] for e in ctx]), v]) if ctx else v
    rep = H // Hkv
    keys_h = keys.repeat_interleave(rep, dim=1)   # query head i uses kv head i // rep
    vals_h = vals.repeat_interleave(rep, dim=1)

    logits = torch.einsum("qhd,khd->hqk", q, keys_h) / math.sqrt(D)          # [H, R, M]
    allowed = torch.tensor(key_pos)[None, :] <= torch.tensor(pos)[:, None]   # [R, M], causal by position
    if visible is not None:
        allowed &= torch.tensor([[visible(qi, kp) for kp in key_pos] for qi in range(R)], dtype=torch.bool)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, vals_h).reshape(R, H * D)

    h = h + attn.o_proj(out.to(h.dtype))
    h = h + layer.mlp(layer.post_attention_layernorm(h))

    avg = probs.mean(dim=0)                                                   # average over query heads

    def scores(r: int) -> dict[int, float]:
        return {kp: float(avg[r, i]) for i, kp in enumerate(key_pos)}
    return h, k, v, scores


def _logits(model, h_last: torch.Tensor) -> torch.Tensor:
    lm = model.language_model
    return lm.lm_head(lm.model.norm(h_last)).float()


def _embed_prompt(model, input_ids: list[int], pixel_values):
    ids = torch.tensor(input_ids, dtype=torch.long)
    feats = model.encode_images(pixel_values) if pixel_values is not None else None
    return model.embed(ids, feats).float()


# ----------------------------------------------------------------------------------------------------
# Generation.


@torch.no_grad()
def reference_generate(model, input_ids: list[int], pixel_values: torch.Tensor | None, policy: dict,
                       max_tokens: int, eos_token_id: int | None = None) -> dict:
    p = resolve_policy(policy)
    input_ids = [int(t) for t in input_ids]
    L = model.config.text.num_hidden_layers
    img = model.config.image_token_index
    n = len(input_ids)
    if n == 0:
        raise ValueError("empty prompt")
    visual = [i for i, t in enumerate(input_ids) if t == img]
    if visual and pixel_values is None:
        raise ValueError("the prompt has image tokens but no pixel_values")
    is_visual = set(visual)
    n0 = len(visual)
    events = set(event_layers(p, L))
    G = budgets(p, n0, L)
    if events and (n - 1) in is_visual:
        raise ValueError("the last prompt token must be a text token when visual tokens can be pruned")

    # ---- prefill ---------------------------------------------------------------------------------
    h = _embed_prompt(model, input_ids, pixel_values)       # [n, C]
    rows = list(range(n))                                   # positions of the rows in h
    cur = list(visual)                                      # set(l) as it is built
    sets: list[list[int]] = []                              # set(l) per layer
    cache: list[list[dict]] = []                            # layer l: entries {"pos", "k", "v"} in position order
    scores: list[dict[int, float]] = []                     # a_l(j) of the most recent forward, visual j only
    step_sets: list[list[list[int]]] = []                   # the per-layer sets each forward ran with
    for l in range(L):
        if l in events:
            cur = select_top(cur, scores[l - 1], G[l])
        keep = set(cur)
        idx = [i for i, r in enumerate(rows) if r not in is_visual or r in keep]
        h = h[idx]
        rows = [rows[i] for i in idx]
        h, k, v, sc = _layer(model, l, h, rows, [])
        sc = sc(len(rows) - 1)                              # the last prompt row is the query row
        cache.append([{"pos": r, "k": k[i], "v": v[i]} for i, r in enumerate(rows)])
        scores.append({j: s for j, s in sc.items() if j in is_visual})
        sets.append(list(cur))
    prefill_sets = [sorted(s) for s in sets]
    step_sets.append(prefill_sets)

    tokens: list[int] = []
    logprobs: list[float] = []

    def choose(logits: torch.Tensor) -> int:
        tok = int(torch.argmax(logits))                     # first maximum = lowest id among ties
        tokens.append(tok)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[tok]))
        return tok

    if max_tokens > 0:
        tok = choose(_logits(model, h[-1]))
        # ---- decode ------------------------------------------------------------------------------
        while len(tokens) < max_tokens and not (eos_token_id is not None and tok == eos_token_id):
            if p["kind"] == "st3":
                f = phi(p, len(tokens))
                for l in sorted(events):
                    b = max(p["min_keep"], round_half_up(G[l] * f))
                    if len(sets[l]) > b:
                        kept = set(select_top(sets[l], scores[l - 1], b))
                        removed = set(sets[l]) - kept
                        for m in range(l, L):
                            sets[m] = [j for j in sets[m] if j not in removed]
                            cache[m] = [e for e in cache[m] if e["pos"] not in removed]
            step_sets.append([sorted(s) for s in sets])
            pos = n + len(tokens) - 1                        # index of the new token in the full sequence
            h = model.embed(torch.tensor([tok], dtype=torch.long), None).float()
            for l in range(L):
                h, k, v, sc = _layer(model, l, h, [pos], cache[l])
                sc = sc(0)
                cache[l].append({"pos": pos, "k": k[0], "v": v[0]})
                scores[l] = {j: s for j, s in sc.items() if j in is_visual}
            tok = choose(_logits(model, h[-1]))

    return {
        "token_ids": tokens,
        "logprobs": logprobs,
        "visual_per_layer": [len(s) for s in sets],
        "sets": [sorted(s) for s in sets],
        "prefill_visual_per_layer": [len(s) for s in prefill_sets],
        "prefill_sets": prefill_sets,
        "budgets": G,
        "step_sets": step_sets,
    }


@torch.no_grad()
def recompute_logits(model, prompt_ids: list[int], pixel_values: torch.Tensor | None, generated: list[int],
                     step_sets: list[list[list[int]]], return_scores: bool = False):
    """Cache-free recompute of a whole reference_generate run: fp32 logits [len(generated), vocab], row i
    being the logits that chose generated[i]. With return_scores, also scores[i][l] = {visual position:
    a_l} for the query row of forward i (the row whose logits chose generated[i]).

    The sequence prompt + generated[:-1] is run in one pass. At layer l the hidden state holds every
    non-visual row plus the prompt's visual rows in step_sets[0][l] (the prefill sets). A prompt row sees
    (causally) the visual keys in step_sets[0][l]; the row of generated[i-1], fed by decode forward i,
    sees only those in step_sets[i][l] (the sets after that step's VTA). That is exactly what the cached
    decode computes, so this checks the cache bookkeeping (appends, VTA removals) independently."""
    img = model.config.image_token_index
    n = len(prompt_ids)
    prompt_visual = {i for i, t in enumerate(prompt_ids) if t == img}
    fed = generated[:-1]
    h = _embed_prompt(model, prompt_ids, pixel_values)
    if fed:
        h = torch.cat([h, model.embed(torch.tensor(fed, dtype=torch.long), None).float()])
    rows = list(range(h.shape[0]))
    scores: list[list[dict[int, float]]] = [[] for _ in generated]
    for l in range(model.config.text.num_hidden_layers):
        present = set(step_sets[0][l])
        idx = [i for i, r in enumerate(rows) if r not in prompt_visual or r in present]
        h, rows = h[idx], [rows[i] for i in idx]
        seen = [set(s[l]) for s in step_sets]
        step_of = [max(0, r - n + 1) for r in rows]           # 0 for prompt rows, i for generated[i-1]

        def visible(qi, kp, seen=seen, step_of=step_of):
            return kp not in prompt_visual or kp in seen[step_of[qi]]

        h, _, _, sc = _layer(model, l, h, rows, [], visible)
        start = rows.index(n - 1)                           # last prompt row, then every fed token
        for i in range(len(generated)):
            scores[i].append({j: a for j, a in sc(start + i).items()
                              if j in prompt_visual and j in seen[step_of[start + i]]})
    logits = _logits(model, h[start:])
    return (logits, scores) if return_scores else logits
