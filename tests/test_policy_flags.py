"""One definition of the policy knobs: engine.generate, tools.bench and tools.demo.eval_vqa build them from the
policy dataclasses, spell them the same, and reject a knob that no chosen policy has."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from engine.generate import build_parser as generate_parser
from engine.policy_flags import (add_policy_arguments, parse_policy_spec, policy_from_args,
                                 policy_params_from_args)
from scheduler.policy import CURVES, POLICIES, ST3, FastV, Full
from tools.bench.serving import build_parser as bench_parser

FIELDS = {f.name: f for cls in POLICIES.values() for f in dataclasses.fields(cls)}


def parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="full")
    add_policy_arguments(ap)
    return ap.parse_args(argv)


def knob_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.option_strings[0] for a in parser._actions if a.dest in FIELDS}


def test_one_flag_per_field_with_its_type_default_and_help():
    ap = argparse.ArgumentParser()
    add_policy_arguments(ap)
    actions = {a.dest: a for a in ap._actions if a.dest != "help"}
    assert set(actions) == set(FIELDS) == {"layer", "ratio", "min_keep", "start_layer", "stride", "anneal_steps",
                                           "anneal_floor", "anneal_curve"}
    for name, f in FIELDS.items():
        a = actions[name]
        assert a.option_strings == ["--" + name.replace("_", "-")] and a.default is None
        assert a.type.__name__ == f.type and f.metadata["help"] in a.help and str(f.default) in a.help
    assert tuple(actions["anneal_curve"].choices) == CURVES
    assert "fastv" in actions["ratio"].help and "pvtp, st3" in actions["ratio"].help   # two meanings, both said


def test_the_clis_spell_the_knobs_the_same():
    expected = {name: "--" + name.replace("_", "-") for name in FIELDS}
    assert knob_options(generate_parser()) == expected
    assert knob_options(bench_parser()) == expected
    # eval_vqa's specs take the same names (dashes or underscores).
    assert parse_policy_spec("st3:start-layer=1,anneal_floor=0.25") == ("st3", {"start_layer": 1, "anneal_floor": 0.25})


def test_policy_from_args_builds_the_chosen_policy():
    assert policy_from_args(parse("--policy", "st3", "--ratio", "0.5", "--anneal-curve", "cosine")) == \
        ST3(ratio=0.5, anneal_curve="cosine")
    assert policy_from_args(parse("--policy", "FastV", "--layer", "1", "--ratio", "0.9")) == FastV(layer=1, ratio=0.9)
    assert policy_from_args(parse()) == Full()


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "0.5"], "--ratio does not apply to policy 'full' (it is a knob of fastv, pvtp, st3)"),
    (["--policy", "pvtp", "--anneal-steps", "3"], "--anneal-steps does not apply to policy 'pvtp'"),
    (["--policy", "st3", "--layer", "3"], "--layer does not apply to policy 'st3' (it is a knob of fastv)"),
    (["--policy", "nope"], "unknown policy 'nope'")])
def test_a_knob_the_policy_lacks_is_an_error(argv, message):
    with pytest.raises(ValueError) as e:
        policy_from_args(parse(*argv))
    assert message in str(e.value)


def test_several_policies_share_a_knob_each_has():
    args = parse("--ratio", "0.5", "--layer", "1", "--anneal-steps", "8")
    assert policy_params_from_args(args, ["full", "fastv", "st3", "hf"]) == {
        "full": {}, "fastv": {"ratio": 0.5, "layer": 1}, "st3": {"ratio": 0.5, "anneal_steps": 8}, "hf": {}}
    with pytest.raises(ValueError, match="--layer does not apply to any of the policies full, pvtp, hf"):
        policy_params_from_args(args, ["full", "pvtp", "hf"])


@pytest.mark.parametrize("spec, message", [
    ("fastv:start_layer=1", "policy 'fastv' has no knob 'start_layer' (its knobs: layer, ratio, min_keep)"),
    ("st3:anneal_steps=2.5", "anneal_steps must be an int, got '2.5'"),
    ("st3:ratio", "ratio needs a value"),
    ("nope:ratio=1", "unknown policy 'nope'")])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError) as e:
        parse_policy_spec(spec)
    assert message in str(e.value)


def test_specs_are_typed_by_the_fields():
    assert parse_policy_spec("full") == ("full", {})
    assert parse_policy_spec("st3:ratio=1,anneal_curve=step") == ("st3", {"ratio": 1.0, "anneal_curve": "step"})
    name, params = parse_policy_spec("fastv:layer=1,ratio=0.97")
    assert isinstance(params["layer"], int) and isinstance(params["ratio"], float)
