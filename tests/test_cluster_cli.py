"""``plait cluster up|down|status`` and ``plait bench links`` on real network namespaces (root, as CI has)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plait.runtime.cli import main
from plait.runtime.rehearsal import list_networks, reap_stale
from plait.runtime.rehearsal.cli import CLUSTERS
from plait.runtime.rehearsal.namespaces import existing
from plait.runtime.rehearsal.owners import record_path

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root (CI runs as root)")

# Two nodes on 25 Gbit/s NICs at scale 0.002: links of 50 Mbit/s, measurable in a second.
TINY = textwrap.dedent("""
    name: tiny-pair
    devices:
      h100: {peak_tflops: 989, memory_gib: 80}
    nics:
      eth: {gbit: 25}
    nodes:
      - {name: a, nic: eth}
      - {name: b, nic: eth}
    emulate:
      scale: 0.002
""")
PORT = 5201
LISTENER = textwrap.dedent("""
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    server.accept()[0].close()
""")
CONNECT = textwrap.dedent("""
    import socket, sys
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
""")
# The shaper counts whole frames and the bench counts TCP payload, 1448 bytes of every 1514.
PAYLOAD_SHARE = 1448 / 1514
TOLERANCE = 0.15


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def networks_of(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(CLUSTERS.glob("*.json"))
            if json.loads(p.read_text())["cluster_file"] == str(path.resolve())]


def in_namespace(namespace: str, code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


@needs_root
def test_up_leaves_a_network_that_status_lists_reap_keeps_and_down_removes(tiny, capsys):
    # In a process of its own, as from a shell: the network's owner has exited by the time it is used.
    up = subprocess.run([sys.executable, "-m", "plait.runtime.cli", "cluster", "up", str(tiny)],
                        capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        [record] = networks_of(tiny)
        tag = record["tag"]
        names = [f"plait-{tag}-hub", f"plait-{tag}-n0", f"plait-{tag}-n1"]
        assert tag.startswith("tinypair") and len(tag) <= 12
        assert set(names) <= existing()
        assert "198.18.0.1" in up.stdout and f"ip netns exec plait-{tag}-n0" in up.stdout
        listener = in_namespace(names[2], LISTENER, "198.18.0.2", PORT)
        assert listener.stdout.readline().strip() == "ready"
        connect = in_namespace(names[1], CONNECT, "198.18.0.2", PORT)
        assert connect.communicate(timeout=30)[0].strip() == "connected"
        listener.wait(timeout=10)

        assert main(["cluster", "status", str(tiny)]) == 0
        status = capsys.readouterr().out
        assert tag in status and "persistent" in status and str(tiny.resolve()) in status
        [network] = [n for n in list_networks() if n["tag"] == tag]
        assert network["persistent"] and not network["alive"]
        assert not set(reap_stale()) & set(names)
        assert set(names) <= existing()
    finally:
        assert main(["cluster", "down", str(tiny)]) == 0
    assert f"removed network {tag}" in capsys.readouterr().out
    assert not set(names) & existing()
    assert not record_path(tag).exists() and networks_of(tiny) == []
    assert main(["cluster", "down", str(tiny)]) == 0
    assert "no network" in capsys.readouterr().out


def test_up_without_root_is_refused(tiny, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["cluster", "up", str(tiny)]) == 2
    assert "needs root" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "named"), [
    (TINY.replace("nic: eth}\n  - {name: b", "nic: eht}\n  - {name: b"), "nodes[0].nic"),
    (TINY.replace("scale: 0.002", "scale: 1e-9"), "nics.eth.gbit"),
    (None, "<file>"),
])
def test_a_bad_cluster_file_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, text, named):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    # The file is read before anything needs root, so this runs as any user.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["cluster", "up", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


def test_down_needs_a_file_or_all_and_status_of_a_missing_file_is_an_error(tmp_path, capsys):
    assert main(["cluster", "status", str(tmp_path / "absent.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    if os.geteuid() == 0:
        assert main(["cluster", "down"]) == 2
        assert "--all" in capsys.readouterr().err


def test_bench_refuses_cluster_for_a_benchmark_without_one(tiny, capsys):
    assert main(["bench", "gf256", "--cluster", str(tiny)]) == 2
    assert "takes no --cluster" in capsys.readouterr().err


@needs_root
def test_bench_links_measures_the_shaped_rate(tiny, tmp_path):
    assert main(["bench", "links", "--quick", "--cluster", str(tiny), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "links.json").read_text())["result"]
    assert result["scale"] == {"value": 0.002, "source": "file", "worker_flops": None, "device_flops": 989e12}
    [pair] = result["pairs"]
    assert pair["nics"] == ["eth", "eth"] and pair["nodes"] == ["a", "b"] and pair["configured_bit_s"] == 50e6
    expected = pair["configured_bit_s"] * PAYLOAD_SHARE
    assert abs(pair["send_bit_s"] / expected - 1) <= TOLERANCE, pair
    assert pair["all_reduce_bus_bit_s"] > 0 and pair["round_trip_us"] > 0
    comparison = result["loopback_vs_veth"]
    assert set(comparison["veth_over_loopback"]) == {"send_bit_s", "all_reduce_bus_bit_s", "round_trip_us"}
    assert all(comparison[side]["send_bit_s"] > 0 for side in ("loopback", "veth"))
    assert not any(name.startswith("plait-tinypair") or name.startswith("plait-veth") for name in existing())
