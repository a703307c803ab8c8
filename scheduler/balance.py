"""The hybrid data-parallel balance scheduler: which ranks each sequence of a step runs on.

Hybrid data parallelism (after ByteScale) gives each sequence of a global batch just as
many ranks of the dp × cp space as it needs: a short one runs whole on one rank (data
parallel), a long one is split over an aligned block of g ranks with context parallelism
(the zig-zag split, which keeps causal attention work equal on every rank of the block).
This module decides, per step and from the lengths alone, the block size of every
sequence and the rank of every whole one, so that the estimated work per rank is as even
as possible and no rank holds more tokens than its budget.

**Work.** A sequence of L tokens costs ``a·L + b·L²`` seconds whole (the linear layers,
then attention); split over g ranks, each rank does ``a·L/g + b·L²·(2g+1)/(2g²)`` (its two
zig-zag chunks of L/2g queries score every key up to each chunk, (2g+1)·L²/4g² scores against
the L²/2 of causal attention on one rank) plus the context
parallel exchange of K and V, ``c·L·(g−1)/g``; every forward call costs ``e`` more (a split
sequence's share is a call; a rank's whole sequences share rows of up to the budget)
(:class:`Cost`; ``a``, ``b`` and ``e`` are fitted on the device, ``c`` from the bytes).

**Scheduling.**

1. A sequence's block is the smallest power of two g that holds it (``L/g ≤ budget``)
   and whose share of work (:meth:`Cost.split`) is at most the mean work per rank of the
   whole step: a sequence that would alone outlast the others is split further.
2. Split sequences are placed first, longest first, each on the aligned block of g ranks
   whose busiest rank is least loaded (blocks are aligned so that groups nest like the
   cp groups of a static mesh).
3. Whole sequences follow, longest first, each on the least-loaded rank with room for its
   tokens (Graham's longest-processing-time rule: within 4/3 of the best makespan); a
   sequence that fits on no rank is split over two ranks instead, then four, and so on.

The plan is a pure function of its inputs, so every rank computes the same one without a
collective.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from plait.errors import PlaitError


class BalanceError(PlaitError):
    """A step's sequences cannot be placed: the message names the sequence and what would hold it."""


@dataclass(frozen=True)
class Cost:
    """Seconds of one sequence of L tokens: ``a·L + b·L²`` whole; split over g ranks, each rank's
    ``a·L/g + b·L²·(2g+1)/(2g²) + c·L·(g−1)/g + e`` (the zig-zag share's attention scores every key up to each
    of its two chunks); and ``e`` for every forward call a rank makes (a split sequence's share is one call; a
    rank's whole sequences share rows of up to the token budget, one call each)."""

    a: float
    b: float
    c: float = 0.0
    e: float = 0.0

    def whole(self, length: int) -> float:
        return self.a * length + self.b * length * length

    def split(self, length: int, g: int) -> float:
        if g == 1:
            return self.whole(length)
        return (self.a * length / g + self.b * length * length * (2 * g + 1) / (2 * g * g)
                + self.c * length * (g - 1) / g + self.e)


def fit_cost(samples: Sequence[tuple[int | Sequence[int], float]], c: float = 0.0) -> Cost:
    """The :class:`Cost` whose ``e + a·ΣL + b·ΣL²`` fits measured (lengths of one call, seconds) best in least
    squares, with e, a and b ≥ 0 (a sample's lengths: one sequence, or the documents of a packed row).
    """
    rows = [([x] if isinstance(x, int) else list(x), t) for x, t in samples]
    if len({tuple(lengths) for lengths, _ in rows}) < 2:
        raise BalanceError("cost samples: need at least two different lengths to fit a·L + b·L²")
    e, a, b = fit_terms([((1.0, float(sum(ls)), float(sum(n * n for n in ls))), t) for ls, t in rows])
    return Cost(a=a, b=b, c=c, e=e)


