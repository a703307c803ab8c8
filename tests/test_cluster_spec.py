"""The cluster file: the example's values, defaults, errors that name the field, the scale and the node table."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from plait.errors import ConfigError
from plait.scheduler.cluster import (
    MAX_RATE_BIT_S,
    Scale,
    MIN_RATE_BIT_S,
    ClusterError,
    check_rates,
    load_cluster,
    node_table,
    parse_cluster,
    resolve_scale,
    shaped_rate_bit_s,
)

MIXED = Path(__file__).resolve().parent.parent / "configs" / "cluster-mixed.yaml"


def mixed() -> dict:
    return yaml.safe_load(MIXED.read_text())


def minimal(**top) -> dict:
    data = {"devices": {"h100": {"peak_tflops": 989, "memory_gib": 80}}, "nics": {"eth": {"gbit": 25}},
            "nodes": [{"nic": "eth"}, {"nic": "eth"}]}
    data.update(top)
    return data


def test_the_example_file_loads_with_its_values():
    spec = load_cluster(MIXED)
    assert spec.name == "mixed-nics"
    assert spec.source == MIXED
    assert (spec.nnodes, spec.workers_per_node, spec.world) == (4, 2, 8)
    assert [node.name for node in spec.nodes] == ["a0", "a1", "b0", "b1"]
    assert [node.rank for node in spec.nodes] == [0, 1, 2, 3]
    assert [node.nic.name for node in spec.nodes] == ["ib400", "ib400", "roce200", "eth25"]
    assert [node.nic.gbit for node in spec.nodes] == [400, 400, 200, 25]
    assert spec.nics["eth25"].latency_us == 25
    assert spec.devices["h100"].peak_tflops == 989 and spec.devices["h100"].memory_gib == 80
    assert all(node.device is spec.devices["h100"] for node in spec.nodes)
    assert spec.groups == {"east": (0, 1), "west": (2, 3)}
    assert [spec.group_index(rank) for rank in range(4)] == [0, 0, 1, 1]
    (uplink,) = spec.uplinks
    assert uplink.groups == ("east", "west") and uplink.gbit == 100 and uplink.latency_us is None
    assert spec.scale is None  # auto
    assert spec.reference_device.name == "h100"


def test_defaults():
    spec = parse_cluster(minimal())
    assert spec.name == "cluster"
    assert spec.source is None
    assert spec.workers_per_node == 1
    assert [node.name for node in spec.nodes] == ["n0", "n1"]
    assert all(node.device.name == "h100" and node.group is None for node in spec.nodes)  # the only device kind
    assert spec.groups == {} and spec.uplinks == ()
    assert spec.group_index(1) == 0
    assert spec.scale is None
    assert spec.nics["eth"].latency_us is None


def test_the_name_defaults_to_the_file_stem_and_scale_reads_a_number(tmp_path):
    path = tmp_path / "rack7.yaml"
    path.write_text(yaml.safe_dump(minimal(emulate={"scale": "1e-5"})))  # YAML 1.1 reads 1e-5 as a string
    spec = load_cluster(str(path))
    assert spec.name == "rack7"
    assert spec.scale == pytest.approx(1e-5)


def test_nodes_without_a_group_beside_grouped_ones_count_as_one_more_group():
    spec = parse_cluster(minimal(nodes=[{"nic": "eth", "group": "x"}, {"nic": "eth"}, {"nic": "eth", "group": "y"}]))
    assert spec.groups == {"x": (0,), "y": (2,)}
    assert [spec.group_index(rank) for rank in range(3)] == [0, 2, 1]
    with pytest.raises(IndexError):
        spec.group_index(3)


def test_the_reference_device_is_the_fastest_a_node_has():
    data = minimal(devices={"a100": {"peak_tflops": 312, "memory_gib": 80},
                            "h100": {"peak_tflops": 989, "memory_gib": 80},
                            "b200": {"peak_tflops": 2250, "memory_gib": 192}},
                   nodes=[{"nic": "eth", "device": "a100"}, {"nic": "eth", "device": "h100"}])
    assert parse_cluster(data).reference_device.name == "h100"  # b200 is listed, but no node has one


def _set(path: str, value):
    """A mutation of the example: set ``path`` (dotted, with [i]) to ``value``, or delete it for ``...``."""

    def mutate(data: dict) -> dict:
        parts = path.replace("[", ".").replace("]", "").split(".")
        node = data
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = int(parts[-1]) if isinstance(node, list) else parts[-1]
        if value is ...:
            del node[last]
        else:
            node[last] = value
        return data

    return mutate


def _nodes(count: int):
    def mutate(data: dict) -> dict:
        data["nodes"] = [{"nic": "eth25", "group": "east" if i % 2 else "west"} for i in range(count)]
        return data

    return mutate


@pytest.mark.parametrize(
    "mutate, key, fragments",
    [
        (_set("nodez", []), "nodez", ["not a known key", "did you mean 'nodes'"]),
        (_set("nics.ib400.gibt", 4), "nics.ib400.gibt", ["did you mean 'gbit'"]),
        (_set("devices.h100.peak_flops", 4), "devices.h100.peak_flops", ["did you mean 'peak_tflops'"]),
        (_set("nodes[1].nik", "ib400"), "nodes[1].nik", ["did you mean 'nic'"]),
        (_set("uplinks[0].gibt", 4), "uplinks[0].gibt", ["did you mean 'gbit'"]),
        (_set("emulate.scael", 1), "emulate.scael", ["did you mean 'scale'"]),
        (_set("name", 7), "name", ["got 7", "string"]),
        (_set("workers_per_node", 0), "workers_per_node", ["got 0", "integer ≥ 1"]),
        (_set("workers_per_node", 1.5), "workers_per_node", ["got 1.5", "integer ≥ 1"]),
        (_set("workers_per_node", True), "workers_per_node", ["got True", "integer ≥ 1"]),
        (_set("nics", [1]), "nics", ["got [1]", "mapping"]),
        (_set("nics", ...), "nics", ["got None", "mapping"]),
        (_set("devices", {}), "devices", ["got {}", "non-empty mapping"]),
        (_set("nics.ib400", 400), "nics.ib400", ["got 400", "mapping"]),
        (_set("nics.ib400.gbit", 0), "nics.ib400.gbit", ["got 0", "positive number"]),
        (_set("nics.ib400.gbit", -5), "nics.ib400.gbit", ["got -5", "positive number"]),
        (_set("nics.ib400.gbit", "fast"), "nics.ib400.gbit", ["got 'fast'", "positive number"]),
        (_set("nics.ib400.gbit", float("inf")), "nics.ib400.gbit", ["got inf", "positive number"]),
        (_set("nics.ib400.gbit", ...), "nics.ib400.gbit", ["got None", "positive number"]),
        (_set("nics.roce200.latency_us", 0), "nics.roce200.latency_us", ["got 0", "positive number"]),
        (_set("devices.h100.peak_tflops", -1), "devices.h100.peak_tflops", ["got -1", "positive number"]),
        (_set("devices.h100.memory_gib", True), "devices.h100.memory_gib", ["got True", "positive number"]),
        (_set("uplinks[0].gbit", 0), "uplinks[0].gbit", ["got 0", "positive number"]),
        (_set("nodes", []), "nodes", ["got []", "non-empty list"]),
        (_set("nodes", ...), "nodes", ["got None", "non-empty list"]),
        (_set("nodes[2]", "b0"), "nodes[2]", ["got 'b0'", "mapping"]),
        (_set("nodes[2].nic", "roce100"), "nodes[2].nic", ["got 'roce100'", "ib400, roce200, eth25",
                                                           "did you mean 'roce200'"]),
        (_set("nodes[2].nic", ...), "nodes[2].nic", ["got None", "NIC class"]),
        (_set("nodes[3].device", "h10"), "nodes[3].device", ["got 'h10'", "h100", "did you mean 'h100'"]),
        (_set("nodes[3].group", 5), "nodes[3].group", ["got 5", "string"]),
        (_set("nodes[1].name", "a0"), "nodes[1].name", ["got 'a0'", "nodes[0] has it"]),
        (_set("nodes[1].name", ""), "nodes[1].name", ["got ''", "non-empty string"]),
        (_set("nodes[3].group", ...), "nodes[3].group", ["got None", "every node names a group"]),
        (_set("uplinks[0].between", ["east", "wset"]), "uplinks[0].between[1]", ["got 'wset'", "east, west",
                                                                                 "did you mean 'west'"]),
        (_set("uplinks[0].between", ["east"]), "uplinks[0].between", ["got ['east']", "two group names"]),
        (_set("uplinks[0].between", "east"), "uplinks[0].between", ["got 'east'", "two group names"]),
        (_set("uplinks[0].between", ["east", "east"]), "uplinks[0].between", ["got ['east', 'east']",
                                                                              "two different groups"]),
        (_set("uplinks", [{"between": ["east", "west"], "gbit": 100}, {"between": ["west", "east"], "gbit": 50}]),
         "uplinks[1].between", ["got ['west', 'east']", "uplinks[0] joins it"]),
        (_set("uplinks", {"between": ["east", "west"]}), "uplinks", ["a list of uplinks"]),
        (_set("emulate.scale", "Auto"), "emulate.scale", ["got 'Auto'", "auto, or a positive number",
                                                          "did you mean 'auto'"]),
        (_set("emulate.scale", 0), "emulate.scale", ["got 0", "positive number"]),
        (_set("emulate.scale", -0.5), "emulate.scale", ["got -0.5", "positive number"]),
        (_set("emulate", "auto"), "emulate", ["got 'auto'", "mapping"]),
    ],
)
def test_mistakes_name_the_key_the_value_and_the_file(mutate, key, fragments):
    with pytest.raises(ClusterError) as info:
        parse_cluster(mutate(mixed()), source=MIXED)
    message = str(info.value)
    assert info.value.key == key
    assert f"'{key}'" in message
    assert str(MIXED) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_a_planner_reads_any_number_of_nodes_but_a_rehearsal_at_most_1000():
    big = parse_cluster(_nodes(1001)(mixed()), source=MIXED)
    assert big.nnodes == 1001
    with pytest.raises(ClusterError) as info:
        check_rates(big, Scale(value=1e-3, source="file", worker_flops=None, device_flops=1e15))
    assert info.value.key == "nodes"
    assert "1001 nodes" in str(info.value) and "1 to 1000 nodes" in str(info.value)


def test_a_device_may_be_left_out_only_when_one_kind_exists():
    data = mixed()
    data["devices"]["a100"] = {"peak_tflops": 312, "memory_gib": 40}
    del data["nodes"][0]["device"]
    with pytest.raises(ClusterError, match=r"'nodes\[0\].device': got None; accepted: a device kind of this file"):
        parse_cluster(data)


def test_an_uplink_needs_groups_some_node_is_in():
    data = minimal(uplinks=[{"between": ["east", "west"], "gbit": 100}])
    with pytest.raises(ClusterError) as info:
        parse_cluster(data)
    assert info.value.key == "nodes[0].group"  # no node names a group at all
    assert "given without a file" in str(info.value)


def test_a_cluster_error_is_a_config_error():
    with pytest.raises(ConfigError):
        parse_cluster(minimal(workers_per_node=-1))
    with pytest.raises(ClusterError) as info:
        parse_cluster([1, 2])  # type: ignore[arg-type]
    assert info.value.key == "<root>"


def test_a_missing_file_or_invalid_yaml_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ClusterError, match="existing YAML file") as info:
        load_cluster(missing)
    assert str(missing) in str(info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes:\n  - [a,\n")
    with pytest.raises(ClusterError, match="not valid YAML at line 3") as info:
        load_cluster(broken)
    assert str(broken) in str(info.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ClusterError) as info:
        load_cluster(empty)
    assert info.value.key == "devices"


def test_resolve_scale_auto_and_file():
    spec = load_cluster(MIXED)
    scale = resolve_scale(spec, worker_flops=9.89e10)
    assert scale.source == "auto"
    assert scale.value == pytest.approx(1e-4)  # 98.9 GFLOP/s per worker standing in for 989 TFLOP/s
    assert scale.device_flops == pytest.approx(989e12)
    assert scale.worker_flops == 9.89e10
    with pytest.raises(ValueError):
        resolve_scale(spec, worker_flops=None)
    fixed = parse_cluster(minimal(emulate={"scale": 0.002}))
    scale = resolve_scale(fixed, worker_flops=None)
    assert (scale.source, scale.value) == ("file", 0.002)
    assert resolve_scale(fixed, worker_flops=1e9).value == 0.002  # the file's number wins over a measurement


def test_shaped_rate():
    assert shaped_rate_bit_s(25, 1e-4) == pytest.approx(2.5e6)


def _links(gbits: list[float], scale: float):
    nics = {f"n{g:g}": {"gbit": g} for g in gbits}
    spec = parse_cluster(minimal(nics=nics, nodes=[{"nic": name} for name in nics], emulate={"scale": scale}))
    return spec, resolve_scale(spec, worker_flops=None)


def test_check_rates_accepts_the_boundaries():
    spec, scale = _links([1.0], MIN_RATE_BIT_S / 1e9)
    assert shaped_rate_bit_s(1.0, scale.value) == MIN_RATE_BIT_S
    check_rates(spec, scale)
    spec, scale = _links([1.0], MAX_RATE_BIT_S / 1e9)
    assert shaped_rate_bit_s(1.0, scale.value) == MAX_RATE_BIT_S
    check_rates(spec, scale)


def test_check_rates_names_the_slowest_link_below_the_minimum():
    spec, scale = _links([1.0, 400.0], MIN_RATE_BIT_S / 1e9 * 0.99)
    with pytest.raises(ClusterError) as info:
        check_rates(spec, scale)
    assert info.value.key == "nics.n1.gbit"
    assert "set emulate.scale to a number, e.g. 0.001" in str(info.value)  # 1 Gbit/s shaped to 1 Mbit/s
    spec, scale = _links([1.0, 400.0], 0.001)
    check_rates(spec, scale)  # the suggestion works


def test_check_rates_names_the_fastest_link_above_the_maximum():
    spec, scale = _links([25.0, 400.0], MAX_RATE_BIT_S / 400e9 * 1.01)
    with pytest.raises(ClusterError) as info:
        check_rates(spec, scale)
    assert info.value.key == "nics.n400.gbit"
    assert "e.g. 0.0025" in str(info.value)  # 400 Gbit/s shaped to 1 Gbit/s


def test_check_rates_covers_uplinks_and_says_when_no_scale_fits():
    spec = load_cluster(MIXED)
    data = mixed()
    data["uplinks"][0]["gbit"] = 0.01
    slow_uplink = parse_cluster(data)
    scale = resolve_scale(slow_uplink, worker_flops=9.89e10)  # scale 1e-4: 0.01 Gbit/s shapes to 1 kbit/s
    with pytest.raises(ClusterError) as info:
        check_rates(slow_uplink, scale)
    assert info.value.key == "uplinks[0].gbit"
    check_rates(spec, resolve_scale(spec, worker_flops=9.89e10))
    spec, scale = _links([1e-6, 400.0], 1e-4)
    with pytest.raises(ClusterError, match="no single emulate.scale"):
        check_rates(spec, scale)


def test_unused_nic_classes_are_not_checked():
    data = minimal(emulate={"scale": 1e-3})
    data["nics"]["slow"] = {"gbit": 1e-6}
    spec = parse_cluster(data)
    check_rates(spec, resolve_scale(spec, worker_flops=None))


def test_node_table_lists_every_node_the_uplinks_and_the_scale():
    spec = load_cluster(MIXED)
    scale = resolve_scale(spec, worker_flops=9.89e10)
    addresses = [f"10.200.0.{i + 1}" for i in range(4)]
    table = node_table(spec, scale, addresses)
    lines = table.splitlines()
    for node, address in zip(spec.nodes, addresses, strict=True):
        (line,) = [line for line in lines if f" {node.name} " in line]
        assert address in line and node.nic.name in line and node.group in line
    assert "40" in next(line for line in lines if " a0 " in line)  # 400 Gbit/s × 1e-4 = 40 Mbit/s
    assert "2.5" in next(line for line in lines if " b1 " in line)
    assert "25 µs (not emulated)" in table
    assert "uplink east <-> west: 100 Gbit/s, shaped 10 Mbit/s" in table
    assert "latency is recorded, not applied" in table
    assert lines[-1] == "scale 0.0001 (auto: worker 98.9 GFLOP/s / device 989 TFLOP/s)"
    header = lines[1]
    for node, line in zip(spec.nodes, lines[2:6], strict=True):  # fixed width: each cell starts under its header
        assert line[header.index("NIC class"):].startswith(node.nic.name)
        assert line[header.index("address"):].startswith(addresses[node.rank])


def test_node_table_without_addresses_and_with_latency_applied():
    spec = parse_cluster(minimal(emulate={"scale": 0.01}))
    table = node_table(spec, resolve_scale(spec, worker_flops=None), latency_emulated=True)
    assert "not emulated" not in table and "recorded, not applied" not in table
    assert table.splitlines()[-1] == "scale 0.01 (from the cluster file)"
    assert all(" - " in line for line in table.splitlines()[2:4])  # no group, no address
    with pytest.raises(ValueError):
        node_table(spec, resolve_scale(spec, worker_flops=None), ["10.0.0.1"])
