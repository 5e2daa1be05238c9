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
from procs import child_env, ok, run_module, same_weights, torchrun, torchrun_cmd, weights

from distmnist.core import checkpoint
from distmnist.core.errors import DistMnistError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STRATEGIES = ("ddp", "fabric", "trainer")
SMOKE = ("-c", "smoke", "dist.timeout_s=60")
FSDP = "train.parallel=fsdp"


def train(tmp: Path, strategy: str, name: str, *overrides: str, nproc: int = 2) -> Path:
    run_dir = tmp / name
    ok(torchrun(f"distmnist.{strategy}", *SMOKE, f"run.dir={run_dir}", *overrides, nproc=nproc, cwd=tmp))
    return run_dir


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def runs(request, tmp_path_factory) -> dict[str, Path]:
    """Raw PyTorch DDP (the three strategies' DDP runs are bit-identical: test_distributed) and each strategy's
    FSDP run, on 2 and on 3 ranks (3: the 128-row shards are uneven, 43/43/42)."""
    nproc = request.param
    tmp = tmp_path_factory.mktemp(f"fsdp{nproc}")
    out = {"ddp-ddp": train(tmp, "ddp", "ddp-ddp", nproc=nproc)}
    for s in STRATEGIES:
        out[s] = train(tmp, s, s, FSDP, nproc=nproc)
    return out


def test_fsdp_model_pt_equals_ddp(runs):
    """model.pt of every strategy's FSDP run equals the DDP run to 1e-5; on 2 ranks bit for bit (the mean of two
    gradients is (a + b) / 2 in either order, halving is exact); on 3 ranks to rounding."""
    ref = weights(runs["ddp-ddp"])
    nproc = metrics(runs["ddp-ddp"])["world_size"]
    for s in STRATEGIES:
        got = weights(runs[s])
        assert [(k, v.shape, v.dtype) for k, v in got.items()] == [(k, v.shape, v.dtype) for k, v in ref.items()]
        diff = max_abs(got, ref)
        print(f"{nproc} ranks, {s} fsdp vs ddp: max abs {diff:.3g}")
        assert diff <= 1e-5, f"{s}: {diff}"
        if nproc == 2:
            assert same_weights(got, ref), f"{s}: {diff}"


def test_three_strategies_fsdp_runs_are_bit_identical(runs):
    ref = weights(runs["ddp"])
    for s in ("fabric", "trainer"):
        assert same_weights(weights(runs[s]), ref), f"{s}: {max_abs(weights(runs[s]), ref)}"


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


def test_evaluate_reads_an_fsdp_model_pt(runs, tmp_path):
    """model.pt is the full NNModel state_dict (gathered once at the end): the evaluate tool gets the run's numbers."""
    ok(run_module("distmnist.evaluate", "--model", str(runs["trainer"] / "model.pt"), "-c", "smoke",
                  "--out", str(tmp_path / "eval.json"), cwd=tmp_path))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["val_acc"] == metrics(runs["trainer"])["val_acc"]
    assert result["val_loss"] == pytest.approx(metrics(runs["trainer"])["val_loss"], rel=1e-6)


def test_ddp_and_fsdp_run_dirs_refuse_each_others_checkpoints(runs, tmp_path):
    for run_dir, parallel in ((runs["ddp"], "ddp"), (runs["ddp-ddp"], "fsdp")):
        copy = tmp_path / f"{parallel}-{run_dir.name}"
        shutil.copytree(run_dir, copy)
        proc = run_module("distmnist.ddp", *SMOKE, f"run.dir={copy}", f"train.parallel={parallel}",
                          "train.epochs=3", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "train.parallel=" in lines[0] and "choose a new run.dir" in lines[0], lines


# ------------------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("damage", ["truncate-shard", "no-metadata", "no-meta-pt"])
def test_damaged_sharded_checkpoint_is_skipped_with_one_warning(runs, tmp_path, damage):
    """The newest checkpoint damaged: one warning line, the run resumes from the previous one (the end of epoch 1)
    and trains epoch 2 again to the same weights."""
    if metrics(runs["ddp"])["world_size"] != 2:
        pytest.skip("one world size is enough")
    run_dir = tmp_path / "run"
    shutil.copytree(runs["ddp"], run_dir)
    newest, previous = checkpoint.listing(run_dir / "checkpoints")
    if damage == "truncate-shard":
        shard = newest / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (newest / (".metadata" if damage == "no-metadata" else "meta.pt")).unlink()
    proc = ok(torchrun("distmnist.ddp", *SMOKE, f"run.dir={run_dir}", FSDP, cwd=tmp_path))
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("distmnist: warning")]
    assert len(warnings) == 1 and newest.name in warnings[0] and "damaged" in warnings[0], proc.stderr[-3000:]
    assert f"resuming from {previous}" in proc.stdout
    assert same_weights(weights(run_dir), weights(runs["ddp"]))


