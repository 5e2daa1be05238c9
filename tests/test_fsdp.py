"""train.parallel=fsdp (FSDP2, core/parallel.py) in the three strategies, on real gloo processes: the same
weights as DDP, sharded checkpoints that resume exactly after SIGTERM and kill -9, damaged checkpoints skipped,
foreign ones refused, and the per-rank memory figure.

One module-scoped set of runs per configuration is shared by the assertions.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from procs import (
    STRATEGIES,
    child_env,
    max_abs_diff,
    metrics,
    ok,
    position,
    run_module,
    same_weights,
    torchrun,
    torchrun_cmd,
    wait_for_checkpoint,
    weights,
)

from distmnist.core import checkpoint
from distmnist.core.config import load_config
from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError
from distmnist.core.run import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FSDP = "train.parallel=fsdp"


# 4096 samples: 64 steps per epoch on 2 ranks (43 on 3); a checkpoint every 20 steps gives the fault tests a
# moment to strike mid-epoch
RUN = ("-c", "smoke", "data.train_samples=4096", "checkpoint.every_n_steps=20", "dist.timeout_s=30")
STEPS_PER_EPOCH = 64


def train(tmp: Path, strategy: str, name: str, *overrides: str, nproc: int = 2) -> Path:
    run_dir = tmp / name
    ok(torchrun(f"distmnist.{strategy}", *RUN, f"run.dir={run_dir}", *overrides, nproc=nproc, cwd=tmp))
    return run_dir


def parity_runs(tmp: Path, nproc: int) -> dict[str, Path]:
    """Raw PyTorch DDP (the three strategies' DDP runs are bit-identical: test_distributed) and each strategy's
    FSDP run."""
    out = {"ddp-ddp": train(tmp, "ddp", "ddp-ddp", nproc=nproc)}
    for s in STRATEGIES:
        out[s] = train(tmp, s, s, FSDP, nproc=nproc)
    return out


@pytest.fixture(scope="module")
def runs2(tmp_path_factory) -> dict[str, Path]:
    return parity_runs(tmp_path_factory.mktemp("fsdp2"), 2)


@pytest.fixture(scope="module")
def runs3(tmp_path_factory) -> dict[str, Path]:
    """3 ranks: the 128-row shards are uneven (43/43/42)."""
    return parity_runs(tmp_path_factory.mktemp("fsdp3"), 3)


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])
def runs(request) -> dict[str, Path]:
    return request.getfixturevalue(f"runs{request.param}")


def test_fsdp_model_pt_equals_ddp(runs):
    """model.pt of every strategy's FSDP run equals the DDP run to 1e-5; on 2 ranks bit for bit (the mean of two
    gradients is (a + b) / 2 in either order, halving is exact); on 3 ranks to rounding."""
    ref = weights(runs["ddp-ddp"])
    nproc = metrics(runs["ddp-ddp"])["world_size"]
    for s in STRATEGIES:
        got = weights(runs[s])
        assert [(k, v.shape, v.dtype) for k, v in got.items()] == [(k, v.shape, v.dtype) for k, v in ref.items()]
        diff = max_abs_diff(got, ref)
        print(f"{nproc} ranks, {s} fsdp vs ddp: max abs {diff:.3g}")
        assert diff <= 1e-5, f"{s}: {diff}"
        if nproc == 2:
            assert same_weights(got, ref), f"{s}: {diff}"


def test_three_strategies_fsdp_runs_are_bit_identical(runs):
    ref = weights(runs["ddp"])
    for s in ("fabric", "trainer"):
        assert same_weights(weights(runs[s]), ref), f"{s}: {max_abs_diff(weights(runs[s]), ref)}"


def test_fsdp_metrics_and_memory_figures(runs):
    ddp = metrics(runs["ddp-ddp"])
    nproc = ddp["world_size"]
    for s in STRATEGIES:
        m = metrics(runs[s])
        assert m["parallel"] == "fsdp" and ddp["parallel"] == "ddp"
        assert m["global_step"] == ddp["global_step"]
        assert m["val_samples"] == ddp["val_samples"] == 500  # exact evaluation: every test image once
        assert [h["train_samples"] for h in m["history"]] == [h["train_samples"] for h in ddp["history"]]
        # rank 0's shard: ceil(rows / W) of each Linear's rows
        assert m["param_mb"] < ddp["param_mb"] / nproc * 1.1
        assert m["state_mb"] == pytest.approx(m["param_mb"] + m["grad_mb"] + m["optim_mb"])


def test_sharded_checkpoints_one_folder_per_step_each_rank_a_shard(runs):
    nproc = metrics(runs["ddp"])["world_size"]
    for s in STRATEGIES:
        found = checkpoint.listing(runs[s] / "checkpoints")
        assert len(found) == 2 and all(p.is_dir() for p in found)  # checkpoint.keep=2
        files = sorted(p.name for p in found[0].iterdir())
        assert files == [".metadata", *[f"__{r}_0.distcp" for r in range(nproc)], "meta.pt"], files
        meta = checkpoint.read_any(found[0])["distmnist"]
        assert meta["parallel"] == "fsdp" and meta["strategy"] == s
        assert not list((runs[s] / "checkpoints").glob(".*"))  # no temporary folder left
    # the DDP run's are single files, as before
    assert all(p.is_file() for p in checkpoint.listing(runs["ddp-ddp"] / "checkpoints"))


def test_evaluate_reads_an_fsdp_model_pt(runs2, tmp_path):
    """model.pt is the full NNModel state_dict (gathered once at the end): the evaluate tool gets the run's numbers."""
    from distmnist.tools.evaluate import evaluate_model

    result = evaluate_model(runs2["trainer"] / "model.pt", load_config("smoke", []), tmp_path / "eval.json")
    assert result["val_acc"] == metrics(runs2["trainer"])["val_acc"]
    assert result["val_loss"] == pytest.approx(metrics(runs2["trainer"])["val_loss"], rel=1e-6)


