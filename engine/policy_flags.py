"""The visual-token policy knobs as command-line flags, built from the policy dataclasses.

One flag per dataclass field, spelled as the field with dashes (type, default and help come from the
field): `--start-layer`, `--stride`, `--ratio`, `--min-keep`, `--anneal-steps`, `--anneal-floor`,
`--anneal-curve`, and FastV's `--layer`; `--ratio` and `--min-keep` are fields of FastV as well as of
PVTP/ST3. A flag applies to every chosen policy that has the field and must apply to at least one;
otherwise it is a usage error (a ValueError naming the flag). Policies keep their own defaults for
flags not given. `policy:key=value,...` specs (tools.demo.eval_vqa) use the same field names.
"""
from __future__ import annotations

import argparse
import dataclasses

from scheduler.policy import POLICIES, Full, make_policy

TYPES = {"int": int, "float": float, "str": str}  # field annotations are strings (postponed evaluation)


def knobs(name: str) -> dict[str, dataclasses.Field]:
    """The fields of policy `name` (case-insensitive), by field name; {} for an unknown policy."""
    cls = POLICIES.get(name.lower())
    return {} if cls is None else {f.name: f for f in dataclasses.fields(cls)}


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _all_fields() -> dict[str, dict[str, dataclasses.Field]]:
    """field name -> {policy name: its field}, in POLICIES and field order."""
    out: dict[str, dict[str, dataclasses.Field]] = {}
    for name in POLICIES:
        for field_name, f in knobs(name).items():
            out.setdefault(field_name, {})[name] = f
    return out


def _help(per_policy: dict[str, dataclasses.Field]) -> str:
    """'fastv: <help> (default 0.5); pvtp, st3: <help> (default 0.3)', merging policies that agree."""
    groups: dict[tuple, list[str]] = {}
    for name, f in per_policy.items():
        groups.setdefault((f.metadata.get("help", ""), f.default), []).append(name)
    return "; ".join(f"{', '.join(names)}: {text} (default {default})" for (text, default), names in groups.items())


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per policy field (default None = the policy's own default) in a 'policy knobs' group."""
    group = parser.add_argument_group("policy knobs", "each applies to the chosen policies that have it")
    for field_name, per_policy in _all_fields().items():
        f = next(iter(per_policy.values()))
        group.add_argument(flag(field_name), dest=field_name, type=TYPES[f.type], default=None,
                           choices=f.metadata.get("choices"), help=_help(per_policy))


def policy_params_from_args(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Per policy in `names`, the knobs given on the command line that it has.

    ValueError for a knob that none of them has. Names that are not policies (the bench's `hf`) get {}.
    """
    out: dict[str, dict] = {name: {} for name in names}
    for field_name, per_policy in _all_fields().items():
        value = getattr(args, field_name, None)
        if value is None:
            continue
        takers = [n for n in names if field_name in knobs(n)]
        if not takers:
            chosen = f"policy {names[0]!r}" if len(names) == 1 else f"any of the policies {', '.join(names)}"
            raise ValueError(f"{flag(field_name)} does not apply to {chosen} (it is a knob of "
                             f"{', '.join(per_policy)})")
        for n in takers:
            out[n][field_name] = value
    return out


def policy_from_args(args: argparse.Namespace, name: str | None = None) -> Full:
    """The policy `name` (default `args.policy`) with the knobs given; ValueError for one it lacks."""
    name = args.policy if name is None else name
    if name.lower() not in POLICIES:
        return make_policy(name)  # raises the engine's "unknown policy" error
    return make_policy(name, **policy_params_from_args(args, [name])[name])


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """'st3:ratio=0.5,anneal_floor=0.2' -> ('st3', {'ratio': 0.5, 'anneal_floor': 0.2}), typed by the fields.

    Keys are field names (dashes work too); ValueError for an unknown policy, key or unreadable value.
    """
    name, _, rest = spec.strip().partition(":")
    fields = knobs(name)
    if not fields:
        make_policy(name)  # raises the engine's "unknown policy" error
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"policy {name!r} has no knob {key!r} (its knobs: {', '.join(fields) or 'none'})")
        if not eq:
            raise ValueError(f"{key} needs a value: {key}=VALUE")
        kind = TYPES[fields[key].type]
        try:
            params[key] = kind(text.strip())
        except ValueError:
            raise ValueError(f"{key} must be {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}") from None
    return name, params
