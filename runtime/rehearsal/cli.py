"""``plait cluster up|down|status``: a cluster file's rehearsal network, left up for the user's own processes.

``up`` builds the network as a persistent one (no watchdog, and :func:`~.owners.reap_stale` leaves it),
because the process that builds it exits at once. Which cluster file a network was brought up for is
kept in ``/run/plait/net/clusters/<tag>.json``, beside the owner records, so that ``down`` and ``status``
can find it by the file's path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from plait.errors import CLIError
from plait.runtime.rehearsal import namespaces, owners
from plait.runtime.rehearsal.net import Network
from plait.runtime.rehearsal.plan import cluster_tag, rehearse
from plait.scheduler.cluster import load_cluster, node_table

CLUSTERS = owners.RECORDS / "clusters"


def add_cluster_parser(commands: argparse._SubParsersAction) -> None:
    cluster = commands.add_parser(
        "cluster", help="bring a cluster file's rehearsal network up, down, or list it",
        description="Build a cluster file's emulated network (one network namespace per node, links shaped "
        "as the file describes) and leave it up for your own processes; take it down; or list plait's networks. "
        "up and down need root.")
    actions = cluster.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="build the network and leave it up",
                            description="Build the cluster file's network and leave it up until plait cluster down.")
    up.add_argument("file", type=Path, metavar="FILE", help="cluster file (see configs/cluster-mixed.yaml)")
    down = actions.add_parser("down", help="remove the networks brought up for a cluster file",
                              description="Kill every process in the networks brought up for FILE (or all "
                              "of them), delete their namespaces and records; nothing up is fine.")
    down.add_argument("file", type=Path, nargs="?", metavar="FILE", help="the cluster file given to plait cluster up")
    down.add_argument("--all", action="store_true", help="every network plait cluster up brought up")
    status = actions.add_parser("status", help="list plait's networks",
                                description="List plait's emulated networks: tag, owner, namespaces, when made "
                                "and the cluster file; with FILE only the networks of that file.")
    status.add_argument("file", type=Path, nargs="?", metavar="FILE", help="only this cluster file's networks")


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.cluster_action == "up":
        return _up(args.file)
    if args.cluster_action == "down":
        if (args.file is None) == (not args.all):
            raise CLIError("plait cluster down: give a cluster FILE or --all, not both or neither")
        return _down(None if args.all else args.file)
    return _status(args.file)


def _up(path: Path) -> int:
    namespaces.require_root()
    spec = load_cluster(path)
    # The whole plan first: a file whose links cannot be shaped is refused before anything is touched.
    rehearsal = rehearse(spec, cluster_tag(spec.name))
    for name in owners.reap_stale():
        print(f"plait cluster: removed stale namespace {name}")
    tag = rehearsal.plan.tag
    net = Network(rehearsal.plan, persistent=True)
    CLUSTERS.mkdir(parents=True, exist_ok=True)
    # Before the build, so a network whose builder died midway still names its file in status.
    _cluster_record(tag).write_text(json.dumps({"tag": tag, "cluster_file": str(path.resolve())}, indent=1) + "\n")
    try:
        net.up()
    except BaseException:
        _cluster_record(tag).unlink(missing_ok=True)
        raise
    addresses = [net.address(node.rank) for node in spec.nodes]
    print(node_table(spec, rehearsal.scale, addresses, latency_emulated=net.latency_emulated))
    print(f"\nnetwork {tag} is up; its namespaces, one per node (interface {net.ifname}):")
    for node in spec.nodes:
        print(f"  {net.namespace(node.rank)}  {node.name}  {net.address(node.rank)}")
    first = net.namespace(spec.nodes[0].rank)
    print(f"run a command on a node:  ip netns exec {first} COMMAND ...\n"
          f"take it down:             plait cluster down {path}")
    return 0


def _down(path: Path | None) -> int:
    namespaces.require_root()
    records = _cluster_records()
    if path is not None:
        wanted = str(path.resolve())
        if not path.is_file() and not any(r["cluster_file"] == wanted for r in records):
            raise CLIError(f"plait cluster down: {path}: no such file, and no network was brought up for it")
        records = [r for r in records if r["cluster_file"] == wanted]
    networks = {n["tag"]: n for n in owners.list_networks()}
    for record in records:
        names = networks[record["tag"]]["namespaces"] if record["tag"] in networks else []
        namespaces.remove(names)
        owners.remove_record(record["tag"])
        _cluster_record(record["tag"]).unlink(missing_ok=True)
        print(f"plait cluster: removed network {record['tag']} of {record['cluster_file']}"
              + (f" (namespaces {', '.join(names)})" if names else " (its namespaces were gone)"))
    if not records:
        print("plait cluster: no network of " + (str(path) if path is not None else "plait cluster up") + " is up")
    return 0


def _status(path: Path | None) -> int:
    files = {r["tag"]: r["cluster_file"] for r in _cluster_records()}
    networks = owners.list_networks()
    if path is not None:
        wanted = str(path.resolve())
        if not path.is_file() and wanted not in files.values():
            raise CLIError(f"plait cluster status: {path}: no such file, and no network was brought up for it")
        networks = [n for n in networks if files.get(n["tag"]) == wanted]
    if not networks:
        print("plait cluster: no plait network is up" + (f" for {path}" if path is not None else ""))
    for network in networks:
        owner = "persistent" if network["persistent"] else ("alive" if network["alive"] else "dead")
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(network["created"]))
        print(f"{network['tag']}  owner pid {network['pid']} ({owner})  created {created}  "
              f"cluster file {files.get(network['tag'], '-')}\n  namespaces: {' '.join(network['namespaces']) or '-'}")
    return 0


def _cluster_record(tag: str) -> Path:
    return CLUSTERS / f"{tag}.json"


def _cluster_records() -> list[dict]:
    return owners.read_records(CLUSTERS)
