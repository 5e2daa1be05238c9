"""Real processes for the tests: torchrun launches with a free port, plain `python -m` runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distmnist.core import checkpoint
from distmnist.core.config import STRATEGIES  # noqa: F401 - the package's order, for the tests
from distmnist.core.state import TrainState

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # torchrun's default path: the rendezvous store shared with the workers (core/startup.py keeps each attempt's
    # keys apart), so a caller's TORCH_DISABLE_SHARE_RDZV_TCP_STORE is not passed on either
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE")]:
        env.pop(key)
    env.update(extra)
    return env


# armed in torchrun's workers (LOCAL_RANK) or where the test asks (DISTMNIST_TEST_ABORT_AT_TEARDOWN), never in
# torchrun's agent, whose own exit is not under test
TEARDOWN_ABORT = '''
import os

class _AbortAtTeardown:
    def __del__(self):
        os.write(2, b"teardown-abort: the interpreter's teardown ran in this process\\n")
        os.abort()

if "LOCAL_RANK" in os.environ or os.environ.get("DISTMNIST_TEST_ABORT_AT_TEARDOWN"):
    _sentinel = _AbortAtTeardown()
'''


def teardown_aborts(site: Path) -> dict[str, str]:
    """Env entries under which torchrun's workers (and a process given DISTMNIST_TEST_ABORT_AT_TEARDOWN=1) die by
    SIGABRT if the interpreter's teardown runs, as a finished FSDP run once did in CI (tests/test_teardown.py);
    a sitecustomize written into `site` holds an object whose finalizer calls os.abort()."""
    (site / "sitecustomize.py").write_text(TEARDOWN_ABORT)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def run_module(module: str, *args: str, cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` in one process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def torchrun_cmd(module: str, *args: str, nproc: int = 2, extra: tuple = ()) -> list[str]:
    """--standalone: a c10d rendezvous on a free port. (The static rendezvous that --master_port selects keeps
    one store across --max-restarts attempts, and a restarted gloo group then times out connecting.)
    A `module` ending in .py is a script path."""
    target = [module] if module.endswith(".py") else ["-m", module]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
        *target, *args,
    ]


def torchrun(module: str, *args: str, nproc: int = 2, cwd: Path, timeout: float = 240, extra: tuple = (),
             **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m module args...` (gloo on CPU)."""
    cmd = torchrun_cmd(module, *args, nproc=nproc, extra=extra)
    return subprocess.run(cmd, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, report
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=True)


def metrics(run_dir: Path) -> dict:
    """A run's metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> Path:
    """The first checkpoint of a run that `proc` trains (AssertionError if the run ends or none comes in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = checkpoint.listing(run_dir / "checkpoints")
        if found:
            return found[0]
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def position(path: Path) -> TrainState:
    """The training position a checkpoint (single file or sharded folder) holds."""
    return TrainState.from_checkpoint(checkpoint.read_any(path)["distmnist"])


def old_record(record: dict) -> dict:
    """A checkpoint's "distmnist" record as versions before TrainState's own entry wrote it: the position's fields
    spliced into the record, the tally a list (loss_sum, correct, count), samples_in_epoch beside them."""
    record = dict(record)
    state = dict(record.pop("train_state"))
    tally = state.pop("tally")
    return {**record, **state, "format": "distmnist-checkpoint/1",
            "samples_in_epoch": state["step_in_epoch"] * record["global_batch"],
            "tally": [tally["loss_sum"], tally["correct"], tally["count"]] if tally else None}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_resumed_exactly(run_dir: Path, reference: Path, tolerance: float) -> float:
    """A run resumed on another number of processes against the uninterrupted run (data.global_batch_size set):
    the same global step, the same per-epoch epoch / global_step / train_samples / val_samples, the same learning
    rate at every logged step, and weights within `tolerance`. Returns the largest absolute weight difference."""
    import json

    from distmnist.core import tblog

    got, want = (json.loads((Path(d) / "metrics.json").read_text()) for d in (run_dir, reference))
    assert got["global_step"] == want["global_step"], (got["global_step"], want["global_step"])
    assert got["global_batch_size"] == want["global_batch_size"], (got["global_batch_size"], want["global_batch_size"])
    for key in ("epoch", "global_step", "train_samples", "val_samples"):
        assert [h[key] for h in got["history"]] == [h[key] for h in want["history"]], key
    lrs = [tblog.read_scalars(Path(d), tags=["lr"])["lr"] for d in (run_dir, reference)]
    assert lrs[0] == lrs[1] and lrs[0], "the learning rates logged differ"
    diff = max_abs_diff(weights(run_dir), weights(reference))
    assert diff <= tolerance, f"max |weight difference| {diff:.3g} > {tolerance}"
    return diff


class Job:
    """One `sbatch --wait slurm/train.sh ...` running in the background, submitted on `cluster`'s first node (the
    one-node cluster: here; the two-node cluster: node1)."""

    def __init__(self, cluster, cwd: Path, sbatch_opts=(), args=(), timeout: float = 180,
                 env: dict[str, str] | None = None) -> None:
        self.cluster, self.cwd, self.timeout = cluster, cwd, timeout
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["timeout", str(int(timeout)),
             *cluster.on("node1", "sbatch", "--wait", "--parsable", *sbatch_opts, REPO / "slurm" / "train.sh", *args)],
            cwd=cwd, env=cluster.env(child_env(**(env or {}))), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        first = self.proc.stdout.readline().strip()  # sbatch prints the id at once, then waits
        if not first:
            self.proc.wait(timeout=30)
            pytest.fail(f"sbatch failed (exit {self.proc.returncode}): {self.proc.stderr.read()}")
        self.id = int(first.split(";")[0])
        self.rc: int | None = None
        self.elapsed = 0.0

    @property
    def log(self) -> str:
        path = self.cwd / f"slurm-distmnist-{self.id}.out"
        return path.read_text() if path.exists() else ""

    @property
    def run_dir(self) -> Path:
        return self.cwd / "runs" / f"distmnist-{self.id}"

    def scontrol(self, *args: str) -> str:
        """A SLURM client command (scancel, squeue, ...) on the cluster; its stdout."""
        return subprocess.run(self.cluster.on("node1", *args), env=self.cluster.env(), capture_output=True,
                              text=True, timeout=30).stdout

    def state(self) -> str:
        return self.scontrol("squeue", "-h", "-j", str(self.id), "-o", "%T").strip()

    def wait(self) -> int:
        if self.rc is None:
            self.proc.wait(timeout=self.timeout + 30)
            self.rc, self.elapsed = self.proc.returncode, time.monotonic() - self.started
            self.proc.stdout.close()
            self.proc.stderr.close()
        return self.rc

    def cancel(self) -> None:
        if self.rc is None:
            self.scontrol("scancel", str(self.id))
            try:
                self.wait()
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def describe(self) -> str:
        return f"job {self.id} exit {self.rc} after {self.elapsed:.1f} s; its log:\n{self.log[-6000:]}"
