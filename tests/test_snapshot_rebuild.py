"""Rebuilding a lost node's blob: a bad piece is ruled out and a spare survivor used (m = 2); real daemons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_snapshot_daemon import Cluster, _blob

from plait.runtime.snapshot import shm
from plait.runtime.snapshot.layout import GroupLayout
from plait.runtime.snapshot.records import version_id
from plait.runtime.snapshot.trainer.restore import Planner, RestoreError, rebuild_blob


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("rebuild"), nnodes=4, nproc=1, k=2, m=2)
    yield cluster
    cluster.close()


def _corrupt(path: str) -> None:
    view = shm.map_segment(Path(path), Path(path).stat().st_size)
    view[view.numel() // 2] ^= 0xFF


def test_one_bad_parity_piece_is_ruled_out_not_the_version(four):
    """Defect: one bad parity piece discarded the whole version, though m = 2 left a spare."""
    cluster = four
    v = version_id(1, 10)
    blobs = {node: _blob(5000 + 100 * node, node) for node in range(4)}
    for node, blob in blobs.items():
        cluster.write(node, v, 0, blob)
    cluster.wait_complete(v)
    listing = {node: {info.version: info for info in cluster.clients[node].list()} for node in range(4)}
    listing[0] = {}  # node 0 is lost: its blob must be decoded from the survivors
    planner = Planner(listing, layout=GroupLayout(2, 2), world=4, per_node=1)
    pieces = planner.rebuild_pieces(v, 0, 0)
    assert pieces is not None and all(len(have) >= 3 for _, have in pieces)  # k = 2 needed, 3 survivors each
    # Candidates are read in order, data survivors first: corrupt the first parity piece chunk 0 would use.
    stripe, have = pieces[0]
    idx, holder = next((i, h) for i, h in have[:2] if i >= 2)
    parity = next(p for p in listing[holder][v].parity if p.stripe == stripe and p.index == idx - 2)
    _corrupt(parity.path)
    notes: list[str] = []
    got = rebuild_blob(planner, v, 0, 0, cluster.clients, notes)
    assert torch.equal(got, blobs[0])
    assert any("ruled out piece" in n and f"node {holder}" in n for n in notes), notes


def test_a_rebuild_without_enough_good_pieces_fails_clearly(four):
    cluster = four
    v = version_id(1, 20)
    blobs = {node: _blob(3000, 10 + node) for node in range(4)}
    for node, blob in blobs.items():
        cluster.write(node, v, 0, blob)
    cluster.wait_complete(v)
    listing = {node: {info.version: info for info in cluster.clients[node].list()} for node in range(4)}
    listing[0] = {}
    planner = Planner(listing, layout=GroupLayout(2, 2), world=4, per_node=1)
    for node in (1, 2, 3):  # every parity piece of the group bad: chunk 0 cannot get k good pieces
        for p in listing[node][v].parity:
            _corrupt(p.path)
    with pytest.raises(RestoreError, match="pieces needed passed their checks"):
        rebuild_blob(planner, v, 0, 0, cluster.clients, [])
