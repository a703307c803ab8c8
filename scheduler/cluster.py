"""The cluster file: the real cluster that plait rehearses on one machine and the planner reasons over.

A YAML file names device kinds, NIC classes (bandwidth per direction), the nodes (each
with a NIC class, a device kind and optionally a group) and the uplinks between groups.
The rehearsal shapes every link to its described rate times a scale, so that one CPU
worker's compute against its shaped link keeps the described device's ratio of compute
to communication. ``configs/cluster-mixed.yaml`` shows every field. No torch here: the
planner loads a cluster on a laptop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plait.errors import ConfigError, did_you_mean

# tc's htb qdisc below about 64 kbit/s releases packets in bursts rather than at a steady rate.
MIN_RATE_BIT_S = 64_000
# A veth pair on one machine moves a few Gbit/s at most; a rate above this would not be shaped at all.
MAX_RATE_BIT_S = 20e9

# A rehearsal makes every node a network namespace with an address of its own on one machine; the planner
# reads any size.
MAX_REHEARSED_NODES = 1000

_TOP_KEYS = ("name", "workers_per_node", "devices", "nics", "nodes", "uplinks", "emulate")
_DEVICE_KEYS = ("peak_tflops", "memory_gib", "link_gbit")
_NIC_KEYS = ("gbit", "latency_us")
_NODE_KEYS = ("name", "nic", "device", "group")
_UPLINK_KEYS = ("between", "gbit", "latency_us")
_EMULATE_KEYS = ("scale",)


class ClusterError(ConfigError):
    """A field of a cluster file is missing, of the wrong type, or inconsistent with another.

    ``key`` is the dotted field, e.g. ``nodes[2].nic``; the message also names the file.
    """

    def __init__(self, key: str, value: object, accepted: str, hint: str | None = None, *,
                 source: Path | None = None):
        super().__init__(key, value, accepted, hint)
        self.source = source
        where = f"cluster file {source}" if source is not None else "cluster (given without a file)"
        self.args = (f"{where}: {self.args[0]}",)


@dataclass(frozen=True, kw_only=True)
class NicClass:
    name: str
    gbit: float  # bandwidth per direction, Gbit/s
    latency_us: float | None = None


@dataclass(frozen=True, kw_only=True)
class DeviceKind:
    name: str
    peak_tflops: float  # dense bf16 peak
    memory_gib: float
    link_gbit: float | None = None  # between two devices of one node, per direction (NVLink); None: not described


@dataclass(frozen=True, kw_only=True)
class ClusterNode:
    rank: int
    name: str
    nic: NicClass
    device: DeviceKind
    group: str | None


@dataclass(frozen=True, kw_only=True)
class Uplink:
    groups: tuple[str, str]
    gbit: float
    latency_us: float | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    name: str
    workers_per_node: int
    nodes: tuple[ClusterNode, ...]
    nics: dict[str, NicClass]
    devices: dict[str, DeviceKind]
    groups: dict[str, tuple[int, ...]]  # group name -> node ranks, in file order; {} when no node names a group
    uplinks: tuple[Uplink, ...]
    scale: float | None  # emulate.scale: a number, or None for "auto"
    source: Path | None

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def world(self) -> int:
        return self.nnodes * self.workers_per_node

    @property
    def reference_device(self) -> DeviceKind:
        """The device kind the scale refers to: the fastest (peak_tflops) that any node has.

        One CPU worker rate cannot keep two device kinds' compute:communication ratios at
        once, so the rehearsal keeps the fastest nodes' ratio; slower kinds then compute
        relatively faster in the rehearsal than on the described cluster.
        """
        return max((node.device for node in self.nodes), key=lambda device: device.peak_tflops)

    def group_index(self, rank: int) -> int:
        """0-based index of node ``rank``'s group in file order; 0 when no node names a group.

        A node without a group in a file whose other nodes have one (allowed without
        uplinks) gets ``len(groups)``: the ungrouped nodes count as one more group.
        """
        if not 0 <= rank < self.nnodes:
            raise IndexError(f"node rank {rank} is not in 0..{self.nnodes - 1}")
        group = self.nodes[rank].group
        if group is None:
            return len(self.groups)
        return list(self.groups).index(group)


def load_cluster(path: Path | str) -> ClusterSpec:
    """Read and validate a cluster file."""
    path = Path(path)
    if not path.is_file():
        raise ClusterError("<file>", str(path), "accepted: the path of an existing YAML file", source=path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ClusterError("<file>", str(path), f"not valid YAML{where}: {getattr(err, 'problem', err)}",
                           source=path) from None
    return parse_cluster({} if data is None else data, source=path)


def parse_cluster(data: dict, source: Path | None = None) -> ClusterSpec:
    """Validate a cluster file's contents; every mistake raises :class:`ClusterError` naming the field."""
    read = _Reader(source)
    top = read.mapping(data, "<root>", _TOP_KEYS)
    devices = {
        name: DeviceKind(name=name, peak_tflops=read.positive(entry.get("peak_tflops"), f"devices.{name}.peak_tflops"),
                         memory_gib=read.positive(entry.get("memory_gib"), f"devices.{name}.memory_gib"),
                         link_gbit=read.optional_positive(entry.get("link_gbit"), f"devices.{name}.link_gbit"))
        for name, entry in read.named_entries(top.get("devices"), "devices", _DEVICE_KEYS, "device kind")
    }
    nics = {
        name: NicClass(name=name, gbit=read.positive(entry.get("gbit"), f"nics.{name}.gbit"),
                       latency_us=read.optional_positive(entry.get("latency_us"), f"nics.{name}.latency_us"))
        for name, entry in read.named_entries(top.get("nics"), "nics", _NIC_KEYS, "NIC class")
    }
    nodes = _parse_nodes(read, top.get("nodes"), nics, devices)
    groups: dict[str, list[int]] = {}
    for node in nodes:
        if node.group is not None:
            groups.setdefault(node.group, []).append(node.rank)
    uplinks = _parse_uplinks(read, top.get("uplinks"), nodes, groups)
    return ClusterSpec(
        name=read.text(top.get("name", source.stem if source is not None else "cluster"), "name"),
        workers_per_node=read.workers_per_node(top.get("workers_per_node", 1)),
        nodes=nodes, nics=nics, devices=devices,
        groups={name: tuple(ranks) for name, ranks in groups.items()},
        uplinks=uplinks, scale=_parse_scale(read, top.get("emulate")), source=source,
    )