def fit_terms(samples: Sequence[tuple[Sequence[float], float]]) -> tuple[float, float, float]:
    """``(e, a, b) ≥ 0`` fitting ``seconds ≈ e·calls + a·(a-term) + b·(b-term)`` over (terms, seconds) samples
    in least squares (a sample: one call, or a rank's calls of a step, see :func:`calls_terms`).

    Non-negative least squares by trying every subset of the three terms and keeping the best fit whose
    coefficients are all non-negative; the fewer terms win a tie.
    """
    design = [[float(v) for v in terms] for terms, _ in samples]
    target = [float(t) for _, t in samples]
    scale = [max(abs(r[j]) for r in design) or 1.0 for j in range(3)]
    best: tuple[float, list[float]] | None = None
    for subset in ((1,), (2,), (0,), (1, 2), (0, 1), (0, 2), (0, 1, 2)):
        coef = _least_squares([[r[j] / scale[j] for j in subset] for r in design], target)
        if coef is None or any(v < 0 for v in coef):
            continue
        full = [0.0, 0.0, 0.0]
        for j, v in zip(subset, coef):
            full[j] = v / scale[j]
        residual = sum((sum(f * x for f, x in zip(full, r)) - t) ** 2 for r, t in zip(design, target))
        if best is None or residual < best[0] * (1 - 1e-9):
            best = (residual, full)
    e, a, b = best[1] if best is not None else (0.0, 0.0, 0.0)
    return e, a, b


def calls_terms(calls: Sequence[tuple[int, tuple[int, ...], bool] | None], lengths: Sequence[int],
                window: int | None = None) -> tuple[float, float, float, float]:
    """The terms :class:`Cost` multiplies for one rank's calls: (calls, a-term, b-term, c-term), so that its work
    is ``e·calls + a·(a-term) + b·(b-term) + c·(c-term)``. A call is (block size g, its sequences, packed) or
    None (a lockstep padding call: one call, no tokens); a packed window of documents is costed like
    :func:`static_plan` (``window`` tokens, split over g)."""
    n = ta = tb = tc = 0.0
    for call in calls:
        n += 1
        if call is None:
            continue
        g, sequences, packed = call
        if g == 1:
            ta += sum(lengths[i] for i in sequences)
            tb += sum(lengths[i] ** 2 for i in sequences)
            continue
        for i in sequences:
            length = lengths[i]
            ta += length / g
            within = packed and length <= (window or 0) // (2 * g)
            tb += length * length / g if within else length * length * (2 * g + 1) / (2 * g * g)
            tc += length * (g - 1) / g
    return n, ta, tb, tc


