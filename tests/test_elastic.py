"""Elastic and exact (issue 16): a fixed global batch of 192, a run stopped mid-epoch with 2 processes (batch 96)
resumed with 3 (batch 64) or with 1 (batch 96, accumulation 2) ends with the weights, global step, per-epoch
sample counts and learning rates of the uninterrupted 2-process run; a world size that cannot hold the global batch
is refused; torchrun's elastic agents lose a node and the survivor finishes alone, exactly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import (
    STRATEGIES,
    child_env,
    free_port,
    max_abs_diff,
    metrics,
    ok,
    run_module,
    torchrun,
    torchrun_cmd,
    wait_for_checkpoint,
    weights,
)

from distmnist.core import checkpoint, tblog
from distmnist.core.state import TrainState

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

# 24100 samples: 126 steps of 192 per epoch, the last one padded (24192 samples an epoch at any world size);
# a cosine schedule, so the learning rate changes at every step; a checkpoint every 10 steps to strike after
RUN = ("-c", "smoke", "data.train_samples=24100", "data.global_batch_size=192", "optim.schedule=cosine",
       "train.log_every_n_steps=5", "checkpoint.every_n_steps=10", "dist.timeout_s=30")
STEPS_PER_EPOCH = 126
TOLERANCE = 1e-5


def learning_rates(run_dir: Path) -> list[tuple[int, float]]:
    return tblog.read_scalars(run_dir, tags=["lr"])["lr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: 2 processes x batch 96. The three strategies give bit-identical weights
    (test_distributed), so raw DDP's run is the reference of all of them."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(torchrun("distmnist.ddp", *RUN, "data.batch_size=96", f"run.dir={tmp / 'run'}", cwd=tmp))
    return tmp / "run"


def parallel_args(variant: str) -> tuple[str, ...]:
    """`ddp-fsdp`: raw PyTorch with train.parallel=fsdp -- sharded checkpoints written by 2 ranks, resharded by
    torch.distributed.checkpoint onto 3 ranks or 1."""
    return ("train.parallel=fsdp",) if variant.endswith("-fsdp") else ()


@pytest.fixture(scope="module", params=(*STRATEGIES, "ddp-fsdp"))
def stopped(request, tmp_path_factory) -> tuple[str, Path]:
    """2 processes x batch 96, SIGTERM to rank 1 after the first checkpoint: every rank stops at an agreed step
    mid-epoch with exit 75 and one checkpoint (the test copies the run dir before resuming it)."""
    strategy = request.param
    tmp = tmp_path_factory.mktemp(f"stopped-{strategy}")
    run_dir = tmp / "run"
    with open(tmp / "log", "w") as log:
        proc = subprocess.Popen(
            torchrun_cmd(f"distmnist.{strategy.split('-')[0]}", *RUN, *parallel_args(strategy), "data.batch_size=96",
                         f"run.dir={run_dir}"),
            cwd=tmp, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for_checkpoint(proc, run_dir, timeout=240)
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            os.kill(int(ranks[-1]), signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    out = (tmp / "log").read_text()
    assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", out)) == 2, out[-3000:]
    meta = checkpoint.read_any(checkpoint.listing(run_dir / "checkpoints")[0])["distmnist"]
    assert 0 < TrainState.from_checkpoint(meta).step_in_epoch < STEPS_PER_EPOCH, meta  # stopped mid-epoch
    assert meta["global_batch"] == 192
    assert not (run_dir / "model.pt").exists()
    return strategy, run_dir


def resume(stopped, tmp_path: Path, nproc: int, batch: int) -> Path:
    strategy, original = stopped
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    args = (*RUN, *parallel_args(strategy), f"data.batch_size={batch}", f"run.dir={run_dir}")
    module = f"distmnist.{strategy.split('-')[0]}"
    if nproc == 1:
        proc = ok(run_module(module, *args, cwd=tmp_path))
    else:
        proc = ok(torchrun(module, *args, nproc=nproc, cwd=tmp_path))
    assert "resuming from" in proc.stdout
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> float:
    """Weights within TOLERANCE; global step, per-epoch sample counts and every logged learning rate identical."""
    diff = max_abs_diff(weights(run_dir), weights(reference))
    assert diff <= TOLERANCE, diff
    got, want = metrics(run_dir), metrics(reference)
    assert got["global_step"] == want["global_step"] == 2 * STEPS_PER_EPOCH
    assert got["global_batch_size"] == want["global_batch_size"] == 192
    for key in ("epoch", "global_step", "train_samples", "val_samples"):
        assert [h[key] for h in got["history"]] == [h[key] for h in want["history"]], key
    assert [h["train_samples"] for h in got["history"]] == [STEPS_PER_EPOCH * 192] * 2  # padded alike at any W
    lrs = learning_rates(run_dir)
    assert lrs == learning_rates(reference)
    assert len(lrs) == 2 * STEPS_PER_EPOCH // 5 and len({v for _, v in lrs}) > 10  # a real schedule
    return diff


def test_stopped_with_2_resumed_with_3_processes_of_batch_64(stopped, reference, tmp_path):
    run_dir = resume(stopped, tmp_path, nproc=3, batch=64)
    assert metrics(run_dir)["world_size"] == 3 and metrics(run_dir)["accumulate_grad_batches"] == 1
    print(f"{stopped[0]}: W=2 -> W=3 max abs difference {assert_same_run(run_dir, reference):.3g}")


def test_stopped_with_2_resumed_with_1_process_accumulating_2_batches_of_96(stopped, reference, tmp_path):
    run_dir = resume(stopped, tmp_path, nproc=1, batch=96)
    assert metrics(run_dir)["world_size"] == 1 and metrics(run_dir)["accumulate_grad_batches"] == 2
    diff = assert_same_run(run_dir, reference)
    # micro-batch m of the one process takes what rank m took, in the same order: the same sums, bit for bit
    assert diff == 0.0, diff
    print(f"{stopped[0]}: W=2 -> W=1 x accumulate 2 max abs difference {diff:.3g}")


def test_a_world_size_that_cannot_hold_the_global_batch_is_refused(reference, tmp_path):
    """5 processes cannot split 192: the processes stop with the same line (exit 2; torchrun ends the others once
    the first has exited) before anything is written. (The check is RunDir's, before any strategy code: raw DDP
    stands for the three.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = torchrun("distmnist.ddp", *RUN, f"run.dir={run_dir}", nproc=5, cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"exitcode\s+: 2 \(pid: \d+\)", out), out[-3000:]
    # the processes share one pipe (lines may interleave): each error starts the same, one is whole
    starts = re.findall(r"distmnist: error: (data.global_batch_size=\d+ cannot be split over \d+ processes)", out)
    assert set(starts) == {"data.global_batch_size=192 cannot be split over 5 processes"}, starts
    assert len(starts) == out.count("distmnist: error:"), out[-3000:]
    assert re.search(r"^distmnist: error: data.global_batch_size=192 cannot be split over 5 processes: run with a "
                     r"number of processes that divides it \(1, 2, 3, 4, 6, 8, [\d, ]+\), or choose a new run.dir "
                     r"with another global batch$", out, re.M), out[-3000:]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # and one process with a batch that does not divide it: one line, exit 2, nothing changed
    one = run_module("distmnist.ddp", *RUN, "data.batch_size=100", f"run.dir={run_dir}", cwd=tmp_path)
    lines = [ln for ln in one.stderr.splitlines() if ln.strip()]
    assert one.returncode == 2 and len(lines) == 1, one.stderr
    assert "data.batch_size=96 train.accumulate_grad_batches=2" in lines[0], lines[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------- torchrun elastic
def elastic_agent(tmp: Path, name: str, port: int, run_dir: Path) -> subprocess.Popen:
    """One torchrun agent of an elastic job of 1 to 2 nodes (one process each) on this machine; the rendezvous
    waits `last_call_timeout` for a second node before it starts with one, and notices a lost node within
    keep_alive_interval x keep_alive_max_attempt seconds."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test",
        "--rdzv-conf=join_timeout=120,last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3",
        "--monitor-interval=0.1", "-m", "distmnist.ddp", *RUN, "data.batch_size=96", f"run.dir={run_dir}",
    ]
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    # its own session: "a node" is the agent and its worker, killed together
    return subprocess.Popen(cmd, cwd=tmp, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def checkpoint_of_world(run_dir: Path, world_size: int, procs: list[subprocess.Popen], timeout: float = 300) -> int:
    """Wait for a checkpoint written by `world_size` processes; its global step."""
    seen: set[Path] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in checkpoint.listing(run_dir / "checkpoints"):
            if path in seen:
                continue
            seen.add(path)
            try:
                meta = checkpoint.read(path)["distmnist"]
            except Exception:  # noqa: BLE001 - pruned between the listing and the read
                continue
            if meta["world_size"] == world_size:
                return TrainState.from_checkpoint(meta).global_step
        assert all(p.poll() is None for p in procs), "an agent ended before a checkpoint of the expected world"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of {world_size} processes appeared")


def test_torchrun_elastic_node_loss_survivor_finishes_alone_exactly(reference, tmp_path):
    """Two torchrun agents (--nnodes=1:2, c10d rendezvous), one process each: global batch 192 = 2 x 96. Once the
    two-process job has written a checkpoint, one agent and its worker are killed (a lost node): the survivor's
    worker fails in its next collective, its agent restarts it in a one-process world, which resumes from the
    newest checkpoint with 96 x accumulation 2 and finishes -- the weights of the uninterrupted run."""
    run_dir, port = tmp_path / "run", free_port()
    survivor = elastic_agent(tmp_path, "survivor", port, run_dir)
    time.sleep(1)  # the survivor hosts the rendezvous store (the first agent up on the endpoint)
    lost = elastic_agent(tmp_path, "lost", port, run_dir)
    try:
        step = checkpoint_of_world(run_dir, 2, [survivor, lost])
        workers = subprocess.run(["pgrep", "-P", str(lost.pid)], capture_output=True, text=True).stdout.split()
        for pid in [lost.pid, *map(int, workers)]:
            os.kill(pid, signal.SIGKILL)
        assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    finally:
        for proc in (survivor, lost):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "survivor.log").read_text()
    assert "lost its peers in a collective" in log, log[-3000:]
    resumed = [int(s) for s in re.findall(r"resuming from \S+ \(epoch \d+, step (\d+)\)", log)]
    assert resumed and resumed[-1] >= step, (resumed, step)  # from the newest checkpoint, not from the start
    assert metrics(run_dir)["world_size"] == 1 and metrics(run_dir)["accumulate_grad_batches"] == 2
    diff = assert_same_run(run_dir, reference)
    print(f"elastic node loss (ddp): 2 -> 1 processes after step {step}, max abs difference {diff:.3g}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_accumulating_2_batches_of_48_equal_two_ranks_of_96(reference, tmp_path, strategy):
    """Gradient accumulation with two processes: no all-reduce on the first micro-batch (no_sync /
    fabric.no_backward_sync / the Trainer's own), the loss divided by 2 -- the uninterrupted 2 x 96 run to fp
    tolerance, with the same steps, sample counts and learning rates."""
    run_dir = tmp_path / "run"
    ok(torchrun(f"distmnist.{strategy}", *RUN, "data.batch_size=48", f"run.dir={run_dir}", cwd=tmp_path))
    assert metrics(run_dir)["accumulate_grad_batches"] == 2
    print(f"{strategy}: 2 x 48 x accumulate 2 vs 2 x 96 max abs difference {assert_same_run(run_dir, reference):.3g}")
