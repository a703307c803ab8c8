"""The emulated cluster's network, built for real: namespaces, bridges and htb shaping (needs root, as CI has).

Rates are measured with one TCP stream between two namespaces after a warm-up. TCP carries 1448 bytes
of payload in every 1514-byte frame the shaper counts, so a link shaped to R moves R * 1448 / 1514 of data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest

from plait.errors import ConfigError
from plait.runtime.rehearsal import (NetPlan, Network, NetworkError, NodeLink, UplinkLink, list_networks, new_tag,
                                     reap_stale, start_watchdog)
from plait.runtime.rehearsal.namespaces import existing
from plait.runtime.rehearsal.owners import record_path

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root (CI runs as root)")

PAYLOAD_SHARE = 1448 / 1514
TOLERANCE = 0.15
PORT = 5201

RECEIVER = textwrap.dedent("""
    import socket, sys, time
    address, port, warm_s, span_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    server = socket.create_server((address, port))
    print("ready", flush=True)
    conn, _ = server.accept()
    buf = bytearray(1 << 20)
    conn.recv_into(buf)
    start = time.monotonic()
    while time.monotonic() < start + warm_s:
        conn.recv_into(buf)
    received, t0 = 0, time.monotonic()
    while (now := time.monotonic()) < t0 + span_s:
        received += conn.recv_into(buf)
    print(received * 8 / (now - t0))
""")
SENDER = textwrap.dedent("""
    import socket, sys, time
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    data = bytes(1 << 20)
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            conn.sendall(data)
    except OSError:
        pass  # the receiver has measured enough and hung up
""")
LISTENER = textwrap.dedent("""
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        server.accept()[0].close()
""")
CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
        print("connected")
    except OSError as err:
        print(type(err).__name__, err)
""")