def _least_squares(x: list[list[float]], y: list[float]) -> list[float] | None:
    """Solve the normal equations of x·β ≈ y (columns pre-scaled); None when they are singular."""
    k = len(x[0])
    m = [[sum(r[i] * r[j] for r in x) for j in range(k)] + [sum(r[i] * t for r, t in zip(x, y))] for i in range(k)]
    for col in range(k):  # Gauss-Jordan with partial pivoting on a k ≤ 3 system
        pivot = max(range(col, k), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12 * max(1.0, max(abs(v) for row in m for v in row[:k])):
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(k):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [v - f * w for v, w in zip(m[r], m[col])]
    return [m[i][k] / m[i][i] for i in range(k)]


@dataclass(frozen=True)
class Group:
    """Ranks ``start … start+size−1`` run ``sequences`` (indices into the step's lengths): whole on one rank
    when ``size == 1``; else split over the block, each on its own (hybrid DP gives a split sequence a block
    of its own) or, ``packed``, as one window of documents (a static mesh's)."""

    start: int
    size: int
    sequences: tuple[int, ...]
    packed: bool = False  # the sequences form one window split over the block (a static mesh's)

    @property
    def ranks(self) -> range:
        return range(self.start, self.start + self.size)


@dataclass
class Plan:
    """Where a step's sequences run, and the work and tokens it puts on each rank."""

    groups: list[Group]
    load: list[float]  # predicted seconds per rank
    tokens: list[int]  # tokens per rank
    blocks: dict[int, int] = field(default_factory=dict)  # sequence → its block size (1: whole)

    @property
    def imbalance(self) -> float:
        """Busiest rank's predicted work over the mean (1.0 is perfect balance)."""
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean > 0 else 1.0

    def rank_of(self, sequence: int) -> range:
        """The ranks sequence ``sequence`` runs on."""
        for group in self.groups:
            if sequence in group.sequences:
                return group.ranks
        raise KeyError(sequence)


def _check(lengths: Sequence[int], ranks: int, budget: int) -> None:
    if type(ranks) is not int or ranks < 1:
        raise BalanceError(f"ranks: got {ranks!r}; accepted: a positive number of ranks in the dp × cp space")
    if type(budget) is not int or budget < 1:
        raise BalanceError(f"token budget: got {budget!r}; accepted: a positive number of tokens one rank may hold")
    for i, length in enumerate(lengths):
        if type(length) is not int or length < 1:
            raise BalanceError(f"sequence {i}: length {length!r}; accepted: a positive number of tokens")
    if (ranks & (ranks - 1)) != 0:
        raise BalanceError(f"ranks: got {ranks}; the zig-zag blocks are powers of two, so the dp × cp space must be "
                           f"one too (e.g. {1 << (ranks.bit_length() - 1)} or {1 << ranks.bit_length()})")


def _block(length: int, budget: int) -> int:
    """Smallest power of two g with length / g ≤ budget."""
    g = 1
    while length > g * budget:
        g *= 2
    return g


def balance(lengths: Sequence[int], ranks: int, cost: Cost, *, budget: int, capacity: int | None = None) -> Plan:
    """The step's plan: every sequence whole on one rank or split over an aligned power-of-two block.

    ``budget``: the most tokens of one sequence a rank may hold (a sequence is split until its share fits);
    ``capacity``: the most tokens a rank may hold over the whole step (default ``budget``: every rank's
    tokens held at once). A runtime that runs a rank's sequences in several calls of at most ``budget`` tokens
    passes a larger capacity.
    """
    _check(lengths, ranks, budget)
    capacity = budget if capacity is None else capacity
    n = len(lengths)
    total = sum(cost.whole(length) for length in lengths)
    mean = total / ranks
    blocks: dict[int, int] = {}
    for i, length in enumerate(lengths):
        g = _block(length, budget)
        while g < ranks and cost.split(length, g) > mean:
            g *= 2
        if g > ranks:
            raise BalanceError(f"sequence {i}: {length} tokens need {g} ranks of {budget} tokens, the step has "
                               f"{ranks}; shorten data.max_len to at most {ranks * budget} or give each rank more "
                               f"memory")
        blocks[i] = g
    load = [0.0] * ranks
    tokens = [0] * ranks
    groups: list[Group] = []
    order = sorted(range(n), key=lambda i: (-cost.whole(lengths[i]), i))

    def place_split(i: int, g: int) -> bool:
        share = -(-lengths[i] // g)
        best = None
        for start in range(0, ranks, g):
            block = range(start, start + g)
            if any(tokens[r] + share > capacity for r in block):
                continue
            busiest = max(load[r] for r in block)
            if best is None or busiest < best[0]:
                best = (busiest, start)
        if best is None:
            return False
        work = cost.split(lengths[i], g)
        for r in range(best[1], best[1] + g):
            load[r] += work
            tokens[r] += share
        groups.append(Group(best[1], g, (i,)))
        blocks[i] = g
        return True

    whole = []
    for i in order:
        if blocks[i] > 1:
            if not place_split(i, blocks[i]):
                _split_further(i, blocks[i], ranks, lengths, capacity, place_split)
        else:
            whole.append(i)
    # Whole sequences, longest first, on the least-loaded rank with room (a heap of (load, rank)).
    heap = [(load[r], r) for r in range(ranks)]
    heapq.heapify(heap)
    on_rank: dict[int, list[int]] = {}
    rows: dict[int, list[int]] = {}  # tokens in each of a rank's rows of whole sequences (filled first-fit)
    for i in whole:
        length = lengths[i]
        skipped = []
        while heap and tokens[heap[0][1]] + length > capacity:
            skipped.append(heapq.heappop(heap))
        if not heap:
            for item in skipped:
                heapq.heappush(heap, item)
            _split_further(i, 1, ranks, lengths, capacity, place_split)
            heap = [(load[r], r) for r in range(ranks)]
            heapq.heapify(heap)
            continue
        _, r = heapq.heappop(heap)
        held = rows.setdefault(r, [])
        k = next((k for k, n in enumerate(held) if n + length <= budget), None)
        if k is None:  # a new row of whole sequences: one more call
            load[r] += cost.e
            held.append(0)
            k = len(held) - 1
        held[k] += length
        load[r] += cost.whole(length)
        tokens[r] += length
        on_rank.setdefault(r, []).append(i)
        heapq.heappush(heap, (load[r], r))
        for item in skipped:
            heapq.heappush(heap, item)
    groups += [Group(r, 1, tuple(seqs)) for r, seqs in sorted(on_rank.items())]
    groups.sort(key=lambda g: (g.start, -g.size, g.sequences))
    return Plan(groups=groups, load=load, tokens=tokens, blocks=blocks)


def _split_further(i: int, g: int, ranks: int, lengths: Sequence[int], budget: int, place) -> None:
    """Place sequence i on ever larger blocks until one has room; a step that cannot hold it is an error."""
    while g < ranks:
        g *= 2
        if place(i, g):
            return
    raise BalanceError(f"sequence {i}: {lengths[i]} tokens find no block of ranks with room under a budget of "
                       f"{budget} tokens per rank beside the step's other sequences; lower train.global_batch or "
                       f"raise the budget")


def static_plan(lengths: Sequence[int], ranks: int, cp: int, cost: Cost, *, window: int | None = None) -> Plan:
    """A static dp × cp mesh, the baseline: documents packed in batch order into windows of ``window`` tokens
    (default: the longest sequence), the windows dealt in turn to the ``ranks // cp`` data-parallel replicas,
    each window split over its replica's cp ranks whatever its documents' lengths.

    This is how fixed-mesh trainers feed variable-length data: every replica runs windows of one size, so
    tokens per rank are even but attention work (Σ L² of the documents in its windows) is not, and every
    document, however short, pays for the context-parallel exchange. Each window is one :class:`Group` with
    ``packed=True`` (its documents attend only to themselves).
    """
    if ranks % cp:
        raise BalanceError(f"cp: got {cp}; it must divide the {ranks} ranks")
    window = window or max(lengths)
    if max(lengths) > window:
        raise BalanceError(f"window: {window} tokens cannot hold a sequence of {max(lengths)}")
    windows: list[list[int]] = []
    held = 0
    for i, length in enumerate(lengths):
        if not windows or held + length > window:
            windows.append([])
            held = 0
        windows[-1].append(i)
        held += length
    replicas = ranks // cp
    load = [0.0] * ranks
    tokens = [0] * ranks
    groups = []
    for w, members in enumerate(windows):
        d = w % replicas
        size = sum(lengths[i] for i in members)
        work = (sum(_in_window(cost, lengths[i], cp, window) for i in members)
                + (cost.c * size * (cp - 1) / cp if cp > 1 else 0.0) + cost.e)  # one call per window
        for r in range(d * cp, (d + 1) * cp):
            load[r] += work
            tokens[r] += -(-size // cp)
        groups.append(Group(d * cp, cp, tuple(members), packed=True))
    return Plan(groups=groups, load=load, tokens=tokens, blocks={i: cp for i in range(len(lengths))})


def _in_window(cost: Cost, length: int, cp: int, window: int) -> float:
    """One rank's mean work for a document of a window split zig-zag over cp ranks: a document longer than a
    chunk (window / 2cp) is attended like a split sequence; a shorter one lies within one chunk, whole on one
    rank (a cp-th of it on average)."""
    if cp == 1 or length <= window // (2 * cp):
        return cost.whole(length) / cp
    return cost.split(length, cp) - cost.c * length * (cp - 1) / cp - cost.e