def _parse_nodes(read: _Reader, value: Any, nics: dict[str, NicClass],
                 devices: dict[str, DeviceKind]) -> tuple[ClusterNode, ...]:
    if not isinstance(value, list) or not value:
        raise read.error("nodes", value, "accepted: a non-empty list of nodes, e.g. - {name: a0, nic: ib400}")
    nodes: list[ClusterNode] = []
    seen: dict[str, int] = {}
    for rank, raw in enumerate(value):
        key = f"nodes[{rank}]"
        entry = read.mapping(raw, key, _NODE_KEYS)
        name = read.text(entry.get("name", f"n{rank}"), f"{key}.name")
        if name in seen:
            raise read.error(f"{key}.name", name, f"accepted: a name no other node has (nodes[{seen[name]}] has it)")
        seen[name] = rank
        nic = read.choice(entry.get("nic"), f"{key}.nic", nics, "NIC class")
        if "device" not in entry and len(devices) == 1:
            device = next(iter(devices.values()))
        else:
            device = read.choice(entry.get("device"), f"{key}.device", devices, "device kind")
        group = entry.get("group")
        if group is not None:
            group = read.text(group, f"{key}.group")
        nodes.append(ClusterNode(rank=rank, name=name, nic=nic, device=device, group=group))
    return tuple(nodes)


