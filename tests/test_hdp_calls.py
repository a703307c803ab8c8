"""A hybrid data-parallel step's calls in rounds: every sequence in exactly one call, rows within their budget,
a split call in one round on all of its block, and an order that cannot deadlock with blocking collectives."""

from __future__ import annotations

import random

import pytest

from plait.scheduler.balance import Cost, Group, Plan, balance, static_plan
from plait.scheduler.hdp_calls import Call, rounds, rows_of

COST = Cost(a=1.0, b=1 / 4096, c=0.05, e=30.0)


def pareto(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(8192, int(64 * rng.paretovariate(1.2))) for _ in range(n)]


def check(table, plan, lengths, ranks, row_tokens):
    seen: dict[int, set[int]] = {}
    for k, row in enumerate(table.table):
        assert len(row) == ranks
        calls = {c for c in row if c is not None}
        for call in calls:
            # every member of the call's block makes it in this very round, and no one else does
            assert [r for r in range(ranks) if row[r] == call] == list(call.ranks)
            for i in call.sequences:
                seen.setdefault(i, set()).add(k)
            if not call.split:
                assert sum(lengths[i] for i in call.sequences) <= row_tokens or len(call.sequences) == 1
    assert sorted(seen) == list(range(len(lengths))) and all(len(ks) == 1 for ks in seen.values())
    # a sequence runs where the plan put it
    for g in plan.groups:
        for i in g.sequences:
            (k,) = seen[i]
            call = next(c for c in table.table[k] if c is not None and i in c.sequences)
            assert (call.start, call.size) == (g.start, g.size)


def free_order_is_deadlock_free(table, ranks):
    """Blocking collectives: simulate ranks making their own calls in order; a split call completes only when
    every member has reached it."""
    queues = [table.of(r) for r in range(ranks)]
    at = [0] * ranks
    progress = True
    while progress:
        progress = False
        for r in range(ranks):
            if at[r] == len(queues[r]):
                continue
            call = queues[r][at[r]]
            if all(at[m] < len(queues[m]) and queues[m][at[m]] == call for m in call.ranks):
                for m in call.ranks:
                    at[m] += 1
                progress = True
    return all(at[r] == len(queues[r]) for r in range(ranks))


@pytest.mark.parametrize("seed", range(6))
def test_balanced_steps_lay_out_every_sequence_once_in_rounds(seed):
    lengths = pareto(200, seed)
    ranks, budget = 8, 2048
    plan = balance(lengths, ranks, COST, budget=budget, capacity=sum(lengths))
    table = rounds(plan, lengths, ranks, row_tokens=budget)
    check(table, plan, lengths, ranks, budget)
    assert free_order_is_deadlock_free(table, ranks)
    # lockstep: every rank has count calls, the padding ones empty
    assert all(len(table.of(r, lockstep=True)) == table.count for r in range(ranks))
    assert table.empty() == sum(c is None for r in range(ranks) for c in table.of(r, lockstep=True))


def test_static_windows_are_one_call_each():
    lengths = pareto(64, 3)
    plan = static_plan(lengths, 4, 2, COST, window=8192)
    table = rounds(plan, lengths, 4, row_tokens=4096)
    check(table, plan, lengths, 4, 4096)
    windows = [g for g in plan.groups]
    assert sum(1 for row in table.table for c in set(row) if c is not None) == len(windows)
    assert all(c.packed for row in table.table for c in row if c is not None)


def test_nested_blocks_wait_for_each_other_and_rows_fill_the_gaps():
    # rank 0..3: one sequence over all four, then one over ranks 0-1; rank 2 has whole sequences
    plan = Plan(groups=[Group(0, 4, (0,)), Group(0, 2, (1,)), Group(2, 1, (2, 3, 4)), Group(3, 1, (5,))],
                load=[0.0] * 4, tokens=[0] * 4)
    lengths = [400, 200, 30, 30, 30, 50]
    table = rounds(plan, lengths, 4, row_tokens=64)
    assert table.table[0] == (Call(0, 4, (0,)),) * 4
    assert table.table[1][:2] == (Call(0, 2, (1,)),) * 2
    # rank 2's rows: (2, 3) then (4,), in its free rounds 1 and 2; rank 3's single row in round 1
    assert [table.table[k][2] for k in range(3)] == [Call(0, 4, (0,)), Call(2, 1, (2, 3)), Call(2, 1, (4,))]
    assert table.table[1][3] == Call(3, 1, (5,)) and table.table[2][3] is None
    assert table.count == 3 and table.empty() == 3  # ranks 0, 1 and 3 idle in round 2
    assert rounds(plan, lengths, 4, row_tokens=64, multiple=2).count == 4


def test_rows_pack_in_order_within_their_tokens():
    assert rows_of([0, 1, 2, 3], [10, 20, 40, 5], 32) == [(0, 1), (2,), (3,)]
    assert rows_of([0, 1, 2, 3], [20, 25, 10, 5], 32) == [(0, 2), (1, 3)]  # first fit, not next fit
    assert rows_of([0, 1, 2], [10, 20, 40], None) == [(0, 1, 2)]
    with pytest.raises(ValueError, match="multiple"):
        rounds(Plan(groups=[], load=[0.0], tokens=[0]), [], 1, row_tokens=8, multiple=0)
