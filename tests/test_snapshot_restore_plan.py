"""Rank 0's restore planning: which version, and for each rank local memory or a rebuild (pure logic)."""

from __future__ import annotations

from plait.runtime.snapshot.layout import GroupLayout
from plait.runtime.snapshot.trainer.restore import Planner, _ranks_text
from plait.runtime.snapshot.records import DataShardInfo, MemberInfo, ParityShardInfo, VersionInfo

K, M, NODES, P = 2, 1, 3, 2


def _listing(versions: list[int], *, lost: set[int] = frozenset(), parity_missing: set[tuple[int, int]] = frozenset()):
    """What 3 daemons (k=2, m=1, 2 ranks per node) hold: every version complete, minus lost nodes."""
    L = GroupLayout(K, M)
    listing = {}
    for node in range(NODES):
        held = {}
        if node not in lost:
            for v in versions:
                data = [DataShardInfo(r, 1000 + node, 7, v, True, "", b"") for r in range(P)]
                parity = []
                for r in range(P):
                    for s, j in L.parity_stripes(L.position(node)):
                        if (v, node) in parity_missing:
                            continue
                        members = [MemberInfo(c, L.data_position(s, c), 1000 + L.data_position(s, c), 7, 512, 9, v) for c in range(K)]
                        parity.append(ParityShardInfo(r, s, j, 512, 5, True, "", members))
                held[v] = VersionInfo(v, v, True, False, data, parity)
        listing[node] = held
    return listing


def test_every_rank_restores_locally_when_nothing_was_lost():
    plan = Planner(_listing([4, 6]), layout=GroupLayout(K, M), world=NODES * P, per_node=P).choose()
    assert plan == (6, {r: "local" for r in range(NODES * P)})


def test_a_lost_node_is_rebuilt_from_the_survivors():
    planner = Planner(_listing([4, 6], lost={1}), layout=GroupLayout(K, M), world=NODES * P, per_node=P)
    version, sources = planner.choose()
    assert version == 6 and [r for r, s in sources.items() if s == "rebuild"] == [2, 3]
    pieces = planner.rebuild_pieces(6, 1, 0)
    assert len(pieces) == K and all(len(have) == K and all(node != 1 for _, node in have) for _, have in pieces)
    assert planner.member_meta(6, 1, 0).size == 1001  # the lost blob's size, known from the parity holders


def test_more_losses_than_parity_leave_no_in_memory_version():
    planner = Planner(_listing([4, 6], lost={0, 2}), layout=GroupLayout(K, M), world=NODES * P, per_node=P)
    assert planner.choose() is None


def test_an_incomplete_newest_version_falls_back_to_the_previous_one():
    listing = _listing([4, 6], lost={1}, parity_missing={(6, 0), (6, 2)})  # version 6's parity never completed
    planner = Planner(listing, layout=GroupLayout(K, M), world=NODES * P, per_node=P)
    assert planner.choose()[0] == 4


def test_a_shard_that_failed_its_checksum_is_rebuilt_instead():
    planner = Planner(_listing([6]), layout=GroupLayout(K, M), world=NODES * P, per_node=P)
    planner.bad_data.add((6, 2, 1))  # node 2, local rank 1 = rank 5
    version, sources = planner.choose()
    assert version == 6 and sources[5] == "rebuild" and all(s == "local" for r, s in sources.items() if r != 5)
    planner.bad_versions.add(6)
    assert planner.choose() is None


def test_rank_ranges_read_well():
    assert _ranks_text([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and _ranks_text([]) == "none"
