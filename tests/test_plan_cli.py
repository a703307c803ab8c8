"""``plait plan``, ``parallel.auto`` and the dry run's memory lines: the commands a user runs, through ``main``."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.runtime.cli import main
from plait.runtime.config import load_config
from plait.runtime.plan_cli import apply_auto

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
MIXED = REPO / "configs" / "cluster-mixed.yaml"
HEADER = ("#", "layout", "placement", "mem/device", "step", "tokens/s", "MFU", "bubble", "bytes per link")

# Fast and slow NICs interleaved in the file's node order: the NIC-aware placement reorders them.
INTERLEAVED = textwrap.dedent("""
    name: interleaved
    workers_per_node: 2
    devices:
      h100: {peak_tflops: 989, memory_gib: 80, link_gbit: 3600}
    nics:
      ib400: {gbit: 400, latency_us: 2}
      eth10: {gbit: 10, latency_us: 25}
    nodes:
      - {name: a0, nic: ib400}
      - {name: e0, nic: eth10}
      - {name: a1, nic: ib400}
      - {name: e1, nic: eth10}
""")

# One slow and one fast device, one worker each: the pipeline's layers split by speed.
MIXED_DEVICES = textwrap.dedent("""
    name: mixed-devices
    devices:
      h100: {peak_tflops: 989, memory_gib: 80}
      a100: {peak_tflops: 312, memory_gib: 40}
    nics:
      eth: {gbit: 400}
    nodes:
      - {name: a, nic: eth, device: a100}
      - {name: h, nic: eth, device: h100}
""")


def run(*argv: str) -> tuple[int, str, str]:
    """``plait ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def plan(*argv: str, config: Path = DEMO) -> tuple[int, str, str]:
    return run("plan", "--config", str(config), *argv)


