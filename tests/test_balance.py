"""The hybrid data-parallel balance scheduler: every sequence placed once, within budget, balanced, and never
worse than a static dp × cp mesh; checked against brute force on small steps."""

from __future__ import annotations

import itertools
import random

import pytest

from plait.scheduler.balance import BalanceError, Cost, balance, fit_cost, static_plan

COST = Cost(a=1.0, b=1 / 4096, c=0.05)  # attention equals the linear layers at 4,096 tokens


def pareto(n: int, seed: int, shape: float = 1.2, low: int = 128, high: int = 32768) -> list[int]:
    rng = random.Random(seed)
    return [min(high, int(low * rng.paretovariate(shape))) for _ in range(n)]


def check_plan(lengths, ranks, budget, plan):
    seen = sorted(i for g in plan.groups for i in g.sequences)
    assert seen == list(range(len(lengths)))
    tokens = [0] * ranks
    for g in plan.groups:
        assert g.size & (g.size - 1) == 0 and g.start % g.size == 0 and g.start + g.size <= ranks
        if g.size > 1:
            assert len(g.sequences) == 1
        for i in g.sequences:
            for r in g.ranks:
                tokens[r] += -(-lengths[i] // g.size)
    assert tokens == plan.tokens and max(tokens) <= budget


@pytest.mark.parametrize("seed", range(5))
def test_every_sequence_runs_once_within_the_budget_on_aligned_blocks(seed):
    lengths = pareto(300, seed) + [60_000]  # one longer than a rank holds
    plan = balance(lengths, 8, COST, budget=40_000)
    check_plan(lengths, 8, 40_000, plan)
    assert plan.blocks[300] >= 2
    assert any(g.size > 1 for g in plan.groups)  # the long tail is split
    assert sum(1 for g in plan.groups if g.size == 1) >= 4  # the short ones run whole


@pytest.mark.parametrize("seed", range(5))
def test_a_long_tailed_step_is_balanced_and_beats_a_static_mesh(seed):
    lengths = pareto(512, seed)
    plan = balance(lengths, 8, COST, budget=64_000)
    check_plan(lengths, 8, 64_000, plan)
    assert plan.imbalance <= 1.10
    # the static mesh sized for the longest sequence: cp so that it fits the same budget
    cp = 1
    while max(lengths) > cp * 64_000:
        cp *= 2
    for cp in sorted({cp, 2, 4}):
        static = static_plan(lengths, 8, cp, COST)
        assert max(plan.load) < max(static.load)


def makespan_optimum(works: list[float], ranks: int) -> float:
    best = float("inf")
    for assignment in itertools.product(range(ranks), repeat=len(works)):
        load = [0.0] * ranks
        for w, r in zip(works, assignment):
            load[r] += w
        best = min(best, max(load))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_whole_sequences_are_within_four_thirds_of_the_best_makespan(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(100, 3000) for _ in range(7)]
    cost = Cost(a=1.0, b=0.0)
    budget = sum(lengths)  # tokens never bind; a sequence is split only if it alone outlasts the mean
    plan = balance(lengths, 2, Cost(a=1.0, b=0.0), budget=budget)
    if all(g.size == 1 for g in plan.groups):
        assert max(plan.load) <= 4 / 3 * makespan_optimum([cost.whole(x) for x in lengths], 2) + 1e-9
    plan3 = balance(lengths, 4, cost, budget=budget)
    check_plan(lengths, 4, budget, plan3)


def test_a_sequence_longer_than_a_rank_holds_is_split_over_just_enough_ranks():
    lengths = [1000] * 12 + [9000]
    plan = balance(lengths, 8, Cost(a=1.0, b=0.0), budget=4000)
    assert plan.blocks[12] == 4  # 9000 tokens: 3 ranks would do, blocks are powers of two
    check_plan(lengths, 8, 4000, plan)
    assert all(plan.blocks[i] == 1 for i in range(12))


def test_a_sequence_that_would_outlast_the_step_is_split_although_it_fits():
    lengths = [64] * 16 + [4000]
    plan = balance(lengths, 4, Cost(a=1.0, b=1e-3), budget=10_000)
    assert plan.blocks[16] == 4
    assert all(plan.blocks[i] == 1 for i in range(16))


def test_the_plan_depends_on_the_lengths_alone():
    lengths = pareto(200, 7)
    a, b = balance(lengths, 8, COST, budget=40_000), balance(list(lengths), 8, COST, budget=40_000)
    assert a.groups == b.groups and a.load == b.load


def test_bad_steps_are_named():
    with pytest.raises(BalanceError, match=r"sequence 1: 50000 tokens need 8 ranks .* has 4"):
        balance([10, 50_000], 4, COST, budget=8000)
    with pytest.raises(BalanceError, match=r"ranks: got 6; .*powers of two.*4 or 8"):
        balance([10], 6, COST, budget=100)
    with pytest.raises(BalanceError, match=r"token budget: got 0"):
        balance([10], 4, COST, budget=0)
    with pytest.raises(BalanceError, match=r"sequence 0: length 0"):
        balance([0], 4, COST, budget=10)
    with pytest.raises(BalanceError, match=r"no block of ranks with room"):
        balance([4000] * 5, 4, Cost(a=1.0, b=0.0), budget=4000)


def test_the_cost_fit_recovers_a_and_b_and_stays_non_negative():
    truth = Cost(a=2e-6, b=3e-10)
    fit = fit_cost([(L, truth.whole(L)) for L in [128, 256, 512, 1024, 2048, 4096]])
    assert fit.a == pytest.approx(truth.a, rel=1e-6) and fit.b == pytest.approx(truth.b, rel=1e-6)
    linear = fit_cost([(100, 1.0), (200, 2.0), (400, 4.0)])
    assert linear.b == pytest.approx(0.0, abs=1e-12) and linear.a == pytest.approx(0.01)
    # data that would want a negative b: b is clamped to 0 and a refitted alone
    bent = fit_cost([(100, 1.0), (200, 1.9), (400, 3.0)])
    assert bent.b == 0.0 and bent.a > 0
    with pytest.raises(BalanceError, match="two different lengths"):
        fit_cost([(100, 1.0), (100, 1.1)])


def test_the_static_mesh_packs_windows_in_batch_order_and_deals_them_in_turn():
    lengths = [30, 40, 10, 64, 5, 5, 50, 20]
    plan = static_plan(lengths, 4, 2, Cost(a=1.0, b=0.0), window=64)
    assert [g.sequences for g in plan.groups] == [(0,), (1, 2), (3,), (4, 5, 6), (7,)]
    assert [g.start for g in plan.groups] == [0, 2, 0, 2, 0]  # two replicas of cp = 2, in turn
    assert all(g.size == 2 and g.packed for g in plan.groups)
    assert plan.tokens == [57, 57, 55, 55]  # each window's tokens halved (rounded up) on both of its ranks
    with pytest.raises(BalanceError, match="window: 32 tokens cannot hold a sequence of 64"):
        static_plan(lengths, 4, 2, Cost(a=1.0, b=0.0), window=32)


def test_the_cost_fit_tells_a_calls_overhead_from_a_tokens():
    truth = Cost(a=2e-6, b=3e-10, e=0.01)
    rows = [[n] for n in (256, 512, 1024, 2048)] + [[512] * 4, [128] * 16]
    fit = fit_cost([(row, truth.e + sum(truth.whole(n) for n in row)) for row in rows])
    assert fit.e == pytest.approx(truth.e, rel=1e-6) and fit.a == pytest.approx(truth.a, rel=1e-6)
    assert fit.b == pytest.approx(truth.b, rel=1e-6)


def test_every_row_of_whole_sequences_and_every_split_share_is_a_call():
    cost = Cost(a=1.0, b=0.0, e=10.0)
    one_row_each = balance([5, 5, 5, 5], 2, cost, budget=10)
    assert one_row_each.load == [20.0, 20.0]  # 10 tokens and one call per rank
    a_row_per_document = balance([5, 5, 5, 5], 2, cost, budget=5, capacity=100)
    assert a_row_per_document.load == [30.0, 30.0]  # rows of at most 5 tokens: two calls per rank
    split = balance([40], 2, cost, budget=20)
    assert split.load == [30.0, 30.0]  # half the work and the share's call
    # two windows of 10 tokens on the one replica of cp 2: per rank, each window's 5 tokens and a call
    assert static_plan([5, 5, 5, 5], 2, 2, cost, window=10).load == [30.0, 30.0]


def test_rank_steps_summed_into_terms_recover_the_cost():
    """A refit on whole steps: each rank's calls summed into (calls, a-, b-, c-terms); seconds made from a known
    cost come back as that cost."""
    from plait.scheduler.balance import calls_terms, fit_terms
    from plait.scheduler.hdp_calls import rounds

    truth = Cost(a=2e-4, b=3e-8, c=1e-5, e=0.03)
    samples = []
    for seed in range(4):
        lengths = pareto(64, seed, high=16384)
        plan = balance(lengths, 4, truth, budget=4096, capacity=sum(lengths))
        table = rounds(plan, lengths, 4, row_tokens=4096)
        for r in range(4):
            calls = [None if c is None else (c.size, c.sequences, c.packed) for c in table.of(r, lockstep=True)]
            n, ta, tb, tc = calls_terms(calls, lengths)
            assert n == table.count and ta > 0
            # the plan's own load is the same sum, padding calls aside
            assert truth.e * (n - sum(c is None for c in calls)) + truth.a * ta + truth.b * tb + truth.c * tc == \
                pytest.approx(plan.load[r], rel=1e-9)
            samples.append(((n, ta, tb), truth.e * n + truth.a * ta + truth.b * tb))
    e, a, b = fit_terms(samples)
    assert (e, a, b) == pytest.approx((truth.e, truth.a, truth.b), rel=1e-6)


def test_a_packed_window_is_costed_as_the_static_plan_does():
    from plait.scheduler.balance import calls_terms

    lengths = [1000, 100, 60, 2000, 40]
    cost = Cost(a=1e-4, b=1e-8, c=1e-6, e=0.01)
    plan = static_plan(lengths, 4, 2, cost, window=2048)
    for r in range(4):
        calls = [(g.size, g.sequences, g.packed) for g in plan.groups if r in g.ranks]
        n, ta, tb, tc = calls_terms(calls, lengths, window=2048)
        assert cost.e * n + cost.a * ta + cost.b * tb + cost.c * tc == pytest.approx(plan.load[r], rel=1e-9)