def test_evaluate_a_sharded_checkpoint_on_another_number_of_processes(runs2, tmp_path):
    """The newest sharded checkpoint of a 2-rank FSDP run (raw PyTorch's and the Trainer's keys) joined into
    the whole model: evaluated by 1 process and by 3, both give the run's final numbers."""
    for s in ("ddp", "trainer"):
        newest = checkpoint.listing(runs2[s] / "checkpoints")[0]
        assert newest.is_dir() and checkpoint.step_of(newest) == metrics(runs2[s])["global_step"]
        one = ok(run_module("distmnist.evaluate", str(newest), "--out", str(tmp_path / f"{s}1.json"), cwd=tmp_path))
        three = ok(torchrun("distmnist.evaluate", str(newest), "--out", str(tmp_path / f"{s}3.json"), nproc=3,
                            cwd=tmp_path))
        assert "Traceback" not in one.stderr + three.stderr and "Warning" not in one.stderr
        for n in (1, 3):
            result = json.loads((tmp_path / f"{s}{n}.json").read_text())
            assert result["world_size"] == n and result["val_samples"] == 500
            assert result["val_acc"] == metrics(runs2[s])["val_acc"], (s, n)
            assert result["val_loss"] == pytest.approx(metrics(runs2[s])["val_loss"], rel=1e-6), (s, n)


def prepare(run_dir: Path, *overrides: str) -> Path | None:
    """What every rank of a 2-process job decides before training: which checkpoint resumes `run_dir`."""
    cfg = load_config("smoke", [*RUN[2:], f"run.dir={run_dir}", *overrides])
    return RunDir(cfg, "ddp", DistEnv(world_size=2)).checkpoint_to_resume()


def test_ddp_and_fsdp_run_dirs_refuse_each_others_checkpoints(runs2, tmp_path):
    for run_dir, parallel in ((runs2["ddp"], "ddp"), (runs2["ddp-ddp"], "fsdp")):
        with pytest.raises(DistMnistError) as err:
            prepare(run_dir, f"train.parallel={parallel}")
        line = str(err.value)
        assert "\n" not in line and f"this run has train.parallel={parallel}" in line and "new run.dir" in line
    assert prepare(runs2["ddp"], FSDP) == checkpoint.listing(runs2["ddp"] / "checkpoints")[0]  # its own: fine


