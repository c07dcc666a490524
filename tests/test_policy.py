"""Policy objects: what their cached answers hand out cannot change the next answer."""
from __future__ import annotations

from scheduler.policy import PVTP, ST3, FastV


def test_budgets_are_fresh_copies():
    for policy in (FastV(), PVTP(), ST3()):
        first = policy.budgets(576, 32)
        first[:] = [0] * len(first)
        first.append(-1)
        assert policy.budgets(576, 32) == type(policy)().budgets(576, 32)
        assert policy.budgets(576, 32)[0] == 576 and len(policy.budgets(576, 32)) == 32


def test_decode_budgets_are_fresh_copies():
    policy = ST3(anneal_steps=8)
    first = policy.decode_budgets(576, 32, 4)
    expected = dict(first)
    first.clear()
    first[99] = 1
    assert policy.decode_budgets(576, 32, 4) == expected
    assert policy.decode_budgets(576, 32, 4) is not policy.decode_budgets(576, 32, 4)