def plan_json(*argv: str) -> dict:
    code, out, err = plan(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def rows_of(table: str) -> list[list[str]]:
    """The table's cells: columns are split by two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in table]


def megatron_sizes(text: str) -> dict[str, int]:
    return {flag: int(value) for flag, value in re.findall(r"(--[a-z-]+-size) (\d+)", text)}


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clusters") / "interleaved.yaml"
    path.write_text(INTERLEAVED)
    return path


@pytest.fixture(scope="module")
def local_table() -> str:
    code, out, err = plan("--nproc", "4", "--top", "5")
    assert code == 0 and err == "", err
    return out


@pytest.fixture(scope="module")
def mixed_json() -> dict:
    return plan_json("--cluster", str(MIXED), "--top", "8")


@pytest.fixture(scope="module")
def interleaved_json(interleaved) -> dict:
    return plan_json("--cluster", str(interleaved), "--top", "8")


def test_table_ranks_plans_says_why_and_prints_a_command_that_runs(local_table):
    lines = local_table.splitlines()
    assert lines[0].startswith("plait plan: moe model on this-machine (1 node(s) × 4 = 4 devices), global batch 32")
    assert tuple(rows_of([lines[1]])[0]) == HEADER
    rows = rows_of(lines[2:lines.index("")])
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]  # --top 5
    steps = [float(r[4].removesuffix(" ms")) for r in rows]
    assert steps == sorted(steps) and all(r[2] == "default" for r in rows)  # one node: one order
    assert all(r[8].startswith("intra-node ") for r in rows)
    [best] = [line for line in lines if line.startswith("best: ")]
    assert best.startswith(f"best: {rows[0][1]} — ") and "ms/step; compute " in best
    [command] = [line for line in lines if line.startswith("run it: ")]
    argv = shlex.split(command.removeprefix("run it: "))
    assert argv[:6] == ["plait", "train", "--config", str(DEMO), "--nproc", "4"] and "--set" in argv
    # The exact command, dry: the runtime accepts the plan and lays it out as the table's best.
    code, out, err = run(*argv[1:], "--dry-run")
    assert code == 0, err
    pp, dp, tp = (re.search(rf"\b{axis}(\d+)", rows[0][1]) for axis in ("pp", "dp", "tp"))
    assert f"pp={pp.group(1) if pp else 1} × dp={dp.group(1) if dp else 1}" in out
    assert f"tp={tp.group(1) if tp else 1}" in out


def test_run_it_keeps_the_users_overrides_and_the_planned_world(interleaved):
    code, out, err = plan("--cluster", str(interleaved), "--top", "1", "--set", "train.global_batch=64")
    assert code == 0, err
    assert "global batch 64" in out.splitlines()[0]
    argv = shlex.split(out.splitlines()[-1].removeprefix("run it: "))
    assert argv[4:8] == ["--nnodes", "4", "--nproc-per-node", "2"] and "train.global_batch=64" in argv
    code, dry, err = run(*argv[1:], "--dry-run")
    assert code == 0, err
    assert re.search(r"batch:\s+global 64 = ", dry)


def test_json_plans_are_sorted_and_each_is_what_the_runtime_accepts(mixed_json):
    plans = mixed_json["plans"]
    assert mixed_json["world"] == 8 and 1 <= len(plans) <= 8
    assert mixed_json["searched"] >= mixed_json["costed"] >= mixed_json["feasible"] >= len(plans)
    steps = [p["step_s"] for p in plans]
    assert steps == sorted(steps)
    assert any(p["parallel"]["pp"] > 1 for p in plans)
    for p in plans:
        lay = p["parallel"]
        config = load_config(DEMO, p["sets"], nproc=8, nnodes=4)
        dims = config.parallel.dims(8)
        assert (dims.pp, dims.dp, dims.cp, dims.tp, dims.ep, dims.etp, dims.edp) == \
            (lay["pp"], lay["dp"], lay["cp"], lay["tp"], lay["ep"], lay["etp"], lay["edp"]), p["layout"]
        assert config.parallel.vpp == lay["vpp"] and config.train.micro_batch == p["micro_batch"]
        assert config.parallel.pp_schedule == p["schedule"]
        # memory: one entry per pp rank, the largest being the plan's peak
        assert [m["pp_rank"] for m in p["memory"]] == list(range(lay["pp"]))
        assert max(m["peak"] for m in p["memory"]) == p["peak_bytes"]
        for m in p["memory"]:
            assert m["peak"] == m["params"] + m["grads"] + m["optimizer"] + max(m["activations"] + m["accumulated"], m["buffers"])
        # the ledger's expected bytes: every axis the layout splits over, nothing on axes it does not
        ledger = p["ledger_bytes"]
        assert ("pp" in ledger) == (lay["pp"] > 1) and ("ep" in ledger) == (lay["ep"] > 1)
        assert ("tp" in ledger) == (lay["tp"] > 1)
        assert all(n > 0 for ops in ledger.values() for n in ops.values())
        assert len(p["nodes"]) == 8 and p["tokens_per_s"] > 0 and 0 < p["mfu"] < 1
    why = mixed_json["why"]
    assert why[0].startswith(f"best: {plans[0]['layout']} — ")
    assert any(line.startswith("data parallel only (") for line in why[1:])


def test_emit_plait_prints_only_overrides_the_runtime_accepts(mixed_json):
    code, out, err = plan("--cluster", str(MIXED), "--emit", "plait")
    assert code == 0, err
    sets = out.split()
    assert len(out.strip().splitlines()) == 1
    assert all(re.fullmatch(r"(parallel|train)\.[a-z_]+=\S+", item) for item in sets), sets
    assert sets == mixed_json["plans"][0]["sets"]
    load_config(DEMO, sets, nproc=8, nnodes=4)
    code, out, err = plan("--nproc", "2", "--emit", "plait")
    assert code == 0, err
    load_config(DEMO, out.split(), nproc=2)


@pytest.mark.parametrize("cluster", ["mixed", "interleaved"])
def test_emit_megatron_matches_the_best_plan(cluster, mixed_json, interleaved_json, interleaved):
    path, best = (MIXED, mixed_json["plans"][0]) if cluster == "mixed" else (interleaved, interleaved_json["plans"][0])
    code, out, err = plan("--cluster", str(path), "--emit", "megatron")
    assert code == 0, err
    lay = best["parallel"]
    assert megatron_sizes(out) == {
        "--tensor-model-parallel-size": lay["tp"], "--pipeline-model-parallel-size": lay["pp"],
        "--context-parallel-size": lay["cp"], "--expert-model-parallel-size": lay["ep"],
        "--expert-tensor-parallel-size": lay["etp"], "--micro-batch-size": best["micro_batch"],
        "--global-batch-size": 32, "--hidden-size": 128, "--ffn-hidden-size": 256,
    }
    assert "--num-experts 4" in out and "--moe-router-topk 2" in out
    assert ("# rank order:" in out) == (best["placement"] != "default")
    assert "--use-distributed-optimizer" in out  # plait's ZeRO-1 default


def test_replicated_optimizer_state_reaches_the_plan():
    """parallel.zero=false: every plan costs the whole model's moments per rank, and Megatron gets no distributed
    optimizer."""
    sharded, replicated = plan_json(), plan_json("--set", "parallel.zero=false")
    # the two moments of every parameter a rank holds (its parameters are views of AdamW's flat copy), against
    # ZeRO-1's shard, moments and reduced gradient of a group's share
    assert all(m["optimizer"] == 2 * m["params"] for p in replicated["plans"] for m in p["memory"])
    assert any(m["optimizer"] < 2 * m["params"] for p in sharded["plans"] for m in p["memory"])
    code, out, err = plan("--set", "parallel.zero=false", "--emit", "megatron")
    assert code == 0, err
    assert "--use-distributed-optimizer" not in out


def test_a_cluster_file_names_its_nic_classes(mixed_json):
    code, out, err = plan("--cluster", str(MIXED), "--top", "3")
    assert code == 0, err
    assert "on mixed-nics (4 node(s) × 2 = 8 devices)" in out
    rows = rows_of(out.splitlines()[2:5])
    # pp2 over these nodes: stage 0 on the two InfiniBand nodes, stage 1 on RoCE and Ethernet
    assert any(re.search(r"\bnic:400G \d", row[8]) for row in rows)
    assert any(re.search(r"\bnic:25G/200G \d", row[8]) for row in rows)
    assert any("uplink" in row[8] for row in rows)
    assert re.search(r"busiest link nic:[\d/G]+", out)
    assert set(mixed_json["plans"][0]["link_bytes"]) >= {"intra-node", "nic:400G", "uplink"}


def test_a_placement_other_than_the_default_is_in_the_sets(interleaved_json, interleaved):
    best = interleaved_json["plans"][0]
    assert best["placement"] != "default"
    [placement] = [s for s in best["sets"] if s.startswith("parallel.placement=")]
    nodes = json.loads(placement.partition("=")[2])
    assert nodes == best["nodes"] and len(nodes) == 8
    assert sorted(nodes) == [0, 0, 1, 1, 2, 2, 3, 3] and nodes != sorted(nodes)
    # the two InfiniBand nodes (0 and 2) take the first stage's ranks together
    assert nodes[:4] == [0, 0, 2, 2]
    config = load_config(DEMO, best["sets"], nproc=8, nnodes=4)
    assert config.parallel.placement == nodes
    slower = [line for line in interleaved_json["why"] if line.startswith("same layout in the default rank order: ")]
    assert len(slower) == 1 and float(re.search(r"order: ([\d.]+)×", slower[0]).group(1)) >= 1.0
    for p in interleaved_json["plans"]:
        assert any(s.startswith("parallel.placement=") for s in p["sets"]) == (p["placement"] != "default")


def test_a_split_by_device_speed_is_in_the_sets_and_the_megatron_arguments(tmp_path):
    cluster = tmp_path / "mixed-devices.yaml"
    cluster.write_text(MIXED_DEVICES)
    argv = ("--cluster", str(cluster), "--set", "model.layers=8", "model.dim=1024", "model.ffn_dim=4096", "model.heads=8")
    found = plan_json(*argv, "--top", "30")
    split = [p for p in found["plans"] if p["stage_layers"] is not None]
    assert split and all(sum(p["stage_layers"]) == 8 for p in split)
    for p in split:
        config = load_config(DEMO, ["model.layers=8", "model.dim=1024", "model.ffn_dim=4096", "model.heads=8", *p["sets"]],
                             nproc=2, nnodes=2)
        assert config.parallel.pp_layers == p["stage_layers"]
    two = next(p for p in split if p["parallel"]["vpp"] == 1 and p["nodes"] == [0, 1])
    first, last = two["stage_layers"]
    assert first < last  # the A100 stage (node 0) holds fewer layers than the H100 stage
    best = found["plans"][0]
    assert best["parallel"]["pp"] == 2 and best["stage_layers"] is not None
    code, out, err = plan(*argv, "--emit", "megatron")
    assert code == 0, err
    if best["parallel"]["vpp"] == 1:
        first, last = best["stage_layers"]
        assert f"--decoder-first-pipeline-num-layers {first}" in out
        assert f"--decoder-last-pipeline-num-layers {last}" in out and "custom layout" not in out
    else:  # virtual stages: Megatron-LM cannot say the split, so the arguments say so
        assert "custom layout" in out and str(best["stage_layers"]) in out
    # one worker per node: no "tp over a node" or "ep over a node" of size 1 among the alternatives, and the best
    # is a pipeline over every node already, so that is no alternative either
    assert not any(re.match(r"(tp|ep)=1\b", line) for line in found["why"])
    assert not any(line.startswith("pipeline over every node") for line in found["why"])
    assert any(line.startswith("data parallel only (dp2 ") for line in found["why"])


@pytest.mark.parametrize("strategy", ["default", "holmes"])
def test_placement_flag_keeps_one_order(strategy, interleaved):
    plans = plan_json("--cluster", str(interleaved), "--placement", strategy, "--top", "5")["plans"]
    assert {p["placement"] for p in plans} == {strategy}
    assert all(any(s.startswith("parallel.placement=") for s in p["sets"]) == (strategy != "default") for p in plans)


def assert_one_line_exit_2(code: int, out: str, err: str, named: str) -> None:
    assert code == 2 and out == ""
    assert err.startswith("plait: error: ") and len(err.strip().splitlines()) == 1 and named in err, err


@pytest.mark.parametrize(("argv", "named"), [
    (["--nproc", "4", "--top", "0"], "--top: got 0"),
    (["--cluster", str(MIXED), "--nproc", "4"], "--nproc: the cluster file gives the workers"),
    (["--nproc", "4", "--set", "parallel.tp=abc"], "config key 'parallel.tp': got 'abc'"),
    (["--nproc", "4", "--set", "parallel.tp=2"], "plait plan chooses every parallel size"),
    (["--nproc", "4", "--set", "model.heads=5"], "config key 'model.heads'"),
    (["--nproc", "4", "--efficiency", "1.5"], "--efficiency: got 1.5"),
])
def test_bad_input_is_one_line_exit_2(argv, named):
    assert_one_line_exit_2(*plan(*argv), named)


def test_a_missing_config_file_is_named(tmp_path):
    assert_one_line_exit_2(*plan("--nproc", "4", config=tmp_path / "absent.yaml"), "config key '--config': got")


def test_a_bad_cluster_field_is_named_with_its_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(INTERLEAVED.replace("gbit: 400,", "gbit: fast,"))
    code, out, err = plan("--cluster", str(bad))
    assert_one_line_exit_2(code, out, err, f"cluster file {bad}: config key 'nics.ib400.gbit': got 'fast'")


def test_nothing_fits_is_one_line_naming_the_shortfall(interleaved, tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(interleaved.read_text().replace("memory_gib: 80", "memory_gib: 0.001"))
    done = subprocess.run([sys.executable, "-m", "plait.runtime.cli", "plan", "--config", str(DEMO), "--cluster",
                           str(tiny)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert re.match(r"plait: error: nothing fits: the smallest layout \(.+\) needs [\d.]+ GiB per device, "
                    r"0\.00 GiB is usable .*; nearest change: about \d+ nodes of \d+ ", line), line


def test_a_model_too_big_for_the_cluster_does_not_fit():
    code, out, err = plan("--cluster", str(MIXED), "--set", "model.dim=65536")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("plait: error: nothing fits: ") and "72.00 GiB is usable (90% of 80 GiB)" in line
    assert "nearest change: " in line


def test_auto_trains_the_planned_layout(tmp_path):
    run_dir = tmp_path / "auto"
    done = subprocess.run(
        [sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(DEMO), "--nproc", "2", "--run-dir",
         str(run_dir), "--set", "parallel.auto=true", "train.steps=2", "train.eval_every=0", "train.eval_batches=1",
         "data.max_bytes=300000", "metrics.enabled=false"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = re.search(r"^plait: parallel\.auto: (.+?) mb(\d+), placement default, predicted [\d.]+ ms/step, "
                      r"[\d.,]+ MiB per device \(of \d+ layouts; plait plan --config \S+ --nproc 2 shows why\)$",
                      done.stdout, re.M)
    assert found, done.stdout
    assert "plait: done: 2 steps" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    name = " ".join(f"{a}{summary['parallel'][a]}" for a in ("pp", "dp", "cp", "tp") if summary["parallel"][a] > 1)
    assert found.group(1).split(" / ")[0] == (name or "dp1")
    # config.yaml holds the chosen layout and loads again as it is
    again = load_config(run_dir / "config.yaml")
    assert not again.parallel.auto and again.train.micro_batch == int(found.group(2))
    assert again.parallel.dims(2).dp == summary["parallel"]["dp"]


def test_auto_chooses_the_micro_batch_the_default_layout_cannot_divide():
    # demo.yaml's micro-batch 8 on dp 8 would need a global batch of 64; the planner picks another
    code, out, err = run("train", "--config", str(DEMO), "--nproc", "8", "--set", "parallel.auto=true", "--dry-run")
    assert code == 0, err
    assert out.startswith("plait: parallel.auto: ") and "auto: false" in out
    code, out, err = run("train", "--config", str(DEMO), "--nproc", "8", "--dry-run")
    assert code == 2 and "'train.global_batch'" in err


def test_auto_with_a_parallel_size_is_refused_naming_it():
    config = load_config(DEMO, ["parallel.auto=true", "parallel.tp=2"], nproc=2)
    with pytest.raises(ConfigError) as caught:
        apply_auto(config, None)
    assert caught.value.key == "parallel.tp" and "parallel.auto" in str(caught.value)
    code, out, err = run("train", "--config", str(DEMO), "--nproc", "2", "--set", "parallel.auto=true",
                         "parallel.tp=2", "--dry-run")
    assert code == 2 and out == ""
    assert err.startswith("plait: error: config key 'parallel.tp': got 2;") and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_memory_of_every_pp_rank(mixed_json):
    piped = next(p for p in mixed_json["plans"] if p["parallel"]["pp"] == 4)
    code, out, err = run("train", "--config", str(DEMO), "--nnodes", "4", "--nproc-per-node", "2", "--dry-run",
                         "--set", *piped["sets"])
    assert code == 0, err
    [per_rank] = re.findall(r"^\s+per pp rank: (.+)$", out, re.M)
    expected = ", ".join(f"{m['pp_rank']}: {m['peak'] / 2**20:,.1f} MiB" for m in piped["memory"])
    assert per_rank == expected
    worst = max(piped["memory"], key=lambda m: m["peak"])
    assert re.search(rf"memory per rank:\s+{worst['peak'] / 2**20:,.1f} MiB at most \(pp rank {worst['pp_rank']}:", out)
    code, out, err = run("train", "--config", str(DEMO), "--nproc", "2", "--dry-run")
    assert code == 0 and "memory per rank:" in out and "per pp rank:" not in out  # one stage: one line