@pytest.mark.parametrize("damage", ["truncate-shard", "no-metadata", "no-meta-pt"])
def test_damaged_sharded_checkpoint_is_skipped_with_one_warning(runs2, tmp_path, capfd, damage):
    """The newest checkpoint damaged: one warning line, the previous one resumes the run (resuming from a sharded
    checkpoint is what the fault tests below do)."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs2["ddp"], run_dir)
    newest, previous = checkpoint.listing(run_dir / "checkpoints")
    if damage == "truncate-shard":
        shard = newest / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (newest / (".metadata" if damage == "no-metadata" else "meta.pt")).unlink()
    capfd.readouterr()
    assert prepare(run_dir, FSDP) == previous
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("distmnist: warning") and newest.name in warnings[0]
    assert "damaged" in warnings[0] and "using an older checkpoint" in warnings[0], warnings


def test_dcp_metadata_that_pickles_code_is_refused_unread(runs2, tmp_path):
    ckpt = tmp_path / "step=00000001.ckpt"
    shutil.copytree(checkpoint.listing(runs2["ddp"] / "checkpoints")[0], ckpt)
    marker = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Code()))
    with pytest.raises(DistMnistError, match="damaged"):
        checkpoint.read_any(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- faults
def start(tmp: Path, strategy: str, run_dir: Path, extra: tuple = ()) -> subprocess.Popen:
    log = open(tmp / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        torchrun_cmd(f"distmnist.{strategy}", *RUN, FSDP, f"run.dir={run_dir}", extra=extra),
        cwd=tmp, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
    )


def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from their environment)."""
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, out):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    assert len(ranks) == 2, ranks
    return ranks


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert same_weights(weights(run_dir), weights(reference)), max_abs_diff(weights(run_dir), weights(reference))
    got, ref = metrics(run_dir), metrics(reference)
    assert [h["epoch"] for h in got["history"]] == [1, 2]
    assert got["val_acc"] == ref["val_acc"] and got["val_loss"] == ref["val_loss"]
    for mine, theirs in zip(got["history"], ref["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-12)
        assert mine["train_acc"] == theirs["train_acc"]


def wait_for_restart(log: Path, timeout: float = 180) -> int:
    """The step the restarted workers resumed from."""
    deadline = time.monotonic() + timeout
    while not (found := re.search(r"resuming from \S*step=(\d+)\.ckpt", log.read_text())):
        assert time.monotonic() < deadline, "torchrun did not restart the workers"
        time.sleep(0.05)
    return int(found.group(1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_9_then_sigterm_mid_epoch_resume_bit_identical(runs2, tmp_path, strategy):
    """One job, two faults: kill -9 of rank 1 under `torchrun --max-restarts=1` (torchrun restarts both workers,
    they resume from the newest sharded checkpoint); then SIGTERM to rank 1 of the restarted job mid-epoch (the
    ranks agree on a step, write a checkpoint, exit 75; no restart is left); the same command finishes the run.
    Its model.pt and numbers equal the uninterrupted FSDP run's bit for bit."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start(tmp_path, strategy, run_dir, extra=("--max-restarts=1",))
    try:
        wait_for_checkpoint(proc, run_dir)
        os.kill(worker_pids(proc)[1], signal.SIGKILL)
        resumed = wait_for_restart(log)
        deadline = time.monotonic() + 120
        # the restarted job's own first checkpoint: its stop handler is installed by then
        while checkpoint.step_of(checkpoint.listing(run_dir / "checkpoints")[0]) <= resumed:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.02)
        os.kill(worker_pids(proc)[1], signal.SIGTERM)  # one rank only: the ranks agree on the step
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = log.read_text()
    assert re.search(rf"resuming from {re.escape(str(run_dir))}/checkpoints/step=\d+\.ckpt", out), out[-3000:]
    assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", out)) == 2, out[-3000:]
    stopped = re.findall(r"distmnist: stopped by SIGTERM at step (\d+)", out)
    assert len(stopped) == 1, out[-3000:]
    newest = checkpoint.listing(run_dir / "checkpoints")[0]
    assert newest.is_dir()
    state = position(newest)
    assert state.global_step == int(stopped[0])
    assert 0 < state.step_in_epoch < STEPS_PER_EPOCH, state
    assert not (run_dir / "model.pt").exists()

    again = ok(torchrun(f"distmnist.{strategy}", *RUN, FSDP, f"run.dir={run_dir}", cwd=tmp_path))
    assert "resuming from" in again.stdout
    assert_same_run(run_dir, runs2["ddp"])


# ------------------------------------------------------------------------------------------- memory
MEMORY = ("checkpoint.every_n_steps=0", "model.hidden=[2048,2048]", "optim.name=adam", "optim.lr=0.001",
          "data.train_samples=256", "data.test_samples=64", "train.epochs=1")


def test_fsdp_holds_about_half_of_ddp_per_rank_with_adam_2048(tmp_path):
    """Parameters + gradients + Adam's two moments: 4 x 5.8 M floats on each DDP rank, half of them per FSDP rank."""
    ddp = metrics(train(tmp_path, "ddp", "ddp", *MEMORY))
    fsdp = metrics(train(tmp_path, "ddp", "fsdp", *MEMORY, FSDP))
    ratio = fsdp["state_mb"] / ddp["state_mb"]
    print(f"state per rank: ddp {ddp['state_mb']:.1f} MB, fsdp {fsdp['state_mb']:.1f} MB, ratio {ratio:.3f}")
    assert ddp["state_mb"] == pytest.approx(4 * ddp["param_mb"], rel=1e-3)  # Adam: exp_avg, exp_avg_sq (+ steps)
    assert ratio <= 0.55


def test_fsdp_with_16_mixed_is_refused_in_one_line():
    with pytest.raises(DistMnistError, match=r"train.parallel=fsdp does not support train.precision=16-mixed"):
        load_config("smoke", [FSDP, "train.precision=16-mixed", "train.accelerator=cuda"])
