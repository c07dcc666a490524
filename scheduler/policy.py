"""Visual-token policies: Full (plain LLaVA), FastV, PVTP and ST3 (= PVTP + the VTA annealer).

One small interface, per sequence with N0 visual tokens in an L-layer decoder:
  event_layers(L)            layers where the prefill prunes visual rows (ranked by the layer below's score)
  budgets(N0, L)             G_l: visual entries layer l keeps after prefill
  decode_budgets(N0, L, t)   VTA budgets per event layer before a decode forward (None = never evict)
  score_layers(L, decode)    layers whose last-row attention scores the next forward must produce
  evictions(...)             which visual tokens leave which event layers before a decode forward (batched,
                             on any device: engine/eviction.py runs it inside the decode step)
Rounding is floor(x + 0.5) everywhere; ties in a ranking go to the lower position.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class Full:
    """Plain LLaVA: every layer keeps every visual token."""
    name = "full"

    def validate(self, num_layers: int) -> None:
        pass

    def event_layers(self, num_layers: int) -> list[int]:
        return []

    def budgets(self, n0: int, num_layers: int) -> list[int]:
        """G_l per layer: N0 below the first event layer, the schedule's budget from it on (never above N0)."""
        return list(self._budgets(n0, num_layers))  # a copy: the cached tuple is shared by every caller

    @functools.lru_cache(maxsize=1024)  # policies are frozen (hashable); schedulers ask every step
    def _budgets(self, n0: int, num_layers: int) -> tuple[int, ...]:
        events = self.event_layers(num_layers)
        out, g = [], n0
        for layer in range(num_layers):
            if layer in events:
                g = min(g, self._event_budget(n0, layer))
            out.append(g)
        return tuple(out)

    def _event_budget(self, n0: int, layer: int) -> int:
        return n0

    def decode_budgets(self, n0: int, num_layers: int, t: int) -> dict[int, int] | None:
        return None

    def score_layers(self, num_layers: int, decode: bool) -> list[int]:
        if decode and not self.anneals:
            return []
        return [layer - 1 for layer in self.event_layers(num_layers)]

    @property
    def anneals(self) -> bool:
        return False

    def needs_decode_scores(self, n0: int, num_layers: int, t_next: int, visual_per_layer: list[int]) -> bool:
        """Whether the eviction before token t_next can remove anything, i.e. needs this forward's score rows.

        Past the anneal the budgets stop shrinking, so ST3's decode forwards can skip the score rows.
        """
        return any(visual_per_layer[layer] > b for layer, b in event_budgets(self, n0, num_layers, t_next))

    def evictions(self, present: torch.Tensor, scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """Decode-time (VTA) evictions for a batch of sequences, all at once.

        `present[b, k, v]`: visual token v is in event layer k of sequence b; `scores[b, k]` is the most
        recent forward's score row of the layer below event layer k, by visual index; `budgets[b, k]` the
        number to keep there. Returns `gone[b, k, v]`: v leaves event layer k and every layer above it
        (a token evicted at one event layer is evicted from all deeper ones too).
        """
        # One sort for every event layer: each row by its own scores, highest first, ties to the lower
        # index (stable). Membership then only filters that order, so no per-layer re-sort is needed.
        order = torch.sort(-scores, dim=2, stable=True).indices                  # [B, K, n]
        gone = torch.zeros_like(present[:, 0])
        out = torch.zeros_like(present)
        for k in range(present.shape[1]):
            members = (present[:, k] & ~gone).gather(1, order[:, k])             # in score order
            rank = torch.cumsum(members, 1) - 1                                  # rank among members
            gone = gone | torch.zeros_like(gone).scatter_(1, order[:, k], members & (rank >= budgets[:, k, None]))
            out[:, k] = gone
        return out


@dataclass(frozen=True)
class FastV(Full):
    """FastV: at one layer, keep the top (1 - ratio) visual tokens by the layer below's attention, once."""
    # metadata["help"] is the text of the matching command-line flag (engine/policy_flags.py).
    layer: int = field(default=2, metadata={"help": "the one layer that prunes, ranked by the layer below's "
                                                    "attention"})
    ratio: float = field(default=0.5, metadata={"help": "share of the visual tokens dropped there"})
    min_keep: int = field(default=1, metadata={"help": "never keep fewer visual tokens than this at a layer"})
    name = "fastv"

    def validate(self, num_layers: int) -> None:
        _check_int("layer", self.layer, 1)
        _check_ratio(self.ratio)
        _check_int("min_keep", self.min_keep, 0)
        if self.layer >= num_layers:
            raise ValueError(f"fastv layer {self.layer} must be below the model's {num_layers} layers")

    def event_layers(self, num_layers: int) -> list[int]:
        return [self.layer] if self.layer < num_layers else []

    def _event_budget(self, n0: int, layer: int) -> int:
        return max(self.min_keep, round_half_up(n0 * (1 - self.ratio)))


@dataclass(frozen=True)
class PVTP(Full):
    """Progressive visual token pruning: every `stride` layers from `start_layer`, keep (1 - ratio) more."""
    start_layer: int = field(default=2, metadata={"help": "first layer that prunes (K)"})
    stride: int = field(default=2, metadata={"help": "layers from one pruning event to the next (S)"})
    ratio: float = field(default=0.3, metadata={"help": "share of the remaining visual tokens dropped at each "
                                                        "event (R)"})
    min_keep: int = field(default=1, metadata={"help": "never keep fewer visual tokens than this at a layer"})
    name = "pvtp"

    def validate(self, num_layers: int) -> None:
        _check_int("start_layer", self.start_layer, 1)
        _check_int("stride", self.stride, 1)
        _check_ratio(self.ratio)
        _check_int("min_keep", self.min_keep, 0)
        if self.start_layer >= num_layers:
            raise ValueError(f"{self.name} start_layer {self.start_layer} must be below the model's "
                             f"{num_layers} layers")

    def event_layers(self, num_layers: int) -> list[int]:
        return list(range(self.start_layer, num_layers, self.stride))

    def _event_budget(self, n0: int, layer: int) -> int:
        steps = (layer - self.start_layer) // self.stride + 1
        return max(self.min_keep, round_half_up(n0 * (1 - self.ratio) ** steps))


CURVES = ("linear", "cosine", "step")


@dataclass(frozen=True)
class ST3(PVTP):
    """PVTP at prefill plus visual token annealing (VTA) during decode.

    phi(t) falls from 1 to anneal_floor over anneal_steps generated tokens:
      linear  1 - (1 - f) * min(t, T) / T
      cosine  f + (1 - f) * (1 + cos(pi * min(t, T) / T)) / 2   (slow start, slow finish)
      step    1 until t reaches T, then f
    """
    anneal_steps: int = field(default=64, metadata={"help": "generated tokens over which the decode budgets "
                                                            "fall (T)"})
    anneal_floor: float = field(default=0.5, metadata={"help": "share of each prefill budget left once the "
                                                               "anneal is over"})
    anneal_curve: str = field(default="linear", metadata={"help": "how the budgets fall", "choices": CURVES})
    name = "st3"

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        _check_int("anneal_steps", self.anneal_steps, 1)
        if not (isinstance(self.anneal_floor, (int, float)) and 0.0 <= self.anneal_floor <= 1.0):
            raise ValueError(f"anneal_floor must be in [0, 1], got {self.anneal_floor!r}")
        if self.anneal_curve not in CURVES:
            raise ValueError(f"anneal_curve must be one of {CURVES}, got {self.anneal_curve!r}")

    @property
    def anneals(self) -> bool:
        return True

    def phi(self, t: int) -> float:
        f, frac = self.anneal_floor, min(t, self.anneal_steps) / self.anneal_steps
        if self.anneal_curve == "linear":
            return 1 - (1 - f) * frac
        if self.anneal_curve == "cosine":
            return f + (1 - f) * (1 + math.cos(math.pi * frac)) / 2
        return 1.0 if t < self.anneal_steps else f

    def decode_budgets(self, n0: int, num_layers: int, t: int) -> dict[int, int] | None:
        # phi is flat after the anneal, so clamping t keeps the cache small without changing a budget.
        return dict(self._decode_budgets(n0, num_layers, min(t, self.anneal_steps)))  # a copy, as budgets()

    @functools.lru_cache(maxsize=4096)
    def _decode_budgets(self, n0: int, num_layers: int, t: int) -> dict[int, int]:
        phi, g = self.phi(t), self._budgets(n0, num_layers)
        return {layer: max(self.min_keep, round_half_up(g[layer] * phi)) for layer in self.event_layers(num_layers)}


@functools.lru_cache(maxsize=65536)
def event_budgets(policy: Full, n0: int, num_layers: int, t: int) -> tuple[tuple[int, int], ...]:
    """((event layer, budget), ...) before decode token t, by layer; () for a policy that never evicts.

    decode_budgets as an immutable, cached tuple: the scheduler asks for every running sequence at every step.
    """
    budgets = policy.decode_budgets(n0, num_layers, t)
    return tuple(sorted(budgets.items())) if budgets else ()


@functools.lru_cache(maxsize=65536)
def removal_bound(policy: Full, n0: int, num_layers: int, t: int) -> int:
    """Most entries the eviction before token t can remove from one sequence, over all its layers.

    A layer following event layer k holds at most budget_k(t-1) visual entries after the previous
    eviction, so now it loses at most the sum over event layers j <= k of budget_j(t-1) - budget_j(t),
    and never more than it holds. decode_budgets(0) is the prefill budget.
    """
    now = policy.decode_budgets(n0, num_layers, t)
    if not now:
        return 0
    before, held = policy.decode_budgets(n0, num_layers, t - 1), policy.budgets(n0, num_layers)
    events = sorted(now)
    total, drop, k = 0, 0, -1
    for layer in range(events[0], num_layers):
        while k + 1 < len(events) and events[k + 1] <= layer:
            k += 1
            drop += max(0, before[events[k]] - now[events[k]])
        total += min(held[layer], drop)
    return total


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_ratio(ratio) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")


POLICIES = {"full": Full, "fastv": FastV, "pvtp": PVTP, "st3": ST3}


def make_policy(policy: "str | Full", **params) -> Full:
    """A policy object from a name (plus parameters) or an existing policy object."""
    if isinstance(policy, Full):
        if params:
            raise ValueError("pass policy parameters to the policy object itself, not alongside it")
        return policy
    if not isinstance(policy, str) or policy.lower() not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)} or pass a policy object")
    cls = POLICIES[policy.lower()]
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for policy {policy!r}: {e}") from None
