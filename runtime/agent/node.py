"""One node of a multi-node job: ``plait train --nnodes N --node-rank R --rdzv HOST:PORT``.

It starts this node's snapshot daemon (bound to the node's address) and this node's
elastic agent, nothing else; the nodes find each other through the rendezvous store:

    plait/job          the leader's config, run record and job name   (agent/job.py)
    plait/daemon/<R>   node R's daemon: host:port:bulk_port

A node restarted after a failure finds its daemon's entry and comes back at the same
address, so the other daemons (which push parity to it) and the workers need no new list.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from plait.errors import CLIError, LaunchError
from plait.runtime.agent import job as jobs
from plait.runtime.agent.rendezvous import Endpoint, connect_store, interface_of, node_address, wait_key
from plait.runtime.config import JobConfig, dump_config


@dataclass(frozen=True, kw_only=True)
class NodeArgs:
    nnodes: int
    node_rank: int
    endpoint: Endpoint
    address: str | None = None  # None: the address this machine reaches the endpoint from
    machine_nodes: int = 1  # nodes on this machine (a rehearsal): they share /dev/shm
    host_store: bool | None = None  # None: host the store when this machine can bind the endpoint

    def check(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise CLIError(f"--node-rank: got {self.node_rank}; accepted: 0 .. {self.nnodes - 1} (--nnodes {self.nnodes})")


def daemon_key(node: int) -> str:
    return f"plait/daemon/{node}"


def _daemon_endpoints(store, node: int, nnodes: int, address: str, timeout: float) -> list[tuple[str, int, int]]:
    """Publish this node's daemon address (or find the one a previous agent of this node published); all nodes'."""
    from plait.runtime.snapshot.launcher.spawn import free_ports

    key = daemon_key(node)
    if not store.check([key]):
        port, bulk = free_ports(2, host=address)
        store.compare_set(key, "", f"{address}:{port}:{bulk}")
    endpoints = []
    for n in range(nnodes):
        host, port, bulk = wait_key(store, daemon_key(n), timeout=timeout, what=f"node {n}'s snapshot daemon "
                                    "address").decode().rsplit(":", 2)
        endpoints.append((host, int(port), int(bulk)))
    if endpoints[node][0] != address:
        raise LaunchError(f"node {node}'s daemon was published at {endpoints[node][0]}, but this node's address is "
                          f"{address}: two machines were started with --node-rank {node}")
    return endpoints


def train_node(config: JobConfig, args: NodeArgs, *, run_dir: Path | None, default_run_dir: Path, env: dict[str, str],
               resume_path: Path | None = None) -> Path:
    """Run this node's part of the job until its workers finish; return its run directory."""
    from plait.runtime.launch import NodeLaunch, launch_workers
    from plait.runtime.snapshot.checkpoint.paths import RUN_FILE, new_run, write_json
    from plait.runtime.snapshot.trainer.hook import job_name

    args.check()
    address = args.address or node_address(args.endpoint)
    timeout = config.launch.join_timeout
    store, leader = connect_store(args.endpoint, timeout=timedelta(seconds=timeout), host_store=args.host_store)
    config_text = dump_config(config)
    snapshots = config.snapshot.enabled
    if leader:
        run_dir = run_dir or default_run_dir
        if (run_dir / "summary.json").exists():
            raise CLIError(f"--run-dir: {run_dir} already holds a finished run (summary.json); choose another directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_text)
        run = new_run(run_dir, resume_path)
        secret_file = None
        if snapshots or config.control.enabled:  # the daemons' and the coordinator's authentication
            from plait.runtime.snapshot.launcher.spawn import job_secret_file

            secret_file = job_secret_file(run_dir)
        record = jobs.JobRecord(config=config_text, run={"run_id": run.run_id, "started": run.started,
                                                         "resume_from": run.resume_from},
                                job=job_name(run_dir), run_dir=run_dir.name,
                                secret_fingerprint=jobs.fingerprint(secret_file) if secret_file else "")
        jobs.publish(store, record)
    else:
        record = jobs.adopt(store, config_text=config_text, timeout=timeout)
        run_dir = run_dir or default_run_dir.parent / record.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_FILE, record.run)  # the same bytes as the leader's, where the directory is shared
        tmp = run_dir / f"config.yaml.n{args.node_rank}.tmp"
        tmp.write_text(config_text)
        os.replace(tmp, run_dir / "config.yaml")
        secret_file = (jobs.follower_secret(run_dir, record.run_dir, record.secret_fingerprint, timeout=timeout)
                       if snapshots else _control_secret(run_dir, record) if config.control.enabled else None)
    print(f"plait: node {args.node_rank} of {args.nnodes} at {address}, "
          f"{'hosting' if leader else 'joined'} the rendezvous at {args.endpoint}; run directory {run_dir}", flush=True)

    placement = config.parallel.placement_of(config.launch.nproc, args.nnodes)
    # The workers count the job's attempts in the rendezvous store, and get a fresh store per attempt (see
    # worker._init_process_group): torch's shared store cannot take a replaced node.
    node_env = dict(env, PLAIT_NODE_RANK=str(args.node_rank), PLAIT_RDZV=str(args.endpoint),
                    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    ifname = interface_of(address)
    if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
        node_env["GLOO_SOCKET_IFNAME"] = ifname  # gloo would bind the hostname's address, which a peer may not reach
    daemons = None
    if snapshots:
        from plait.runtime.snapshot.launcher.supervisor import DaemonSet

        endpoints = _daemon_endpoints(store, args.node_rank, args.nnodes, address, timeout)
        daemons = DaemonSet(config.snapshot, job=record.job, nnodes=args.nnodes,
                            nproc_per_node=config.launch.nproc_per_node, run_dir=run_dir, secret_file=secret_file,
                            endpoints=endpoints, local_nodes=[args.node_rank], machine_nodes=args.machine_nodes)
        daemons.start()
        node_env.update(PLAIT_SNAPSHOT_DAEMONS=",".join(daemons.addresses), PLAIT_JOB=record.job,
                        PLAIT_SNAPSHOT_SECRET_FILE=str(Path(secret_file).resolve()))
    coordinator = None
    if config.control.enabled and secret_file is not None:
        coordinator = _control(config, store, run_dir, leader=leader, address=address, secret_file=secret_file,
                               daemons=daemons.addresses if daemons is not None else [], env=node_env, timeout=timeout)
    holds_rank0 = placement.node_of(0) == args.node_rank
    launch = NodeLaunch(nnodes=args.nnodes, node_rank=args.node_rank, endpoint=str(args.endpoint), hosts_store=leader,
                        local_addr=address, run_id=f"plait-{record.job}", terminal=0 if holds_rank0 else None)
    try:
        launch_workers(config.launch, run_dir, env=node_env, max_restarts=config.launch.restarts(snapshots), node=launch)
    finally:
        if daemons is not None:
            daemons.stop()
        _finish(store, args.nnodes, leader)
        if coordinator is not None:
            coordinator.stop()
        (run_dir / "control.json").unlink(missing_ok=True)
    return run_dir


CONTROL_KEY = "plait/control"


def _control_secret(run_dir: Path, record: jobs.JobRecord) -> Path | None:
    """A follower's secret for the coordinator alone (no snapshots): there now, and the leader's; else None (warned)."""
    from plait.runtime.snapshot.auth import SECRET_ENV

    given = os.environ.get(SECRET_ENV)
    path = Path(given) if given else run_dir / "secret"
    if path.exists() and record.secret_fingerprint and jobs.fingerprint(path) == record.secret_fingerprint:
        return path
    print(f"plait: warning: this node's workers will not report to the coordinator: the job's secret is not at {path} "
          f"(copy the leader's {record.run_dir}/secret here and set {SECRET_ENV}, or share --run-dir)", flush=True)
    return None


def _control(config: JobConfig, store, run_dir: Path, *, leader: bool, address: str, secret_file: Path,
             daemons: list[str], env: dict[str, str], timeout: float):
    """The leader starts the coordinator on its address and publishes it; every node's workers get it."""
    import ipaddress

    from plait.runtime.control.cli import launch_coordinator
    from plait.runtime.control.service import write_control_file

    if leader:
        # loopback is no good to the other nodes: listen where they reach this node, as the daemons do
        host = address if ipaddress.ip_address(config.control.host).is_loopback else config.control.host
        coordinator, _ = launch_coordinator(config.control, run_dir, world=config.launch.nproc,
                                            snapshots=config.snapshot.enabled, daemons=daemons,
                                            secret_file=secret_file, env=env, host=host)
        store.set(CONTROL_KEY, coordinator.address)
        return coordinator
    where = wait_key(store, CONTROL_KEY, timeout=timeout, what="the leader's coordinator address").decode()
    write_control_file(run_dir, where)
    env.update(PLAIT_CONTROL=where, PLAIT_SNAPSHOT_SECRET_FILE=str(Path(secret_file).resolve()))
    return None


def _finish(store, nnodes: int, leader: bool, seconds: float = 10.0) -> None:
    """Say this node is done; the leader, whose process holds the store, waits (bounded) until every node said so,
    so that no agent's last rendezvous call finds the store gone."""
    try:
        store.add("plait/done", 1)
        deadline = time.monotonic() + seconds
        while leader and int(store.add("plait/done", 0)) < nnodes and time.monotonic() < deadline:
            time.sleep(0.1)
    except (RuntimeError, OSError):
        pass  # the leader is gone: nobody is left to tell