def in_node(net: Network, node: int, code: str, *args: object, **popen) -> subprocess.Popen:
    return subprocess.Popen(net.exec_prefix(node) + [sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, text=True, **popen)


def measure_bit_s(net: Network, sender: int, receiver: int, warm_s: float = 0.5, span_s: float = 1.5) -> float:
    """TCP payload bit/s from ``sender`` to ``receiver`` over ``span_s`` after ``warm_s`` of sending."""
    recv = in_node(net, receiver, RECEIVER, net.address(receiver), PORT, warm_s, span_s)
    assert recv.stdout.readline().strip() == "ready"
    send = in_node(net, sender, SENDER, net.address(receiver), PORT)
    try:
        out, _ = recv.communicate(timeout=30)
        send.wait(timeout=30)
    finally:
        send.kill()
        recv.kill()
    return float(out)


def assert_rate(measured: float, shaped_bit_s: float) -> None:
    expected = shaped_bit_s * PAYLOAD_SHARE
    assert abs(measured / expected - 1) <= TOLERANCE, f"{measured / 1e6:.1f} Mbit/s, expected {expected / 1e6:.1f}"


def connect(net: Network, source: int, address: str, timeout_s: float = 1.0) -> str:
    probe = in_node(net, source, CONNECT, address, PORT, timeout_s)
    return probe.communicate(timeout=timeout_s + 10)[0].strip()


def two_nodes(rate_bit_s: float = 200e6) -> NetPlan:
    return NetPlan(new_tag(), (NodeLink(0, rate_bit_s), NodeLink(1, rate_bit_s)))


@pytest.fixture(scope="module")
def cluster():
    """Nodes 0, 1 at 200 Mbit/s and 2, 3 at 50 Mbit/s in group 0; node 4 at 200 Mbit/s in group 1, behind
    a 100 Mbit/s uplink."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and tc need root (CI runs as root)")
    plan = NetPlan(new_tag(), (NodeLink(0, 200e6), NodeLink(1, 200e6), NodeLink(2, 50e6), NodeLink(3, 50e6),
                               NodeLink(4, 200e6, group=1)), (UplinkLink(0, 1, 100e6),))
    with Network(plan) as net:
        yield net


@needs_root
def test_up_and_down_leave_nothing_behind():
    net = Network(two_nodes())
    with net:
        assert set(net.namespaces()) <= existing()
        assert json.loads(record_path(net.plan.tag).read_text())["namespaces"] == net.namespaces()
        assert any(n["tag"] == net.plan.tag and n["alive"] for n in list_networks())
        # Nothing in the root namespace: a veth or bridge there could route out.
        root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert net.ifname not in root_links and "br0" not in root_links
        assert net.address(0) == "198.18.0.1" and net.address(1) == "198.18.0.2"
    assert not set(net.namespaces()) & existing()
    assert not record_path(net.plan.tag).exists()
    net.down()


@needs_root
def test_nodes_reach_each_other_and_nothing_else(cluster):
    listener = in_node(cluster, 1, LISTENER, cluster.address(1), PORT)
    try:
        assert listener.stdout.readline().strip() == "ready"
        assert connect(cluster, 0, cluster.address(1)) == "connected"
        assert connect(cluster, 4, cluster.address(1)) == "connected"  # across the uplink
    finally:
        listener.kill()
        listener.wait()
    host = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                          check=True).stdout
    outside = ["8.8.8.8"] + [line.split()[3].split("/")[0] for line in host.splitlines()]
    for address in outside:
        route = subprocess.run(cluster.exec_prefix(0) + ["ip", "route", "get", address], capture_output=True,
                               text=True)
        assert route.returncode != 0 and "unreachable" in route.stderr, (address, route.stdout)


@needs_root
@pytest.mark.parametrize(("sender", "receiver", "shaped"), [
    (0, 1, 200e6),  # both ends at 200
    (2, 3, 50e6),  # both ends at 50
    (0, 2, 50e6),  # the receiver's end is slower: shaped on the hub side
    (2, 0, 50e6),  # the sender's end is slower: shaped in the node
    (0, 4, 100e6),  # 200 Mbit/s ends, across the 100 Mbit/s uplink
])
def test_measured_rate_is_the_slowest_link_on_the_path(cluster, sender, receiver, shaped):
    measured = measure_bit_s(cluster, sender, receiver)
    print(f"node {sender} -> node {receiver}: {measured / 1e6:.1f} Mbit/s (links shaped to {shaped / 1e6:.0f})")
    assert_rate(measured, shaped)


@needs_root
def test_set_rate_changes_both_directions():
    with Network(two_nodes(200e6)) as net:
        net.set_rate(1, 50e6)
        assert_rate(measure_bit_s(net, 0, 1), 50e6)
        assert_rate(measure_bit_s(net, 1, 0), 50e6)


@needs_root
def test_set_link_down_times_out_and_up_restores():
    with Network(two_nodes()) as net:
        listener = in_node(net, 1, LISTENER, net.address(1), PORT)
        assert listener.stdout.readline().strip() == "ready"
        assert connect(net, 0, net.address(1)) == "connected"
        net.set_link(1, False)
        assert connect(net, 0, net.address(1)).startswith("TimeoutError")
        net.set_link(1, True)
        deadline = time.monotonic() + 5
        while (outcome := connect(net, 0, net.address(1))) != "connected" and time.monotonic() < deadline:
            pass
        assert outcome == "connected"


@needs_root
def test_kill_all_kills_what_runs_in_the_namespace():
    with Network(two_nodes()) as net:
        sleeper = subprocess.Popen(net.exec_prefix(1) + ["sleep", "60"])
        deadline = time.monotonic() + 5
        while sleeper.pid not in net.pids(1) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert net.kill_all(1) == [sleeper.pid]
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert net.pids(1) == [] and net.pids(0) == []


def start_owner(tag: str, watchdog: bool) -> subprocess.Popen:
    """A process that builds a network, runs a sleep in node 0 and sleeps itself, as ``plait`` would."""
    code = textwrap.dedent(f"""
        import subprocess, time
        from plait.runtime.rehearsal import NetPlan, Network, NetworkError, NodeLink, start_watchdog
        net = Network(NetPlan({tag!r}, (NodeLink(0, 100e6), NodeLink(1, 100e6))))
        net.up()
        if {watchdog}:
            start_watchdog(net)
        subprocess.Popen(net.exec_prefix(0) + ["sleep", "60"])
        print("up", flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "up"
    return owner


def wait_gone(names: list[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while set(names) & existing():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_root
def test_watchdog_removes_the_network_when_its_owner_is_killed():
    net = Network(two_nodes())
    owner = start_owner(net.plan.tag, watchdog=True)
    try:
        assert set(net.namespaces()) <= existing() and net.pids(0)
        owner.kill()
        owner.wait()
        assert wait_gone(net.namespaces(), timeout_s=5)
        # down() removes the namespaces first and the record after (a record outliving its namespaces is
        # harmless; the reverse would hide them from reap_stale), so the record may still be there for an instant
        assert wait_until(lambda: not record_path(net.plan.tag).exists(), timeout_s=5)
    finally:
        owner.kill()
        net.down()


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_root
def test_reap_stale_removes_a_dead_owners_network_and_never_a_live_ones():
    net = Network(two_nodes())
    owner = start_owner(net.plan.tag, watchdog=False)
    try:
        assert not set(reap_stale()) & set(net.namespaces())
        assert set(net.namespaces()) <= existing()
        owner.kill()
        owner.wait()
        assert set(net.namespaces()) <= existing()  # no watchdog: the network outlives its owner
        assert set(net.namespaces()) <= set(reap_stale())
        assert not set(net.namespaces()) & existing()
        assert not record_path(net.plan.tag).exists()
    finally:
        owner.kill()
        net.down()


def test_plan_rejects_bad_tags_and_looping_uplinks():
    nodes = (NodeLink(0, 1e8), NodeLink(1, 1e8, group=1), NodeLink(2, 1e8, group=2))
    with pytest.raises(ConfigError, match="net.tag"):
        NetPlan("Has-Dash", nodes)
    with pytest.raises(ConfigError, match="a tree"):
        NetPlan("t", nodes, (UplinkLink(0, 1, 1e8), UplinkLink(1, 2, 1e8), UplinkLink(2, 0, 1e8)))
    with pytest.raises(ConfigError, match="distinct"):
        NetPlan("t", (NodeLink(0, 1e8), NodeLink(0, 1e8)))


@needs_root
def test_a_taken_tag_is_refused_and_the_network_left_alone():
    with Network(two_nodes()) as net:
        with pytest.raises(NetworkError, match="exists already"):
            Network(net.plan).up()
        assert set(net.namespaces()) <= existing() and record_path(net.plan.tag).exists()


@needs_root
def test_watchdog_of_a_clean_exit_finds_nothing_and_leaves():
    net = Network(two_nodes())
    with net:
        watchdog = start_watchdog(net)
        assert os.path.exists(f"/proc/{watchdog.pid}")
    watchdog.close()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{watchdog.pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{watchdog.pid}")


@needs_root
def test_a_failed_build_removes_what_it_made(monkeypatch):
    import plait.runtime.rehearsal.net as net_module

    real_ip = net_module.ip

    def ip_failing_at_node_1(namespace, *args):
        if args[:3] == ("link", "add", "n1"):
            raise NetworkError("'ip link add n1' failed: injected")
        return real_ip(namespace, *args)

    monkeypatch.setattr(net_module, "ip", ip_failing_at_node_1)
    net = Network(two_nodes())
    with pytest.raises(NetworkError, match="injected"):
        net.up()
    assert not set(net.namespaces()) & existing()
    assert not record_path(net.plan.tag).exists()


@needs_root
def test_reap_stale_removes_a_namespace_no_record_names(monkeypatch):
    import plait.runtime.rehearsal.owners as owners_module

    orphan = f"plait-{new_tag()}-hub"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        assert orphan not in reap_stale()  # younger than ORPHAN_AGE: it may be a network being built
        monkeypatch.setattr(owners_module, "ORPHAN_AGE", timedelta(0))
        assert orphan in reap_stale()
        assert orphan not in existing()
    finally:
        subprocess.run(["ip", "netns", "delete", orphan], capture_output=True)
