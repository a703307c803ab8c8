"""A hybrid data-parallel step's forward calls, laid out in rounds that every rank computes alike.

A :class:`~plait.scheduler.balance.Plan` says where each sequence runs; this module turns it
into the forward calls each rank of the dp × cp space makes, and into *rounds*: round ``k``
holds at most one call per rank, and every rank of a split call's block makes that call in
the same round.

- A split sequence is one call on every rank of its block; a static mesh's packed window
  (``Group.packed``) is one call with all its documents.
- A rank's whole sequences are packed first-fit, in the plan's order (longest first), into rows
  of at most ``row_tokens`` tokens; each row is one call.
- Split calls take rounds first, in the plan's group order: each the earliest round after
  every member's previous split call. Rows then fill each rank's free rounds in order.

Two ways to run the rounds:

- **Free** (data and tensor parallelism around hybrid DP): a rank makes its own calls in round
  order and skips the empty rounds. Any two split calls that share a rank reach all their
  common members in the same order (their rounds), so blocking collectives cannot deadlock.
- **Lockstep** (expert or pipeline parallelism around it): a collective spans ranks with
  different documents inside every call (the expert all-to-all, or the pipeline's schedule over
  micro-batches), so every rank makes every round, an empty one as a call of a few padding
  tokens without loss. :attr:`Rounds.count` is then the step's number of calls (micro-batches).

Pure Python, no torch: a plan's rounds can be costed before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plait.scheduler.balance import Plan


@dataclass(frozen=True)
class Call:
    """One forward call: ``sequences`` split over ranks ``start … start+size−1`` (``size`` > 1, zig-zag;
    ``packed``: as one window), or packed into one row on rank ``start`` (``size`` == 1)."""

    start: int
    size: int
    sequences: tuple[int, ...]
    packed: bool = False

    @property
    def split(self) -> bool:
        return self.size > 1

    @property
    def ranks(self) -> range:
        return range(self.start, self.start + self.size)


@dataclass(frozen=True)
class Rounds:
    """``table[k][r]``: rank ``r``'s call in round ``k`` (None: none)."""

    table: tuple[tuple[Call | None, ...], ...]

    @property
    def count(self) -> int:
        return len(self.table)

    def of(self, rank: int, *, lockstep: bool = False) -> list[Call | None]:
        """Rank ``rank``'s calls in order: every round's (None where empty) in lockstep, else its own."""
        calls = [row[rank] for row in self.table]
        return calls if lockstep else [c for c in calls if c is not None]

    def empty(self) -> int:
        """Empty slots over all ranks and rounds (the padding calls of a lockstep step)."""
        return sum(c is None for row in self.table for c in row)


def rows_of(sequences: Sequence[int], lengths: Sequence[int], row_tokens: int | None) -> list[tuple[int, ...]]:
    """Whole sequences packed first-fit, in order, into rows of at most ``row_tokens`` tokens (None: one row): the
    packing :func:`~plait.scheduler.balance.balance` charges a call for each row of."""
    rows: list[list[int]] = []
    held: list[int] = []
    for i in sequences:
        n = lengths[i]
        k = next((k for k, h in enumerate(held) if row_tokens is None or h + n <= row_tokens), None)
        if k is None:
            rows.append([])
            held.append(0)
            k = len(rows) - 1
        rows[k].append(i)
        held[k] += n
    return [tuple(r) for r in rows]


def rounds(plan: Plan, lengths: Sequence[int], ranks: int, *, row_tokens: int | None,
           multiple: int = 1) -> Rounds:
    """Lay out ``plan``'s calls in rounds (see the module doc); the count is padded up to a multiple of ``multiple``
    (the interleaved pipeline schedule needs a multiple of pp micro-batches)."""
    if multiple < 1:
        raise ValueError(f"multiple: got {multiple}; accepted: a positive integer")
    slots: list[dict[int, Call]] = [dict() for _ in range(ranks)]
    after = [0] * ranks  # the round after each rank's last split call
    whole: dict[int, list[int]] = {}
    for group in plan.groups:
        if group.start + group.size > ranks:
            raise ValueError(f"group {group} lies outside the {ranks} ranks")
        if group.size == 1:
            whole.setdefault(group.start, []).extend(group.sequences)
            continue
        calls = [group.sequences] if group.packed else [(i,) for i in group.sequences]
        for sequences in calls:
            call = Call(group.start, group.size, sequences, group.packed)
            k = max(after[r] for r in call.ranks)
            for r in call.ranks:
                slots[r][k] = call
                after[r] = k + 1
    for r, sequences in whole.items():
        k = 0
        for row in rows_of(sequences, lengths, row_tokens):
            while k in slots[r]:
                k += 1
            slots[r][k] = Call(r, 1, row)
            k += 1
    count = max((max(s) + 1 for s in slots if s), default=0)
    count = -(-count // multiple) * multiple
    return Rounds(tuple(tuple(slots[r].get(k) for r in range(ranks)) for k in range(count)))