def _parse_uplinks(read: _Reader, value: Any, nodes: tuple[ClusterNode, ...],
                   groups: dict[str, list[int]]) -> tuple[Uplink, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise read.error("uplinks", value, "accepted: a list of uplinks, e.g. - {between: [east, west], gbit: 100}")
    if value:
        # An uplink carries the traffic between two groups; a node outside every group would have no path to it.
        for node in nodes:
            if node.group is None:
                raise read.error(f"nodes[{node.rank}].group", None,
                                 "accepted: a group name; every node names a group when the file has uplinks")
    uplinks: list[Uplink] = []
    seen: dict[frozenset[str], int] = {}
    for index, raw in enumerate(value):
        key = f"uplinks[{index}]"
        entry = read.mapping(raw, key, _UPLINK_KEYS)
        between = entry.get("between")
        if not isinstance(between, list) or len(between) != 2:
            raise read.error(f"{key}.between", between, "accepted: a list of two group names, e.g. [east, west]")
        for side, group in enumerate(between):
            read.choice(group, f"{key}.between[{side}]", groups, "group (a group is named by the nodes in it)")
        if between[0] == between[1]:
            raise read.error(f"{key}.between", between, "accepted: two different groups")
        pair = frozenset(between)
        if pair in seen:
            raise read.error(f"{key}.between", between,
                             f"accepted: a pair of groups no other uplink joins (uplinks[{seen[pair]}] joins it)")
        seen[pair] = index
        uplinks.append(Uplink(groups=(between[0], between[1]), gbit=read.positive(entry.get("gbit"), f"{key}.gbit"),
                              latency_us=read.optional_positive(entry.get("latency_us"), f"{key}.latency_us")))
    return tuple(uplinks)


def _parse_scale(read: _Reader, value: Any) -> float | None:
    if value is None:
        return None
    emulate = read.mapping(value, "emulate", _EMULATE_KEYS)
    scale = emulate.get("scale", "auto")
    if scale == "auto":
        return None
    number = _number(scale)
    if number is None or number <= 0:
        raise read.error("emulate.scale", scale,
                         "accepted: auto, or a positive number (shaped rate = described rate × scale)",
                         hint=did_you_mean(str(scale), ["auto"]))
    return number


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None. YAML 1.1 reads "1e-5" (no dot) as a string, so strings count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class _Reader:
    """Type checks for one cluster file; every error it raises names that file."""

    source: Path | None

    def error(self, key: str, value: object, accepted: str, hint: str | None = None) -> ClusterError:
        return ClusterError(key, value, accepted, hint, source=self.source)

    def mapping(self, value: Any, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, value, f"accepted: a mapping with keys {', '.join(known)}")
        prefix = "" if key == "<root>" else f"{key}."
        for name, item in value.items():
            if name not in known:
                raise self.error(f"{prefix}{name}", item,
                                 f"not a known key; accepted under '{key}': {', '.join(known)}",
                                 hint=did_you_mean(str(name), known))
        return value

    def named_entries(self, value: Any, key: str, known: tuple[str, ...],
                      what: str) -> Iterable[tuple[str, dict[str, Any]]]:
        if not isinstance(value, dict) or not value:
            raise self.error(key, value, f"accepted: a non-empty mapping of {what} name to {{{', '.join(known)}}}")
        for name, entry in value.items():
            if not isinstance(name, str):
                raise self.error(f"{key}.{name}", name, f"accepted: a {what} name (a string)")
            yield name, self.mapping(entry, f"{key}.{name}", known)

    def positive(self, value: Any, key: str) -> float:
        number = _number(value)
        if number is None or number <= 0:
            raise self.error(key, value, "accepted: a positive number")
        return number

    def optional_positive(self, value: Any, key: str) -> float | None:
        return None if value is None else self.positive(value, key)

    def workers_per_node(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error("workers_per_node", value, "accepted: an integer ≥ 1")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, value, "accepted: a non-empty string")
        return value

    def choice(self, value: Any, key: str, choices: dict[str, Any], what: str) -> Any:
        if not isinstance(value, str) or value not in choices:
            listed = ", ".join(choices) or "none"
            raise self.error(key, value, f"accepted: a {what} of this file: {listed}",
                             hint=did_you_mean(str(value), choices))
        return choices[value]


@dataclass(frozen=True, kw_only=True)
class Scale:
    """The factor from described to shaped bandwidth, and where it came from."""

    value: float
    source: str  # "file" (emulate.scale is a number) or "auto" (measured worker rate / reference device peak)
    worker_flops: float | None
    device_flops: float


def resolve_scale(spec: ClusterSpec, worker_flops: float | None) -> Scale:
    """The file's number, or for auto the worker's FLOP/s over the reference device's peak.

    A CPU worker stands in for one device; shaping every link by the same ratio keeps the
    described cluster's compute:communication ratio.
    """
    device_flops = spec.reference_device.peak_tflops * 1e12
    if spec.scale is not None:
        return Scale(value=spec.scale, source="file", worker_flops=worker_flops, device_flops=device_flops)
    if worker_flops is None or not worker_flops > 0:
        raise ValueError(f"emulate.scale is auto: pass the measured worker rate in FLOP/s, not {worker_flops!r}")
    return Scale(value=worker_flops / device_flops, source="auto", worker_flops=worker_flops,
                 device_flops=device_flops)


def shaped_rate_bit_s(gbit: float, scale: float) -> float:
    return gbit * 1e9 * scale


def check_rates(spec: ClusterSpec, scale: Scale) -> None:
    """Raise :class:`ClusterError` if the cluster is too big to rehearse on one machine, or the slowest or fastest
    shaped link falls outside what tc shapes faithfully."""
    if spec.nnodes > MAX_REHEARSED_NODES:
        raise ClusterError("nodes", f"a list of {spec.nnodes} nodes",
                           f"a rehearsal gives every node a namespace and an address: accepted 1 to "
                           f"{MAX_REHEARSED_NODES} nodes (plait plan takes any number)", source=spec.source)
    used = {node.nic.name: node.nic for node in spec.nodes}
    links = [(f"nics.{name}.gbit", nic.gbit) for name, nic in used.items()]
    links += [(f"uplinks[{i}].gbit", uplink.gbit) for i, uplink in enumerate(spec.uplinks)]
    slowest = min(links, key=lambda link: link[1])
    fastest = max(links, key=lambda link: link[1])
    if shaped_rate_bit_s(slowest[1], scale.value) < MIN_RATE_BIT_S:
        (key, gbit), target = slowest, 1e6 / (slowest[1] * 1e9)
    elif shaped_rate_bit_s(fastest[1], scale.value) > MAX_RATE_BIT_S:
        (key, gbit), target = fastest, 1e9 / (fastest[1] * 1e9)
    else:
        return
    # The scales that keep every link in range; 1% inside, so the suggestion survives rounding to 3 digits.
    lowest_scale = MIN_RATE_BIT_S / (slowest[1] * 1e9) * 1.01
    highest_scale = MAX_RATE_BIT_S / (fastest[1] * 1e9) / 1.01
    if lowest_scale > highest_scale:
        hint = (f"no single emulate.scale shapes both {slowest[1]:g} and {fastest[1]:g} Gbit/s within range; "
                "describe fewer link speeds")
    else:
        hint = f"set emulate.scale to a number, e.g. {min(max(target, lowest_scale), highest_scale):.3g}"
    rate = shaped_rate_bit_s(gbit, scale.value)
    origin = "from the cluster file" if scale.source == "file" else "auto"
    raise ClusterError(
        key, gbit,
        f"at scale {scale.value:.3g} ({origin}) it shapes to {_rate_text(rate)}; "
        f"accepted: {_rate_text(MIN_RATE_BIT_S)} to {_rate_text(MAX_RATE_BIT_S)} after scaling",
        hint, source=spec.source,
    )


def _rate_text(bit_s: float) -> str:
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bit_s >= size:
            return f"{bit_s / size:.4g} {unit}"
    return f"{bit_s:.4g} bit/s"


def node_table(spec: ClusterSpec, scale: Scale, addresses: list[str] | None = None, *,
               latency_emulated: bool = False) -> str:
    """A fixed-width table of the nodes as described and as shaped, then the uplinks and the scale."""
    if addresses is not None and len(addresses) != spec.nnodes:
        raise ValueError(f"{len(addresses)} addresses for {spec.nnodes} nodes")

    def latency(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:g} µs" + ("" if latency_emulated else " (not emulated)")

    header = ("node", "name", "group", "address", "device", "NIC class", "described Gbit/s", "shaped Mbit/s",
              "latency")
    rows = [
        (str(node.rank), node.name, node.group or "-", addresses[node.rank] if addresses else "-", node.device.name,
         node.nic.name, f"{node.nic.gbit:g}", f"{shaped_rate_bit_s(node.nic.gbit, scale.value) / 1e6:.4g}",
         latency(node.nic.latency_us))
        for node in spec.nodes
    ]
    widths = [max(len(row[col]) for row in (header, *rows)) for col in range(len(header))]
    numeric = {0, 6, 7}
    lines = [f"cluster {spec.name}: {spec.nnodes} nodes × {spec.workers_per_node} workers = {spec.world}"]
    for row in (header, *rows):
        cells = [cell.rjust(w) if col in numeric else cell.ljust(w)
                 for col, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    for uplink in spec.uplinks:
        shaped = shaped_rate_bit_s(uplink.gbit, scale.value) / 1e6
        lines.append(f"uplink {uplink.groups[0]} <-> {uplink.groups[1]}: {uplink.gbit:g} Gbit/s, "
                     f"shaped {shaped:.4g} Mbit/s, latency {latency(uplink.latency_us)}")
    if not latency_emulated:
        # netem, which adds delay, is not in every kernel; shaping rates is all tc does here.
        lines.append("latency is recorded, not applied")
    if scale.source == "auto":
        lines.append(f"scale {scale.value:.3g} (auto: worker {scale.worker_flops / 1e9:.4g} GFLOP/s / "
                     f"device {scale.device_flops / 1e12:g} TFLOP/s)")
    else:
        lines.append(f"scale {scale.value:.3g} (from the cluster file)")
    return "\n".join(lines)
