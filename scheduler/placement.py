"""Which node each rank runs on: ``parallel.placement``.

A rank is a position in the parallel layout (:class:`~plait.scheduler.dims.ParallelDims`
numbers tp fastest, so neighbouring ranks share the fastest links). A node runs
``per_node`` workers; which layout ranks they hold is the placement, a list with one node
per rank. The default puts ranks ``R·P … R·P+P-1`` on node R; a planner that sees slow
or mixed NICs chooses another, e.g. keeping an expert-parallel group off the node with
the slowest link.

A worker knows only its node and its local index there (its elastic agent's node rank and
``LOCAL_RANK``); :meth:`Placement.rank_of` turns those into its layout rank, which is the
rank it joins the process group with.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from plait.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """``nodes[r]`` is the node of layout rank ``r``; every node holds ``per_node`` ranks."""

    nodes: tuple[int, ...]
    per_node: int

    @classmethod
    def contiguous(cls, world: int, per_node: int) -> Placement:
        return cls(tuple(r // per_node for r in range(world)), per_node)

    @classmethod
    def resolve(cls, placement: list[int] | None, *, world: int, nnodes: int) -> Placement:
        """The configured placement, checked against the world size and node count; the default when None."""
        per_node = world // nnodes
        if placement is None:
            return cls.contiguous(world, per_node)
        key = "parallel.placement"
        example = [r // per_node for r in range(world)]
        if not isinstance(placement, list) or any(type(n) is not int for n in placement):
            raise ConfigError(key, placement, f"accepted: a list of node numbers, one per rank, e.g. {example}")
        if len(placement) != world:
            raise ConfigError(key, placement, f"needs one node per rank: {world} entries, got {len(placement)}",
                              hint=f"e.g. {example}")
        outside = sorted({n for n in placement if not 0 <= n < nnodes})
        if outside:
            raise ConfigError(key, placement, f"names node(s) {outside}; the job has nodes 0..{nnodes - 1}")
        counts = Counter(placement)
        uneven = {n: counts.get(n, 0) for n in range(nnodes) if counts.get(n, 0) != per_node}
        if uneven:
            text = ", ".join(f"node {n}: {c}" for n, c in sorted(uneven.items()))
            raise ConfigError(key, placement, f"every node runs {per_node} workers, so it must hold exactly "
                              f"{per_node} ranks ({text})")
        return cls(tuple(placement), per_node)

    @property
    def world(self) -> int:
        return len(self.nodes)

    @property
    def is_contiguous(self) -> bool:
        return all(n == r // self.per_node for r, n in enumerate(self.nodes))

    def node_of(self, rank: int) -> int:
        return self.nodes[rank]

    def ranks_on(self, node: int) -> list[int]:
        """The layout ranks node ``node`` runs, in local-index order."""
        return [r for r, n in enumerate(self.nodes) if n == node]

    def local_of(self, rank: int) -> int:
        """The index of ``rank`` among its node's ranks (its worker's ``LOCAL_RANK``)."""
        return self.ranks_on(self.nodes[rank]).index(rank)

    def rank_of(self, node: int, local: int) -> int:
        ranks = self.ranks_on(node)
        if not 0 <= local < len(ranks):
            raise ValueError(f"node {node} runs {len(ranks)} workers; local index {local} is outside")
        return ranks[local]

    def slot(self, rank: int) -> int:
        """``node·per_node + local``: where the rank's worker sits, whatever its layout rank."""
        return self.node_of(rank) * self.per_node + self.local_of(rank)

    def describe(self) -> str:
        return "; ".join(f"node {n}: ranks {self.ranks_on(n)}" for n in sorted(set(self.nodes)))
