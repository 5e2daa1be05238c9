"""Two real hosts: node1 and node2 are network namespaces linked only to each other (tests/cluster/start.sh), each
with its own hostname, address, /etc/hosts and node-local disk, and a SLURM cluster across them.

- `sbatch --nodes=2 slurm/train.sh` for the three strategies (Trainer: one SLURM task per process; ddp/Fabric: one
  torchrun per node), 2 CPU processes per node: ranks on both hostnames, num_nodes 2, world size 4; each job gets
  SIGUSR1 after its first checkpoint, requeues itself and resumes on both nodes; the final weights are bit-identical
  to one node with 4 processes resumed from the same step and to the uninterrupted run (DDP's buckets laid out
  once before the first step: core/parallel.settle_buckets);
- `launch/multi_node.sh` (torchrun --nnodes=2, c10d rendezvous at node1) from each node, the three strategies, with
  node2's hostname on 127.0.1.1 (Debian's /etc/hosts): each node takes the interface that routes to MASTER_ADDR
  (core/network.py), bit-identical to the same one-node run; and the one-line refusals when the network cannot work;
- a node that never arrives: node1's half alone stops with one line naming what is missing, in bounded time
  (torchrun's rendezvous; and the processes of an srun job at process-group initialisation);
- node-local disks: data.root and run.dir on each node's own disk: both nodes prepare intact data, and every rank
  resumes from rank 0's choice of checkpoint even where the other node's run dir holds a newer one.

One config for all the runs compared (`COMMON`): 100 optimizer steps of 128 samples, a checkpoint every 10.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import (
    REPO,
    STRATEGIES,
    Job,
    assert_resumed_exactly,
    child_env,
    free_port,
    max_abs_diff,
    metrics,
    ok,
    same_weights,
    torchrun,
    torchrun_cmd,
    weights,
)

from distmnist.core import data as dm_data

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

MULTI_NODE = REPO / "launch" / "multi_node.sh"
COMMON = ("-c", "smoke", "data.train_samples=6400", "checkpoint.every_n_steps=10", "checkpoint.keep=100",
          "dist.timeout_s=60")
STEPS = 2 * 6400 // (4 * 32)  # 2 epochs, 4 processes x batch 32: 100 optimizer steps
SBATCH = {  # 2 nodes, 2 CPU processes per node
    "ddp": ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2"),
    "fabric": ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2"),
    "trainer": ("--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"),
}
RANK_LINE = re.compile(r"rank (\d+) of (\d+) on (\S+) \(node rank (\d+), local rank (\d+)\)")


def ranks_by_host(log: str) -> dict[str, set[int]]:
    """{hostname: ranks} from the one line every process prints at start (the launch scripts')."""
    hosts: dict[str, set[int]] = {}
    for rank, world, host, _node, _local in RANK_LINE.findall(log):
        assert world == "4", log
        hosts.setdefault(host, set()).add(int(rank))
    return hosts


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run on one node: torchrun, 4 processes, raw DDP (the strategies train the same weights).
    It keeps every checkpoint (one per 10 steps) for resumed_reference."""
    tmp = tmp_path_factory.mktemp("reference")
    started = time.monotonic()
    ok(torchrun("distmnist.ddp", *COMMON, f"run.dir={tmp / 'run'}", nproc=4, cwd=tmp, timeout=300))
    print(f"reference (1 node x 4 processes) took {time.monotonic() - started:.1f} s")
    return tmp / "run"


@pytest.fixture(scope="module")
def resumed_reference(reference, tmp_path_factory):
    """step -> a one-node, 4-process run resumed from the reference's checkpoint at that step (made once per step)."""
    made: dict[int, Path] = {}

    def at(step: int) -> Path:
        if step not in made:
            run = tmp_path_factory.mktemp(f"resumed{step}") / "run"
            (run / "checkpoints").mkdir(parents=True)
            shutil.copy(reference / "config.yaml", run / "config.yaml")
            ckpt = f"step={step:08d}.ckpt"
            shutil.copy(reference / "checkpoints" / ckpt, run / "checkpoints" / ckpt)
            proc = ok(torchrun("distmnist.ddp", *COMMON, f"run.dir={run}", nproc=4, cwd=run.parent, timeout=300))
            assert f"resuming from {run}/checkpoints/{ckpt}" in proc.stdout + proc.stderr
            made[step] = run
        return made[step]

    return at


# ------------------------------------------------------------------------------------------ sbatch --nodes=2
@pytest.fixture(scope="module")
def sbatch_jobs(two_node_cluster, tmp_path_factory):
    """The three strategies' two-node jobs, submitted together; each gets `scancel --signal=USR1 --batch` (what
    --signal=B:USR1@120 sends before the time limit) once its first checkpoint is there, requeues itself and
    resumes. One run per strategy serves the training, the layout and the requeue assertions."""
    tmp = tmp_path_factory.mktemp("sbatch")
    jobs = {s: Job(two_node_cluster, tmp, SBATCH[s], ("--strategy", s, *COMMON), timeout=420) for s in STRATEGIES}
    try:
        signalled: dict[str, float] = {}
        while len(signalled) < len(jobs):
            for strategy, job in jobs.items():
                if strategy in signalled:
                    continue
                if any((job.run_dir / "checkpoints").glob("step=*.ckpt")):
                    job.scontrol("scancel", "--signal=USR1", "--batch", str(job.id))
                    signalled[strategy] = time.monotonic()
                elif job.proc.poll() is not None or time.monotonic() - job.started > 300:
                    job.wait()
                    pytest.fail(f"{strategy}: no checkpoint while the job ran\n{job.describe()}")
            time.sleep(0.1)
        for strategy, job in jobs.items():
            job.wait()
            print(f"{strategy}: job {job.id}: first checkpoint {signalled[strategy] - job.started:.1f} s after sbatch, "
                  f"done {job.elapsed:.1f} s after sbatch (3 jobs at once, one requeue each)")
        yield jobs
    finally:
        for job in jobs.values():
            job.cancel()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sbatch_on_two_nodes_trains_with_ranks_on_both_hosts(sbatch_jobs, strategy):
    job = sbatch_jobs[strategy]
    assert job.rc == 0, job.describe()
    log = job.log
    assert f"strategy={strategy} nodes=2 processes=4 (2 per node, CPU, gloo)" in log, log
    assert "rendezvous=node1:" in log, log
    hosts = ranks_by_host(log.split("restart=1")[-1])  # the run that finished, after the requeue
    assert hosts == {"node1": {0, 1}, "node2": {2, 3}}, log
    m = metrics(job.run_dir)
    assert (m["strategy"], m["num_nodes"], m["world_size"], m["global_step"]) == (strategy, 2, 4, STEPS), m


def stopped_at(job: Job) -> int:
    stop = re.search(r"distmnist: stopped by SIGUSR1 at step (\d+)", job.log)
    assert stop, f"the job was not stopped by the signal\n{job.describe()}"
    return int(stop.group(1))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sbatch_on_two_nodes_requeues_and_resumes_as_one_node_does(sbatch_jobs, resumed_reference, strategy):
    """Stopped by SIGUSR1 at step S on two nodes, requeued, resumed on two nodes: the same weights as one node with 4
    processes resumed from the same step S (see the next test for the uninterrupted run)."""
    job = sbatch_jobs[strategy]
    assert job.rc == 0, job.describe()
    log = job.log
    step = stopped_at(job)
    assert 0 < step < STEPS, f"stopped at step {step}: the run was too short to be interrupted"
    assert f"requeued job {job.id}" in log and f"restart=1 job={job.id}" in log, log
    assert f"resuming from {job.run_dir}/checkpoints/step={step:08d}.ckpt" in log, log
    # both runs, before and after the requeue, had ranks on both nodes
    before, after = log.split("restart=1")
    assert set(ranks_by_host(before)) == set(ranks_by_host(after)) == {"node1", "node2"}, log
    assert same_weights(weights(job.run_dir), weights(resumed_reference(step))), \
        "two nodes, interrupted and requeued, differ from one node with 4 processes resumed at the same step"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sbatch_on_two_nodes_requeued_equals_the_uninterrupted_run(sbatch_jobs, reference, strategy):
    job = sbatch_jobs[strategy]
    assert job.rc == 0, job.describe()
    diff = max_abs_diff(weights(job.run_dir), weights(reference))
    assert same_weights(weights(job.run_dir), weights(reference)), f"max |diff| {diff:.3g}"


# ------------------------------------------------------------------------------ two nodes, resubmitted on one
# A fixed global batch of 128: 2 nodes x 2 processes x batch 32, then 1 node x 2 processes x batch 32 x
# accumulation 2 (derived). Longer than COMMON (402 steps: 201 of 128 an epoch, the last one padded) so that the
# stop lands well before the end, with its own uninterrupted reference; cosine, so the learning rate changes at
# every step.
ELASTIC = ("-c", "smoke", "data.train_samples=25610", "data.global_batch_size=128", "optim.schedule=cosine",
           "checkpoint.every_n_steps=10", "dist.timeout_s=60")
ELASTIC_STEPS = 2 * 201


@pytest.fixture(scope="module")
def resubmitted_on_one_node(two_node_cluster, tmp_path_factory):
    """Raw DDP (one torchrun per node: the cheapest path), `sbatch --nodes=2`, world size 4, stopped by
    `scancel --signal=USR1 --batch` after its first checkpoint; DISTMNIST_MAX_REQUEUES=0 so the job ends instead of
    requeueing itself onto the same two nodes; the same run dir submitted again with `--nodes=1` (world size 2).
    Meanwhile the uninterrupted run: torchrun on this machine, 4 processes (bit-identical to two nodes x 2, above)."""
    tmp = tmp_path_factory.mktemp("resubmit")
    run_dir, ref_dir = tmp / "runs" / "g128", tmp / "reference"
    args = ("--strategy", "ddp", *ELASTIC, f"run.dir={run_dir}")
    ref = subprocess.Popen(torchrun_cmd("distmnist.ddp", *ELASTIC, f"run.dir={ref_dir}", nproc=4), cwd=tmp,
                           env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = Job(two_node_cluster, tmp, SBATCH["ddp"], args, timeout=240, env={"DISTMNIST_MAX_REQUEUES": "0"})
    second = None
    try:
        deadline = time.monotonic() + 180
        while not any((run_dir / "checkpoints").glob("step=*.ckpt")):
            assert first.proc.poll() is None and time.monotonic() < deadline, first.describe()
            time.sleep(0.05)
        first.scontrol("scancel", "--signal=USR1", "--batch", str(first.id))
        first.wait()
        second = Job(two_node_cluster, tmp, ("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"), args,
                     timeout=240)
        second.wait()
        ref_out = ref.communicate(timeout=240)[0]
        print(f"2 nodes until SIGUSR1: {first.elapsed:.1f} s; resubmitted on 1 node: {second.elapsed:.1f} s")
        assert ref.returncode == 0, ref_out[-5000:]
        yield first, second, run_dir, ref_dir
    finally:
        for job in (first, second):
            if job is not None:
                job.cancel()
        if ref.poll() is None:
            ref.kill()


@pytest.mark.timeout(600)
def test_a_two_node_job_resubmitted_on_one_node_resumes_exactly(resubmitted_on_one_node):
    first, second, run_dir, ref_dir = resubmitted_on_one_node
    log = first.log
    assert f"strategy=ddp nodes=2 processes=4 (2 per node, CPU, gloo) run.dir={run_dir} restart=0" in log, log
    assert ranks_by_host(log) == {"node1": {0, 1}, "node2": {2, 3}}, log
    step = stopped_at(first)
    assert 0 < step < ELASTIC_STEPS, f"stopped at step {step}: the run was too short to be interrupted"
    assert first.rc not in (0, None) and "requeued job" not in log, first.describe()
    assert f"not requeueing; resubmit with run.dir={run_dir} to resume" in log, log
    log = second.log
    assert second.rc == 0, second.describe()
    assert f"strategy=ddp nodes=1 processes=2 (2 per node, CPU, gloo) run.dir={run_dir} restart=0" in log, log
    ranks = {(int(rank), host) for rank, world, host, *_ in RANK_LINE.findall(log) if world == "2"}
    assert {rank for rank, _ in ranks} == {0, 1} and len({host for _, host in ranks}) == 1, log
    assert f"resuming from {run_dir}/checkpoints/step={step:08d}.ckpt" in log, log
    m = metrics(run_dir)
    assert (m["num_nodes"], m["world_size"], m["accumulate_grad_batches"], m["global_batch_size"]) == (1, 2, 2, 128), m
    assert [h["train_samples"] for h in m["history"]] == [201 * 128] * 2, m["history"]  # padded alike at any W
    diff = assert_resumed_exactly(run_dir, ref_dir, tolerance=1e-5)
    print(f"stopped at step {step} of {ELASTIC_STEPS} on 2 nodes x 2 processes, resumed on 1 node x 2 x accumulation "
          f"2: max abs weight difference vs the uninterrupted 4-process run {diff:.3g}")


# --------------------------------------------------------------------------------------- two-host torchrun
def multi_node(cluster, node: str, strategy: str, port: int, *args: str, hosts: Path | None = None,
               **env: str) -> subprocess.Popen:
    launch = ["bash", MULTI_NODE, "--nnodes", "2", "--endpoint", f"node1:{port}", "--strategy", strategy,
              "--nproc", "2", "--run-id", f"test-{strategy}", "--", *args]
    if hosts is not None:  # bind-mounted on /etc/hosts in this node's own mount namespace only (tests/cluster/on)
        launch = ["bash", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *launch]
    cmd = cluster.on(node, *launch)
    return subprocess.Popen(["timeout", "300", *cmd], env=child_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# The interface (core/network.py): node2's /etc/hosts maps its own name to 127.0.1.1, what a default Debian or Ubuntu
# install writes. Without the choice gloo listens there and node1 is refused (`Gloo connectFullMesh failed ...
# remote=[127.0.1.1]`, "rank 0 lost its peers", both nodes exit 1); with it both nodes train.
NS = os.environ.get("CLUSTER_NS", "dm2n")  # tests/cluster/start.sh's namespaces and veth ends: {NS}a, {NS}b
INTERFACE_LINE = re.compile(r"distmnist: (\S+): network interface (\S+) \((\S+)\) reaches MASTER_ADDR=(\S+) "
                            r"\((\S+)\); (.*)")


def debian_hosts(cluster, folder: Path, node: str = "node2") -> Path:
    """The cluster's /etc/hosts with `node`'s own name on 127.0.1.1 (the other node keeps its address)."""
    path = folder / f"hosts.{node}"
    path.write_text(re.sub(rf"^\S+\s+{node}$", f"127.0.1.1 {node}", (cluster.dir / "hosts").read_text(), flags=re.M))
    return path


DEAD = f"{NS}0"  # sorts before the cluster's own interface: the one NCCL, say, would try first


def dead_interface(cluster, node: str) -> None:
    """A second interface on `node` that reaches nothing: a veth pair with both ends inside the node, up, with
    an address of TEST-NET-2 -- a choice by name or by order rather than by route would take it."""
    subprocess.run(cluster.on(node, "ip", "link", "del", DEAD), capture_output=True, timeout=30)  # a run killed
    for cmd in (["ip", "link", "add", DEAD, "type", "veth", "peer", "name", f"{NS}1"],
                ["ip", "addr", "add", "198.51.100.2/24", "dev", DEAD],
                ["ip", "link", "set", DEAD, "up"], ["ip", "link", "set", f"{NS}1", "up"]):
        subprocess.run(cluster.on(node, *cmd), check=True, capture_output=True, timeout=30)


def node_address(cluster, node: str) -> str:
    return next(line.split()[0] for line in (cluster.dir / "hosts").read_text().splitlines() if line.endswith(node))


@pytest.fixture(scope="module")
def torchrun_runs(two_node_cluster, tmp_path_factory):
    """launch/multi_node.sh on node1 and on node2, for the three strategies at once (one endpoint each); node2 with
    its hostname on 127.0.1.1 (above); fabric's node1 with GLOO_SOCKET_IFNAME set by the user."""
    tmp = tmp_path_factory.mktemp("torchrun")
    hosts = debian_hosts(two_node_cluster, tmp)
    dead_interface(two_node_cluster, "node2")
    started = time.monotonic()
    procs = {
        s: [multi_node(two_node_cluster, "node1", s, 29400 + i, *COMMON, f"run.dir={tmp / s}",
                       **({"GLOO_SOCKET_IFNAME": f"{NS}a"} if s == "fabric" else {})),
            multi_node(two_node_cluster, "node2", s, 29400 + i, *COMMON, f"run.dir={tmp / s}", hosts=hosts)]
        for i, s in enumerate(STRATEGIES)
    }
    results = {}
    try:
        for s, pair in procs.items():
            results[s] = [(p.wait(timeout=330), *p.communicate()) for p in pair]
    finally:
        for pair in procs.values():
            for p in pair:
                if p.poll() is None:
                    p.kill()
        subprocess.run(two_node_cluster.on("node2", "ip", "link", "del", DEAD), capture_output=True, timeout=30)
    print(f"three two-host torchrun runs at once took {time.monotonic() - started:.1f} s")
    return two_node_cluster, tmp, results


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torchrun_across_two_hosts_matches_one_node(torchrun_runs, reference, strategy):
    """node2's hostname on 127.0.1.1 (debian_hosts) and a dead second interface (dead_interface): each node takes
    the interface towards MASTER_ADDR, and the weights are those of one node with 4 processes."""
    cluster, tmp, results = torchrun_runs
    for node, (rc, out, err) in zip(("node1", "node2"), results[strategy], strict=True):
        assert rc == 0, f"{node}: exit {rc}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
    logs = "".join(out + err for _, out, err in results[strategy])
    assert ranks_by_host(logs) == {"node1": {0, 1}, "node2": {2, 3}}, logs[-5000:]
    # the interface that routes to MASTER_ADDR, said once per node (2 processes each); the user's variable kept
    for node, (_, _, err) in zip(("node1", "node2"), results[strategy], strict=True):
        lines = INTERFACE_LINE.findall(err)
        assert len(lines) == 1, f"{node}: {lines}\n{err[-3000:]}"
        host, interface, source, _master, master_address, settings = lines[0]
        assert interface == f"{NS}{'a' if node == 'node1' else 'b'}", lines  # node2's dead {NS}0 is passed over
        theirs = " (yours)" if (node, strategy) == ("node1", "fabric") else ""
        assert (host, source, master_address) == (node, node_address(cluster, node), node_address(cluster, "node1"))
        assert settings == f"GLOO_SOCKET_IFNAME={interface}{theirs}, NCCL_SOCKET_IFNAME={interface}", lines
    m = metrics(tmp / strategy)
    assert (m["strategy"], m["num_nodes"], m["world_size"], m["global_step"]) == (strategy, 2, 4, STEPS), m
    assert same_weights(weights(tmp / strategy), weights(reference)), "two hosts differ from one node with 4 processes"


@pytest.mark.timeout(420)
def test_the_rendezvous_node_on_127_0_1_1_listens_where_the_others_reach_it(two_node_cluster, reference, tmp_path):
    """node1 -- MASTER_ADDR, the rendezvous host -- maps its own name to 127.0.1.1: there MASTER_ADDR is loopback,
    on node2 it is node1's address. At start-up rank 0 sees both answers and node1 takes the interface that holds
    the address node2 sees; the weights are one node's. With the choice switched off on node1: one line (exit 69
    of the workers) before any collective."""
    hosts = debian_hosts(two_node_cluster, tmp_path, "node1")
    cluster_address = node_address(two_node_cluster, "node1")
    results = []
    for name, env in (("picked", {}), ("off", {"DISTMNIST_NO_IFNAME_PICK": "1"})):
        pair = [multi_node(two_node_cluster, "node1", "ddp", 29420, *COMMON, f"run.dir={tmp_path / name}",
                           hosts=hosts, **env),
                multi_node(two_node_cluster, "node2", "ddp", 29420, *COMMON, f"run.dir={tmp_path / name}")]
        try:
            results.append([(p.wait(timeout=330), *p.communicate()) for p in pair])
        finally:
            for p in pair:
                if p.poll() is None:
                    p.kill()
    (rc1, out1, err1), (rc2, out2, err2) = results[0]
    assert (rc1, rc2) == (0, 0), f"node1: {err1[-3000:]}\nnode2: {err2[-3000:]}"
    lines = INTERFACE_LINE.findall(err1)
    assert len(lines) == 1, err1[-3000:]
    host, interface, source, master, master_address, settings = lines[0]
    assert (host, interface, source, master, master_address) == ("node1", f"{NS}a", cluster_address, "node1",
                                                                 cluster_address), lines
    assert same_weights(weights(tmp_path / "picked"), weights(reference))
    (rc1, _, err1), _ = results[1]
    ours = [ln for ln in err1.splitlines() if ln.startswith("distmnist: error:")]
    assert rc1 != 0 and len(ours) == 1, err1[-3000:]  # the workers' 69; torchrun's agent itself exits 1
    assert f"MASTER_ADDR=node1 is loopback on node1 (its /etc/hosts) but {cluster_address}" in ours[0], ours


# --------------------------------------------------------------------------------------- a node is missing
@pytest.mark.timeout(120)
def test_torchrun_with_a_missing_node_stops_with_one_line(two_node_cluster, tmp_path):
    """node1's half of a two-node job alone: its agent stops after the start-up timeout with one line naming the
    endpoint, the node that did arrive and what to check -- no traceback, no process started, no run dir."""
    timeout_s = 10
    started = time.monotonic()
    proc = multi_node(two_node_cluster, "node1", "ddp", 29410, *COMMON, f"run.dir={tmp_path / 'run'}",
                      DISTMNIST_STARTUP_TIMEOUT_S=str(timeout_s))
    lines, line_at = [], None
    for line in proc.stderr:  # read as it comes: when did the line appear?
        lines.append(line)
        if "error:" in line and line_at is None:
            line_at = time.monotonic() - started
    rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - started
    err = "".join(lines)
    errors = [line for line in lines if "error:" in line]
    print(f"missing node: the line appeared {line_at} s after the start (start-up timeout {timeout_s} s), "
          f"exit {rc} after {elapsed:.1f} s:\n{errors}")
    assert rc != 0, err
    assert len(errors) == 1, err
    assert ("not all 2 nodes joined the rendezvous at node1:29410 within 10 s: this node (node1) did" in errors[0]
            and "--nnodes=2" in errors[0] and "reachable" in errors[0]), err
    assert "Traceback" not in err and "RendezvousTimeoutError" not in err, err
    assert RANK_LINE.search(err) is None, "a training process started"
    assert not (tmp_path / "run").exists()
    assert timeout_s <= line_at < timeout_s + 60, line_at  # ~10 s of start-up on a busy 2-core machine, 18-28 s seen


@pytest.mark.timeout(240)
def test_srun_tasks_with_a_missing_node_stop_with_one_line(two_node_cluster, tmp_path):
    """The Trainer's srun layout (one task per process), node1's two tasks of four alone: each stops at process-group
    initialisation after dist.startup_timeout_s with one line saying what is missing."""
    from distmnist.core.config import DistConfig

    if "startup_timeout_s" not in DistConfig.__dataclass_fields__:
        pytest.skip("dist.startup_timeout_s is not in this tree yet (the worker-side start-up timeout)")
    port = free_port()
    base = dict(SLURM_JOB_ID="9999", SLURM_JOB_NAME="distmnist", SLURM_STEP_ID="0", SLURM_NTASKS="4",
                SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_NODEID="0",
                MASTER_ADDR="node1", MASTER_PORT=str(port))
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            # dist.timeout_s=600: without the start-up timeout they would wait that long (then pytest's timeout)
            two_node_cluster.on("node1", sys.executable, "-m", "distmnist.trainer", *COMMON, "dist.timeout_s=600",
                                "dist.startup_timeout_s=10", f"run.dir={tmp_path / 'run'}"),
            env=child_env(**base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    results = [(p.wait(timeout=90), p.communicate()[1]) for p in procs]
    elapsed = time.monotonic() - started
    print(f"srun layout, missing node: both tasks ended {elapsed:.1f} s after the start (start-up timeout 10 s; "
          f"the import of torch and Lightning is most of it)\n{results[0][1].strip().splitlines()[-1:]}")
    for rc, err in results:
        assert rc != 0, err
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and "missing" in errors[0] and " of 4 " in errors[0], err
        assert "Traceback" not in err, err
    assert elapsed < 150, elapsed  # 52 s seen on a busy 2-core machine


# ------------------------------------------------------------------------------------------ node-local disks
@pytest.fixture(scope="module")
def node_local_run(two_node_cluster, tmp_path_factory):
    """Fashion-MNIST (2560 training samples) with data.root and run.dir on each node's own disk, Lightning Trainer
    under launch/multi_node.sh: every node prepares its own copy of the data; rank 0's run dir (node1) gets the
    checkpoints."""
    # a fresh folder on both node-local disks (the cluster, and its disks, may outlive a test session)
    name = f"{tmp_path_factory.getbasetemp().name}-{tmp_path_factory.mktemp('local').name}"
    for node in ("node1", "node2"):
        shutil.rmtree(two_node_cluster.local_of(node) / name, ignore_errors=True)
    local = two_node_cluster.local / name
    args = ("-c", "smoke", "data.name=fashion-mnist", f"data.root={local}/data", "data.train_samples=2560",
            f"run.dir={local}/run", "checkpoint.every_n_steps=5", "checkpoint.keep=10", "dist.timeout_s=60")

    def run(port):
        started = time.monotonic()
        pair = [multi_node(two_node_cluster, node, "trainer", port, *args) for node in ("node1", "node2")]
        results = [(p.wait(timeout=330), *p.communicate()) for p in pair]
        for node, (rc, out, err) in zip(("node1", "node2"), results, strict=True):
            assert rc == 0, f"{node}: exit {rc}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
        return time.monotonic() - started, "".join(out + err for _, out, err in results)

    took, log = run(29420)
    print(f"node-local Fashion-MNIST run took {took:.1f} s")
    return two_node_cluster, name, run, log


def test_each_node_prepares_its_own_intact_data(node_local_run):
    cluster, name, _, log = node_local_run
    copies = {}
    for node in ("node1", "node2"):
        raw = cluster.local_of(node) / name / "data" / "FashionMNIST" / "raw"
        files = sorted(p.name for p in raw.iterdir())
        assert set(dm_data.RAW_FILES) <= set(files), (node, files)
        for f in dm_data.RAW_FILES:
            if "images" in f:
                dm_data.header_check(raw / f)  # size = what the header says
        copies[node] = {f: (raw / f).read_bytes() for f in dm_data.RAW_FILES}
    assert copies["node1"] == copies["node2"]
    m = metrics(cluster.local_of("node1") / name / "run")
    assert (m["num_nodes"], m["world_size"], m["dataset"]) == (2, 4, "fashion-mnist"), m
    assert not (cluster.local_of("node2") / name / "run" / "model.pt").exists()  # rank 0 (node1) writes it


@pytest.mark.timeout(600)
def test_every_rank_resumes_from_rank_0s_checkpoint_with_node_local_run_dirs(node_local_run):
    """node1 keeps an early checkpoint only, node2's run dir a newer one too: all four ranks resume from rank 0's
    choice (node2 alone would take its newest), and the result equals the uninterrupted run's. A rank that resumed
    elsewhere would be out of step with the others."""
    cluster, name, run, _ = node_local_run
    run1, run2 = (cluster.local_of(node) / name / "run" for node in ("node1", "node2"))
    final = weights(run1)
    shutil.rmtree(run2, ignore_errors=True)
    shutil.copytree(run1, run2)
    ckpts = sorted((run1 / "checkpoints").glob("step=*.ckpt"))
    steps = [int(p.stem.split("=")[1]) for p in ckpts]
    assert len(steps) >= 3, steps
    chosen, newer = steps[0], steps[-2]
    for p in ckpts:
        step = int(p.stem.split("=")[1])
        if step != chosen:
            p.unlink()  # node1: the first checkpoint only
        if step not in (chosen, newer):
            (run2 / "checkpoints" / p.name).unlink()  # node2: the first and a newer one
    for d in (run1, run2):
        (d / "model.pt").unlink()
    _, log = run(29421)
    assert f"resuming from {cluster.local}/{name}/run/checkpoints/step={chosen:08d}.ckpt" in log, log[-5000:]
    assert f"step={newer:08d}.ckpt" not in log, log[-5000:]
    m = metrics(run1)
    assert (m["num_nodes"], m["world_size"], m["global_step"]) == (2, 4, steps[-1]), m
    # Ranks that resumed from different checkpoints would differ in momentum and data position from the first step
    # on (or fall out of step in a collective and fail).
    diff = max_abs_diff(weights(run1), final)
    assert same_weights(weights(run1), final), f"resumed from rank 0's checkpoint, the weights differ by {diff:.3g}"


# ------------------------------------------------------------------------------- the network cannot work
# core/network.choose_interface in node2's namespace with its hostname on 127.0.1.1 (no torch: a fraction of a
# second for all the cases): what it sets, and the one line it refuses with.
PROBE = """
import json, sys
from distmnist.core import network
from distmnist.core.errors import NetworkUnusable
out = {}
for name, nodes, environ in json.loads(sys.argv[1]):
    try:
        choice = network.choose_interface(nodes, "gloo", environ)
        out[name] = {"line": choice and choice.line(), "env": {k: environ.get(k) for k in network.IFNAME_VARS}}
    except NetworkUnusable as err:
        out[name] = {"error": str(err)}
print(json.dumps(out))
"""


@pytest.mark.timeout(180)
def test_the_interface_choice_and_its_refusals(two_node_cluster, tmp_path):
    """On node2 (hostname on 127.0.1.1): the choice, the user's variable kept, nothing on one node or towards a
    loopback MASTER_ADDR; the switch off, an unroutable and (end to end, a training process at process-group
    initialisation) an unresolvable MASTER_ADDR: one line, exit 69, at once rather than after a timeout."""
    cases = [
        ("picked", 2, {"MASTER_ADDR": "node1"}),
        ("yours", 2, {"MASTER_ADDR": "node1", "GLOO_SOCKET_IFNAME": "mine0"}),
        ("one node", 1, {"MASTER_ADDR": "127.0.0.1"}),
        ("off", 2, {"MASTER_ADDR": "node1", "DISTMNIST_NO_IFNAME_PICK": "1"}),
        ("loopback", 2, {"MASTER_ADDR": "localhost"}),  # every node on this machine: the defaults work
        ("unroutable", 2, {"MASTER_ADDR": "203.0.113.7"}),  # TEST-NET-3: node2 has no route there, nothing is sent
    ]
    hosts = debian_hosts(two_node_cluster, tmp_path)
    proc = subprocess.run(
        two_node_cluster.on("node2", "bash", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts,
                            sys.executable, "-c", PROBE, json.dumps(cases)),
        env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    print(json.dumps(got, indent=1))
    mine = f"{NS}b"
    assert got["picked"]["env"] == {"GLOO_SOCKET_IFNAME": mine, "NCCL_SOCKET_IFNAME": mine}, got
    assert got["picked"]["line"].startswith(f"distmnist: node2: network interface {mine} "), got
    assert got["yours"]["env"] == {"GLOO_SOCKET_IFNAME": "mine0", "NCCL_SOCKET_IFNAME": mine}, got
    assert "GLOO_SOCKET_IFNAME=mine0 (yours)" in got["yours"]["line"], got
    assert got["one node"] == {"line": None, "env": {"GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": None}}, got
    assert "hostname node2 resolves to the loopback address 127.0.1.1" in got["off"]["error"], got
    assert got["loopback"] == got["one node"], got
    assert "no interface of node2 reaches 203.0.113.7" in got["unroutable"]["error"], got

    # end to end: one task of a two-node srun job (the layout of test_srun_tasks_with_a_missing_node_...)
    env = dict(SLURM_JOB_ID="9998", SLURM_JOB_NAME="distmnist", SLURM_STEP_ID="0", SLURM_NTASKS="4",
               SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0", MASTER_ADDR="nosuch.invalid", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    proc = subprocess.run(
        two_node_cluster.on("node1", sys.executable, "-m", "distmnist.ddp", *COMMON, "dist.startup_timeout_s=300",
                            f"run.dir={tmp_path / 'run'}"),
        env=child_env(**env), capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    print(f"MASTER_ADDR=nosuch.invalid: exit {proc.returncode} after {elapsed:.1f} s: {errors}")
    assert proc.returncode == 69, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("distmnist: error: network: nosuch.invalid does not resolve"), \
        proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < 60, elapsed  # the import of torch; the start-up timeout is 300 s


# ------------------------------------------------------------------------------------------ distmnist doctor
LISTEN = """
import socket, sys, time
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.timeout(180)
def test_doctor_on_node2_names_the_loopback_hostname_and_the_interface(two_node_cluster, tmp_path):
    """`distmnist doctor --endpoint node1:PORT` on node2 (a port node1 listens on): with node2's hostname on
    127.0.1.1 it lists that one problem, exit 1, and names the interface a job would take; with the cluster's own
    /etc/hosts (node2 on its address) the same report finds nothing, exit 0."""
    listener = subprocess.Popen(two_node_cluster.on("node1", sys.executable, "-c", LISTEN, "120"), env=child_env(),
                                stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        hosts = debian_hosts(two_node_cluster, tmp_path)
        cmd = (sys.executable, "-m", "distmnist", "doctor", "--endpoint", f"node1:{port}")
        runs = {}
        for case, launch in (("127.0.1.1", ("bash", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts, *cmd)),
                             ("own address", cmd)):
            started = time.monotonic()
            proc = subprocess.run(two_node_cluster.on("node2", *launch), env=child_env(), capture_output=True,
                                  text=True, timeout=60)
            runs[case] = proc
            print(f"--- node2, hostname on {case}: exit {proc.returncode} in {time.monotonic() - started:.1f} s\n"
                  f"{proc.stdout}{proc.stderr}")
    finally:
        listener.kill()
        listener.wait()
    mine, node2, node1 = f"{NS}b", node_address(two_node_cluster, "node2"), node_address(two_node_cluster, "node1")
    looped, fine = runs["127.0.1.1"], runs["own address"]
    assert looped.returncode == 1, looped.stdout + looped.stderr
    out = looped.stdout
    assert "hostname      node2 -> 127.0.1.1 (loopback only)" in out, out
    assert (f"endpoint      node1:{port} -> {node1} via {mine} ({node2}); a job spanning nodes sets "
            f"GLOO_SOCKET_IFNAME={mine}, NCCL_SOCKET_IFNAME={mine}") in out, out
    assert f"port          {port} on {node1}: answers" in out, out
    assert "problems (1):" in out, out
    problem = out.split("problems (1):\n  - ", 1)[1]
    assert problem.startswith("this node's hostname node2 resolves to the loopback address 127.0.1.1"), problem
    assert f"distmnist sets GLOO_SOCKET_IFNAME={mine} itself" in problem, problem
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert f"hostname      node2 -> {node2}\n" in fine.stdout, fine.stdout
    assert fine.stdout.rstrip().endswith("problems: none found"), fine.stdout


# ------------------------------------------------------------------------------- a peer's failure, named at rank 0
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.timeout(300)
@pytest.mark.skipif(not all((FASHION / f"{n}.gz").is_file() for n in dm_data.RAW_FILES),
                    reason=f"needs the Fashion-MNIST files in {FASHION}")
def test_a_known_error_on_node2_alone_is_named_on_node1(two_node_cluster, tmp_path):
    """data.root on each node's own disk, node2's copy with train-images cut in half: node2's ranks stop with the line
    that names the file (exit 2) and leave it in the job's store (core/peers.py); node1's ranks, whose collective
    fails when node2's close their connections, say "rank R on node2 stopped: <that line>" instead of "lost its
    peers" (exit 1)."""
    import gzip

    name = f"peer-{tmp_path.name}"
    for node in ("node1", "node2"):
        raw = two_node_cluster.local_of(node) / name / "data" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in dm_data.RAW_FILES:
            content = gzip.decompress((FASHION / f"{f}.gz").read_bytes())
            if node == "node2" and f == "train-images-idx3-ubyte":
                content = content[: len(content) // 2]
            (raw / f).write_bytes(content)
    args = ("-c", "smoke", "data.name=fashion-mnist", f"data.root={two_node_cluster.local / name}/data",
            "data.download=false", "data.train_samples=2560", f"run.dir={tmp_path / 'run'}", "dist.timeout_s=60")
    started = time.monotonic()
    try:
        pair = [multi_node(two_node_cluster, node, "ddp", 29430, *args) for node in ("node1", "node2")]
        (rc1, out1, err1), (rc2, out2, err2) = [(p.wait(timeout=240), *p.communicate()) for p in pair]
    finally:
        for node in ("node1", "node2"):
            shutil.rmtree(two_node_cluster.local_of(node) / name, ignore_errors=True)
    elapsed = time.monotonic() - started
    said2 = [line for line in err2.splitlines() if line.startswith("distmnist: error: ")]
    said1 = [line for line in err1.splitlines() if line.startswith("distmnist: error: ")]
    print(f"node2's data damaged: node1 exit {rc1}, node2 exit {rc2}, after {elapsed:.1f} s\nnode2: {said2}\n"
          f"node1: {said1}")
    # the data check at start-up is agreed by all ranks (data.all_ensure_available): rank 0 on node1 says it once
    assert rc2 != 0 and rc1 != 0, f"node1: exit {rc1}, node2: exit {rc2}\n{err1[-3000:]}\n{err2[-3000:]}"
    assert "lost its peers" not in err1, err1[-5000:]
    named = re.compile(r"distmnist: error: rank ([23]) on node2 stopped: (.*)$")
    assert len(said1) == 1 and named.match(said1[0]), said1
    line = named.match(said1[0]).group(2)
    assert "train-images-idx3-ubyte" in line and "is truncated" in line, said1
    assert said2 == [], said2  # node2's ranks leave the line to rank 0
