"""launch/single_node.sh and slurm/torchrun_node.sh, without SLURM: real torchrun launches on this machine.

- two single-node launches at once (2 CPU processes each) do not collide on ports;
- two torchrun agents joining one c10d rendezvous on localhost (--nnodes=2, one process each), started by the same
  script slurm/train.sh runs on every node of a multi-node job, train the same weights as one node with 2 processes;
- SIGTERM to the launcher makes every process checkpoint and stop; bad arguments stop with one line, exit 2.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from procs import REPO, child_env, free_port, metrics, same_weights, weights

pytestmark = [pytest.mark.slow]

SINGLE_NODE = REPO / "launch" / "single_node.sh"
TORCHRUN_NODE = REPO / "slurm" / "torchrun_node.sh"
SMOKE = ("-c", "smoke", "dist.timeout_s=60")


def start(cmd: list, cwd: Path, timeout: int = 180, **env: str) -> subprocess.Popen:
    return subprocess.Popen(["timeout", str(timeout), *map(str, cmd)], cwd=cwd, env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 200) -> tuple[int, str]:
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out


@pytest.fixture(scope="module")
def two_launches(tmp_path_factory):
    """Two `launch/single_node.sh` runs at once on this machine (default strategy ddp, 2 CPU processes each)."""
    tmp = tmp_path_factory.mktemp("launch")
    started = time.monotonic()
    procs = {name: start([SINGLE_NODE, "--nproc", "2", "--", *SMOKE, f"run.dir={tmp / name}"], tmp) for name in "ab"}
    results = {name: finish(p) for name, p in procs.items()}
    print(f"two concurrent single-node launches: {time.monotonic() - started:.1f} s")
    return tmp, results


@pytest.mark.timeout(300)
def test_single_node_launch_trains_with_two_processes(two_launches):
    tmp, results = two_launches
    rc, out = results["a"]
    assert rc == 0, out[-5000:]
    assert "single_node.sh: strategy=ddp processes=2" in out
    m = metrics(tmp / "a")
    assert (m["strategy"], m["world_size"], m["epochs"], m["global_step"]) == ("ddp", 2, 2, 64), m


@pytest.mark.timeout(300)
def test_two_launches_at_once_do_not_collide(two_launches):
    tmp, results = two_launches
    for name, (rc, out) in results.items():
        assert rc == 0, f"launch {name}:\n{out[-5000:]}"
    assert same_weights(weights(tmp / "a"), weights(tmp / "b"))


@pytest.mark.timeout(300)
def test_two_node_rendezvous_matches_one_node(two_launches, tmp_path):
    """The multi-node code path of slurm/train.sh: one torchrun_node.sh per "node", a shared c10d endpoint."""
    tmp, results = two_launches
    run_dir = tmp_path / "two-nodes"
    endpoint = f"localhost:{free_port()}"
    started = time.monotonic()
    nodes = [
        start([TORCHRUN_NODE, "--strategy", "ddp", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "test-two-nodes", "--", *SMOKE, f"run.dir={run_dir}"],
              tmp_path)
        for _ in range(2)
    ]
    outs = [finish(p) for p in nodes]
    print(f"two-node rendezvous run: {time.monotonic() - started:.1f} s")
    for i, (rc, out) in enumerate(outs):
        assert rc == 0, f"node {i}:\n{out[-5000:]}"
    m = metrics(run_dir)
    assert (m["world_size"], m["num_nodes"], m["epochs"]) == (2, 2, 2), m
    assert results["a"][0] == 0
    assert same_weights(weights(run_dir), weights(tmp / "a")), "2 nodes x 1 process differ from 1 node x 2 processes"


@pytest.mark.timeout(200)
def test_sigterm_to_the_launcher_checkpoints_and_stops(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([SINGLE_NODE, "--nproc", "2", "--", "-c", "smoke", "data.train_samples=40000",
                  "checkpoint.every_n_steps=50", "dist.timeout_s=60", f"run.dir={run_dir}"], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not any((run_dir / "checkpoints").glob("step=*.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the end"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # `timeout` passes it on to the launcher
        rc, out = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGTERM, out[-5000:]
    stop = re.search(r"distmnist: stopped by SIGTERM at step (\d+)", out)
    assert stop, out[-5000:]
    assert (run_dir / "checkpoints" / f"step={int(stop.group(1)):08d}.ckpt").is_file()
    assert not (run_dir / "model.pt").exists()


@pytest.mark.timeout(300)
def test_ctrl_c_to_the_launcher_checkpoints_says_one_line_and_resumes(tmp_path):
    """Ctrl-C at the terminal (SIGINT to the script's process group): the script passes one SIGINT to the training
    processes, every rank stops at the agreed step with a checkpoint, rank 0 says so in one line, exit 130; no
    torchrun traceback. The same command resumes and finishes."""
    run_dir = tmp_path / "run"
    cmd = [SINGLE_NODE, "--nproc", "2", "--", "-c", "smoke", "data.train_samples=40000", "checkpoint.every_n_steps=50",
           "dist.timeout_s=60", f"run.dir={run_dir}"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any((run_dir / "checkpoints").glob("step=*.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the end"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-5000:]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("single_node.sh: strategy=ddp"), err[-5000:]
    stop = re.fullmatch(r"distmnist: stopped by SIGINT at step (\d+) \(epoch 1\); checkpoint (\S+); run the same "
                        r"command again to resume", lines[1])
    assert stop, lines
    assert (run_dir / "checkpoints" / f"step={int(stop.group(1)):08d}.ckpt").is_file()
    rc, out = finish(start(cmd, tmp_path))
    assert rc == 0 and f"resuming from {run_dir}/checkpoints/step={int(stop.group(1)):08d}.ckpt" in out, out[-5000:]
    assert metrics(run_dir)["epochs"] == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "script,args,message",
    [
        (SINGLE_NODE, ["--strategy", "nope"], "unknown strategy 'nope'"),
        (SINGLE_NODE, ["--bogus"], "unrecognized arguments: --bogus"),  # distmnist's own parser says it
        (SINGLE_NODE, ["-c", "smoke", "--nproc", "2"], "unrecognized arguments: --nproc"),
        # -q and -c among the overrides reach distmnist's check, which reads them as the processes would
        (SINGLE_NODE, ["-q", "optim.lr=0.1", "-c", "/nonexistent/distmnist.yaml"],
         "config file /nonexistent/distmnist.yaml does not exist"),
        (SINGLE_NODE, ["--nproc", "0"], "--nproc must be a positive integer"),
        (TORCHRUN_NODE, ["--strategy", "ddp", "--nnodes", "2", "--nproc-per-node", "1"], "--rdzv-endpoint must be"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, script, args, message):
    proc = subprocess.run(["timeout", "30", str(script), *args], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.timeout(60)
def test_help(tmp_path):
    for script in (SINGLE_NODE, TORCHRUN_NODE):
        proc = subprocess.run(["timeout", "30", str(script), "--help"], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "--strategy" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(["timeout", "30", "bash", str(REPO / "slurm" / "train.sh"), "--help"], cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "sbatch slurm/train.sh" in proc.stdout, proc.stdout + proc.stderr