def test_dcp_metadata_that_pickles_code_is_refused_unread(runs, tmp_path):
    if metrics(runs["ddp"])["world_size"] != 2:
        pytest.skip("one world size is enough")
    ckpt = tmp_path / "step=00000001.ckpt"
    shutil.copytree(checkpoint.listing(runs["ddp"] / "checkpoints")[0], ckpt)
    marker = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Code()))
    with pytest.raises(DistMnistError, match="damaged"):
        checkpoint.read_any(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- faults
# 2 ranks x 32: 94 steps per epoch; a checkpoint every 20 steps gives the test a moment to strike mid-epoch
FAULT = ("-c", "smoke", "data.train_samples=6000", "train.epochs=2", "checkpoint.every_n_steps=20",
         "dist.timeout_s=30", FSDP)
STEPS_PER_EPOCH = 94


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted FSDP run (raw PyTorch; the three strategies' FSDP runs are bit-identical, above)."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(torchrun("distmnist.ddp", *FAULT, f"run.dir={tmp / 'run'}", cwd=tmp))
    return tmp / "run"


def start(tmp: Path, strategy: str, run_dir: Path, extra: tuple = ()) -> subprocess.Popen:
    log = open(tmp / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        torchrun_cmd(f"distmnist.{strategy}", *FAULT, f"run.dir={run_dir}", extra=extra),
        cwd=tmp, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = checkpoint.listing(run_dir / "checkpoints")
        if found:
            return found[0]
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


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
    assert same_weights(weights(run_dir), weights(reference)), max_abs(weights(run_dir), weights(reference))
    got, ref = metrics(run_dir), metrics(reference)
    assert [h["epoch"] for h in got["history"]] == [1, 2]
    assert got["val_acc"] == ref["val_acc"] and got["val_loss"] == ref["val_loss"]
    for mine, theirs in zip(got["history"], ref["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-12)
        assert mine["train_acc"] == theirs["train_acc"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sigterm_mid_epoch_exit_75_then_resume_is_bit_identical(reference, tmp_path, strategy):
    run_dir = tmp_path / "run"
    proc = start(tmp_path, strategy, run_dir)
    try:
        wait_for_checkpoint(proc, run_dir)
        os.kill(worker_pids(proc)[1], signal.SIGTERM)  # one rank only: the ranks agree on the step
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = (tmp_path / "run.log").read_text()
    assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", out)) == 2, out[-3000:]
    stopped = re.findall(r"distmnist: stopped by SIGTERM at step (\d+)", out)
    assert len(stopped) == 1, out[-3000:]
    newest = checkpoint.listing(run_dir / "checkpoints")[0]
    assert newest.is_dir()
    meta = checkpoint.read_any(newest)["distmnist"]
    assert meta["global_step"] == int(stopped[0])
    assert 0 < meta["step_in_epoch"] < STEPS_PER_EPOCH, meta
    assert not (run_dir / "model.pt").exists()

    again = ok(torchrun(f"distmnist.{strategy}", *FAULT, f"run.dir={run_dir}", cwd=tmp_path))
    assert "resuming from" in again.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_9_of_rank_1_restarts_from_the_sharded_checkpoint(reference, tmp_path, strategy):
    run_dir = tmp_path / "run"
    proc = start(tmp_path, strategy, run_dir, extra=("--max-restarts=1",))
    try:
        wait_for_checkpoint(proc, run_dir)
        os.kill(worker_pids(proc)[1], signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from" in out
    assert_same_run(run_dir, reference)


# ------------------------------------------------------------------------------------------- memory
MEMORY = ("model.hidden=[2048,2048]", "optim.name=adam", "optim.lr=0.001", "data.train_samples=256",
          "data.test_samples=64", "train.epochs=1")


def test_fsdp_holds_about_half_of_ddp_per_rank_with_adam_2048(tmp_path):
    """Parameters + gradients + Adam's two moments: 4 x 5.8 M floats on each DDP rank, half of them per FSDP rank."""
    ddp = metrics(train(tmp_path, "ddp", "ddp", *MEMORY))
    fsdp = metrics(train(tmp_path, "ddp", "fsdp", *MEMORY, FSDP))
    ratio = fsdp["state_mb"] / ddp["state_mb"]
    print(f"state per rank: ddp {ddp['state_mb']:.1f} MB, fsdp {fsdp['state_mb']:.1f} MB, ratio {ratio:.3f}")
    assert ddp["state_mb"] == pytest.approx(4 * ddp["param_mb"], rel=1e-3)  # Adam: exp_avg, exp_avg_sq (+ steps)
    assert ratio <= 0.55
