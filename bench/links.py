"""A cluster file's rehearsal links as gloo sees them: send and all_reduce bandwidth, and round trips.

``plait bench links --cluster FILE`` (needs root) builds FILE's rehearsal network (with a watchdog, and
torn down at the end) and, for every pair of NIC classes in it (a class with itself when two nodes have
it; the first nodes of each class), runs two gloo processes, one in each node's namespace, that measure:

* **send**: payload bit/s of point-to-point sends a → b, a few MB each (sized from the shaped rate),
  repeated for about 2 s (``--quick``: 1 s) after a warm-up, timed on the receiver;
* **all_reduce**: bus bandwidth of all_reduce between the two (size × 2(n-1)/n per op, for n = 2 the
  bytes each rank sends);
* **round trip**: mean time of a 4-byte tensor there and back (1000 trips; ``--quick``: 100).

Each pair is reported with its configured rate: the lower of the two nodes' shaped rates and, between
groups, of every uplink on the path; and ``ratio`` = measured / configured. The shaper counts whole
frames and gloo's payload rides TCP, 1448 bytes of every 1514, so a faithful link gives about 0.956.

Then **loopback vs veth**: the same two processes on 127.0.0.1 in the root namespace against two
namespaces whose links are shaped at 20 Gbit/s (the most a cluster file allows), side by side with
their ratios: the cost of the namespaces, veths and bridge themselves. Alternating, 3 rounds (``--quick``:
1), medians.

Without ``--cluster`` it measures ``configs/cluster-mixed.yaml`` at that file's own scale (``auto``):
the rates a rehearsal of that cluster on this machine would run at. The result names the file and the
scale used.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

from plait.runtime.rehearsal import NetPlan, Network, NodeLink, require_root, start_watchdog
from plait.runtime.rehearsal.plan import cluster_tag, rehearse
from plait.scheduler.cluster import MAX_RATE_BIT_S, ClusterSpec, load_cluster

NAME = "links"
DEFAULT_CLUSTER = Path(__file__).resolve().parent.parent / "configs" / "cluster-mixed.yaml"
# Inside a network's namespaces nothing else listens, so a fixed port cannot be taken.
PORT = 29500
# A pair of gloo processes: torch's import, the rendezvous and three measurements of a few seconds each,
# on a slow link and a loaded machine.
PAIR_TIMEOUT_S = 300


def run(quick: bool = False, cluster: Path | None = None) -> dict[str, Any]:
    require_root()
    path = Path(cluster) if cluster is not None else DEFAULT_CLUSTER
    spec = load_cluster(path)
    span_s, rounds, round_trips = (1.0, 1, 100) if quick else (2.0, 3, 1000)
    rehearsal = rehearse(spec, cluster_tag(spec.name))
    pairs = []
    with network_up(rehearsal.plan) as net:
        for a, b in _class_pairs(spec):
            configured = _configured_bit_s(rehearsal.plan, a, b)
            measured = _measure(net.exec_prefix(a), net.exec_prefix(b), net.address(a), PORT, net.ifname,
                                configured, span_s, round_trips)
            pairs.append({
                "nics": [spec.nodes[a].nic.name, spec.nodes[b].nic.name],
                "nodes": [spec.nodes[a].name, spec.nodes[b].name],
                "across_groups": rehearsal.plan.nodes[a].group != rehearsal.plan.nodes[b].group,
                "configured_bit_s": configured,
                **measured,
                "send_ratio": round(measured["send_bit_s"] / configured, 3),
                "all_reduce_ratio": round(measured["all_reduce_bus_bit_s"] / configured, 3),
            })
            print(f"links: {' - '.join(pairs[-1]['nics'])}: configured {configured / 1e6:.4g} Mbit/s, send "
                  f"{pairs[-1]['send_ratio']}, all_reduce {pairs[-1]['all_reduce_ratio']}, round trip "
                  f"{measured['round_trip_us']:.0f} µs", flush=True)
        latency_emulated = net.latency_emulated
    scale = rehearsal.scale
    return {
        "cluster_file": str(path),
        "cluster": spec.name,
        "scale": {"value": scale.value, "source": scale.source, "worker_flops": scale.worker_flops,
                  "device_flops": scale.device_flops},
        "latency_emulated": latency_emulated,
        "span_s": span_s,
        "round_trips": round_trips,
        "payload_share": round(1448 / 1514, 4),
        "pairs": pairs,
        "loopback_vs_veth": _loopback_vs_veth(span_s, rounds, round_trips),
    }


@contextlib.contextmanager
def network_up(plan: NetPlan) -> Iterator[Network]:
    """The network, up; removed on the way out, and by its watchdog if this process is killed."""
    net = Network(plan)
    net.up()
    watchdog = start_watchdog(net)
    try:
        yield net
    finally:
        net.down()
        watchdog.close()


def _class_pairs(spec: ClusterSpec) -> list[tuple[int, int]]:
    """One pair of node ranks for every pair of NIC classes, a class with itself where two nodes have it."""
    ranks: dict[str, list[int]] = {}
    for node in spec.nodes:
        ranks.setdefault(node.nic.name, []).append(node.rank)
    classes = list(ranks)
    pairs = []
    for i, first in enumerate(classes):
        if len(ranks[first]) >= 2:
            pairs.append((ranks[first][0], ranks[first][1]))
        pairs += [(ranks[first][0], ranks[second][0]) for second in classes[i + 1:]]
    return pairs


def _configured_bit_s(plan: NetPlan, a: int, b: int) -> float:
    """The slowest shaped link between nodes ``a`` and ``b``: their own, and the uplinks between their groups
    (the uplinks form a tree, so there is one path)."""
    links = {link.node: link for link in plan.nodes}
    rates = [links[a].rate_bit_s, links[b].rate_bit_s]
    start, goal = links[a].group, links[b].group
    # Depth-first search for the path of uplinks; on it, the rates seen so far.
    stack: list[tuple[int, list[float]]] = [(start, [])]
    seen = {start}
    while stack:
        group, path = stack.pop()
        if group == goal:
            return min(rates + path)
        for uplink in plan.uplinks:
            for here, there in ((uplink.a, uplink.b), (uplink.b, uplink.a)):
                if here == group and there not in seen:
                    seen.add(there)
                    stack.append((there, path + [uplink.rate_bit_s]))
    raise ValueError(f"nodes {a} and {b} are in groups {start} and {goal}, which no uplinks join")


def _measure(prefix_a: list[str], prefix_b: list[str], master: str, port: int, ifname: str, hint_bit_s: float,
             span_s: float, round_trips: int) -> dict[str, Any]:
    """Run the two gloo processes (rank 0 under ``prefix_a``, rank 1 under ``prefix_b``); rank 0's numbers."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": ifname}
    argv = [master, str(port), repr(hint_bit_s), repr(span_s), str(round_trips)]
    commands = [prefix + [sys.executable, "-m", "plait.bench.links_worker", str(rank), *argv]
                for rank, prefix in enumerate((prefix_a, prefix_b))]
    return run_pair(commands, env, PAIR_TIMEOUT_S, f"links: the pair on {master} ({ifname})")


def run_pair(commands: list[list[str]], env: dict[str, str], timeout: float, what: str) -> dict[str, Any]:
    """Run the worker processes of a measurement (one command per rank); the JSON of rank 0's last line. A rank that fails raises
    RuntimeError naming ``what``, the rank, its exit status and the end of its stderr; both are killed on the way out."""
    ranks = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command in commands]
    try:
        outputs = [rank.communicate(timeout=timeout) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    for number, (rank, (_, stderr)) in enumerate(zip(ranks, outputs, strict=True)):
        if rank.returncode != 0:
            raise RuntimeError(f"{what}: rank {number} failed with exit {rank.returncode}: {stderr.strip()[-2000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _loopback_vs_veth(span_s: float, rounds: int, round_trips: int) -> dict[str, Any]:
    """Loopback and veth in alternating order, ``rounds`` times, each key's median: the other work on a
    shared machine then weighs on both sides alike."""
    plan = NetPlan(cluster_tag("veth"), (NodeLink(0, MAX_RATE_BIT_S), NodeLink(1, MAX_RATE_BIT_S)))
    runs: dict[str, list[dict[str, Any]]] = {"loopback": [], "veth": []}
    with network_up(plan) as net:
        for turn in range(rounds):
            for side in ("loopback", "veth") if turn % 2 == 0 else ("veth", "loopback"):
                if side == "loopback":
                    runs[side].append(_measure([], [], "127.0.0.1", _free_port(), "lo", MAX_RATE_BIT_S, span_s,
                                               round_trips))
                else:
                    runs[side].append(_measure(net.exec_prefix(0), net.exec_prefix(1), net.address(0), PORT,
                                               net.ifname, MAX_RATE_BIT_S, span_s, round_trips))
    keys = ("send_bit_s", "all_reduce_bus_bit_s", "round_trip_us")
    medians = {side: {key: median(run[key] for run in runs[side]) for key in keys} for side in runs}
    ratios = {key: round(medians["veth"][key] / medians["loopback"][key], 3) for key in keys}
    print(f"links: veth / loopback: send {ratios['send_bit_s']}, all_reduce {ratios['all_reduce_bus_bit_s']}, "
          f"round trip {ratios['round_trip_us']}", flush=True)
    return {"shaped_bit_s": MAX_RATE_BIT_S, "rounds": rounds, **medians, "veth_over_loopback": ratios,
            "each_round": runs}
