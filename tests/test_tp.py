"""Tensor parallelism and 2-D meshes (core/parallel.py): train.parallel=ddp|fsdp|hsdp x train.tp_size on 4 real gloo
processes. Each layout's model.pt against the DDP run of the same config and global batch, Fabric and the Trainer
against raw PyTorch under the same layout, the exact evaluation and tally, the per-rank memory figures, a SIGTERM
mid-epoch and the resume (also on another data-parallel size), and the layouts and sizes refused in one line.

One module-scoped set of runs is shared by the assertions: data.global_batch_size=64 and data.batch_size=16, so
every layout does the same optimizer steps on the same samples (accumulating where its data-parallel size is
below 4: pure TP 4 micro-batches a step, FSDP x TP and DDP x TP 2).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from procs import (
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

from distmnist.core import checkpoint, parallel
from distmnist.core.config import load_config
from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError
from distmnist.core.run import RunDir

NPROC = 4
# 1024 samples, global batch 64: 16 optimizer steps an epoch, 2 epochs; a checkpoint every 4 steps and a stop check
# every 2 give the SIGTERM test its moment mid-epoch (neither changes what is computed)
RUN = ("-c", "smoke", "data.train_samples=1024", "data.global_batch_size=64", "data.batch_size=16",
       "checkpoint.every_n_steps=4", "checkpoint.stop_check_every_n_steps=2", "dist.timeout_s=60")
STEPS_PER_EPOCH = 16
LAYOUTS = {  # name -> overrides; all on 4 processes
    "ddp": (),
    "tp": ("train.tp_size=4",),  # pure TP: one data-parallel rank
    "ddp-tp": ("train.tp_size=2",),  # DDP 2 x TP 2
    "fsdp-tp": ("train.parallel=fsdp", "train.tp_size=2"),  # FSDP 2 x TP 2
    "hsdp": ("train.parallel=hsdp", "train.replicate_size=2"),  # HSDP 2 x 2
}
LIGHTNING = {"fabric": ("tp", "fsdp-tp"), "trainer": ("fsdp-tp",)}  # what ModelParallelStrategy can hold (the
# others are refused: below); the Trainer's pure TP is the same configure_model with data_parallel_size=1


def train(tmp: Path, strategy: str, layout: str, nproc: int = NPROC) -> Path:
    run_dir = tmp / f"{strategy}-{layout}"
    ok(torchrun(f"distmnist.{strategy}", *RUN, *LAYOUTS[layout], f"run.dir={run_dir}", nproc=nproc, cwd=tmp))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    tmp = tmp_path_factory.mktemp("tp")
    out = {("ddp", name): train(tmp, "ddp", name) for name in LAYOUTS}
    out.update({(s, name): train(tmp, s, name) for s, names in LIGHTNING.items() for name in names})
    return out


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("layout", [n for n in LAYOUTS if n != "ddp"])
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_layout_model_pt_equals_ddp(runs, layout):
    """Raw PyTorch under each layout against DDP on 4 ranks: the same plain NNModel state_dict, weights to 1e-5
    (the row-parallel layer sums its partial products in another order, accumulation sums micro-batches: float32
    rounding: ~1e-7 measured)."""
    ref, got = weights(runs["ddp", "ddp"]), weights(runs["ddp", layout])
    assert [(k, v.shape, v.dtype) for k, v in got.items()] == [(k, v.shape, v.dtype) for k, v in ref.items()]
    diff = max_abs_diff(got, ref)
    print(f"{layout} vs ddp: max abs {diff:.3g}")
    assert diff <= 1e-5, diff


@pytest.mark.parametrize(("strategy", "layout"), [(s, n) for s, names in LIGHTNING.items() for n in names])
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lightning_equals_raw_pytorch_bit_for_bit(runs, strategy, layout):
    """Fabric and the Trainer through ModelParallelStrategy with core.parallel's layout: the same arithmetic as
    ddp.py under that layout, so the same weights bit for bit."""
    ref, got = weights(runs["ddp", layout]), weights(runs[strategy, layout])
    print(f"{strategy} {layout} vs ddp.py {layout}: max abs {max_abs_diff(got, ref):.3g}")
    assert same_weights(got, ref)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluation_and_tally_count_every_sample_once(runs):
    """The ranks of a TP group train on the same samples and evaluate whole copies: the epoch's train_samples,
    val_samples (500 test images, once each) and the numbers are DDP's."""
    ddp = metrics(runs["ddp", "ddp"])
    for (strategy, layout), run_dir in runs.items():
        m = metrics(run_dir)
        assert m["world_size"] == NPROC and m["global_step"] == ddp["global_step"] == 2 * STEPS_PER_EPOCH
        assert m["tp_size"] == {"tp": 4, "ddp-tp": 2, "fsdp-tp": 2}.get(layout, 1)
        assert m["data_parallel_size"] == NPROC // m["tp_size"]
        assert [h["train_samples"] for h in m["history"]] == [h["train_samples"] for h in ddp["history"]]
        assert [h["val_samples"] for h in m["history"]] == [500, 500]
        assert m["val_acc"] == pytest.approx(ddp["val_acc"], abs=1e-3), (strategy, layout)
        assert m["train_loss"] == pytest.approx(ddp["train_loss"], rel=1e-5), (strategy, layout)


def held_floats(layout: str) -> int:
    """Rank 0's parameter floats of the NNModel 784-128-128-10 under `layout` on 4 ranks: TP splits the first
    Linear's rows (weight and bias) and the second's columns (not its bias), FSDP/HSDP then split dim 0 of every
    parameter over their shard size (rank 0 keeps ceil(rows / n))."""
    tp, shard = {"ddp": (1, 1), "tp": (4, 1), "ddp-tp": (2, 1), "fsdp-tp": (2, 2), "hsdp": (1, 2),
                 "hsdp-tp": (2, 2)}[layout]

    def rows(n: int, cols: int) -> int:
        return -(-n // shard) * cols

    return (rows(128 // tp, 784) + rows(128 // tp, 1) + rows(128, 128 // tp) + rows(128, 1) + rows(10, 128)
            + rows(10, 1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_memory_figures_per_rank(runs):
    """param/grad/optimizer MB per rank (SGD with momentum: one buffer per parameter) in metrics.json, against the
    layout's arithmetic: against DDP's 118282 floats, pure TP 4 holds 30634 (0.259), FSDP 2 x TP 2 29925 (0.253),
    DDP 2 x TP 2 59850 (0.506), HSDP 2 x 2 59141 (0.5)."""
    ddp = metrics(runs["ddp", "ddp"])
    assert held_floats("ddp") == 118282
    for (strategy, layout), run_dir in runs.items():
        m = metrics(run_dir)
        assert m["param_mb"] * 2**20 == held_floats(layout) * 4, (strategy, layout)
        assert m["optim_mb"] == m["grad_mb"] == m["param_mb"]
        ratio = m["state_mb"] / ddp["state_mb"]
        assert ratio == pytest.approx(held_floats(layout) / held_floats("ddp")), (strategy, layout)
        print(f"{strategy} {layout}: state {m['state_mb']:.3f} MB/rank, {ratio:.3f} of DDP's")
    assert metrics(runs["ddp", "tp"])["state_mb"] < ddp["state_mb"] / 3.8


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_3d_layout_hsdp_x_tp_on_8_processes_equals_ddp(runs, tmp_path):
    """HSDP 2 x 2 x TP 2 (replicate x shard x tp, a 3-D mesh) on 8 gloo processes: 4 data-parallel ranks of 16
    samples, as DDP's 4 ranks: the same model.pt to 1e-5, every sample counted once, and rank 0 holding FSDP x TP's
    share of the weights (the shard size is 2 in both)."""
    run_dir = tmp_path / "hsdp-tp"
    proc = ok(torchrun("distmnist.ddp", *RUN, "train.parallel=hsdp", "train.replicate_size=2", "train.tp_size=2",
                       f"run.dir={run_dir}", nproc=8, cwd=tmp_path, timeout=500))
    assert "sequential all_gather" not in proc.stderr  # gathering the weights: torch's warning dropped (core.parallel)
    m, ddp = metrics(run_dir), metrics(runs["ddp", "ddp"])
    assert (m["world_size"], m["data_parallel_size"], m["tp_size"]) == (8, 4, 2), m["layout"]
    assert [h["train_samples"] for h in m["history"]] == [h["train_samples"] for h in ddp["history"]]
    assert m["param_mb"] * 2**20 == held_floats("hsdp-tp") * 4
    diff = max_abs_diff(weights(run_dir), weights(runs["ddp", "ddp"]))
    print(f"hsdp 2 x 2 x tp 2 on 8 processes vs ddp on 4: max abs {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoints_are_sharded_and_name_their_layout(runs):
    for (strategy, layout), run_dir in runs.items():
        newest = checkpoint.listing(run_dir / "checkpoints")[0]
        if layout == "ddp":
            assert newest.is_file()
            continue
        assert newest.is_dir() and (newest / ".metadata").is_file(), (strategy, layout)
        meta = checkpoint.read_any(newest)["distmnist"]
        assert meta["tp_size"] == metrics(run_dir)["tp_size"] and meta["world_size"] == NPROC


def prepare(run_dir: Path, *overrides: str, world_size: int = NPROC) -> Path | None:
    """What every rank decides before training: which checkpoint resumes `run_dir` (or one line why none can)."""
    cfg = load_config("smoke", [*RUN[2:], f"run.dir={run_dir}", *overrides])
    return RunDir(cfg, "ddp", DistEnv(world_size=world_size)).checkpoint_to_resume()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_another_layout_is_refused_in_one_line(runs):
    """Across layouts (FSDP x TP -> FSDP, TP 4 -> TP 2, HSDP 2 x 2 -> 1 x 4) the checkpoint is refused, before
    anything is written; the same layout on another number of processes is accepted."""
    fsdp_tp = runs["ddp", "fsdp-tp"]
    for run_dir, overrides in ((fsdp_tp, ("train.parallel=fsdp",)),
                               (runs["ddp", "tp"], ("train.tp_size=2",)),
                               (runs["ddp", "hsdp"], ("train.parallel=hsdp", "train.replicate_size=1"))):
        with pytest.raises(DistMnistError) as err:
            prepare(run_dir, *overrides)
        line = str(err.value)
        assert "\n" not in line and "another layout" in line and "new run.dir" in line, line
        assert f"resume it with train.tp_size={metrics(run_dir)['tp_size']}" in line, line
    newest = checkpoint.listing(fsdp_tp / "checkpoints")[0]
    assert prepare(fsdp_tp, *LAYOUTS["fsdp-tp"]) == newest
    assert prepare(fsdp_tp, *LAYOUTS["fsdp-tp"], world_size=2) == newest  # FSDP 1 x TP 2


# ------------------------------------------------------------------------------------------- faults
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", ["fsdp-tp", "ddp-tp", "hsdp"])  # every 2-D layout
def test_sigterm_mid_epoch_under_a_2d_layout_resumes_exactly(runs, tmp_path, layout):
    """SIGTERM to one rank of a 2 x 2 run (FSDP x TP, DDP x TP, HSDP) mid-epoch: the ranks agree on a step, write a
    sharded checkpoint, exit 75; the same command resumes it: weights and numbers equal the uninterrupted run's bit
    for bit. FSDP x TP's checkpoint resumed on 2 processes (FSDP 1 x TP 2: DCP reshards the data-parallel
    dimension) ends within 1e-5 (one data-parallel rank sums its micro-batches where two ranks averaged theirs)."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            torchrun_cmd("distmnist.ddp", *RUN, *LAYOUTS[layout], f"run.dir={run_dir}", nproc=NPROC),
            cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for_checkpoint(proc, run_dir)
            pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            os.kill(int(pids[-1]), signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text()
    assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", text)) == NPROC, text[-3000:]  # every rank: 75
    stopped = re.findall(r"distmnist: stopped by SIGTERM at step (\d+)", text)
    assert len(stopped) == 1, text[-3000:]
    newest = checkpoint.listing(run_dir / "checkpoints")[0]
    state = position(newest)
    assert newest.is_dir() and state.global_step == int(stopped[0]) < 2 * STEPS_PER_EPOCH
    assert 0 < state.step_in_epoch < STEPS_PER_EPOCH, state
    assert not (run_dir / "model.pt").exists()
    elsewhere = tmp_path / "two"
    shutil.copytree(run_dir, elsewhere)

    reference = runs["ddp", layout]
    again = ok(torchrun("distmnist.ddp", *RUN, *LAYOUTS[layout], f"run.dir={run_dir}", nproc=NPROC,
                        cwd=tmp_path))
    assert "resuming from" in again.stdout
    got, ref = metrics(run_dir), metrics(reference)
    print(f"resumed {layout} vs uninterrupted: max abs {max_abs_diff(weights(run_dir), weights(reference)):.3g}")
    assert same_weights(weights(run_dir), weights(reference))
    assert got["val_loss"] == ref["val_loss"] and [h["train_acc"] for h in got["history"]] == [
        h["train_acc"] for h in ref["history"]]

    if layout != "fsdp-tp":
        return
    two = ok(torchrun("distmnist.ddp", *RUN, *LAYOUTS[layout], f"run.dir={elsewhere}", nproc=2, cwd=tmp_path))
    assert "resuming from" in two.stdout
    assert metrics(elsewhere)["data_parallel_size"] == 1 and metrics(elsewhere)["global_step"] == ref["global_step"]
    diff = max_abs_diff(weights(elsewhere), weights(reference))
    print(f"resumed on 2 processes (fsdp 1 x tp 2) vs uninterrupted on 4: max abs {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_of_one_rank_under_fsdp_x_tp_restarts_and_ends_with_the_uninterrupted_weights(runs, tmp_path):
    """kill -9 of one of the 4 ranks of an FSDP 2 x TP 2 run under `torchrun --max-restarts=1`: the others notice,
    torchrun restarts the group, which resumes from the newest complete sharded checkpoint (a half-written one is
    skipped) and ends with the uninterrupted run's weights and numbers, bit for bit."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            torchrun_cmd("distmnist.ddp", *RUN, *LAYOUTS["fsdp-tp"], f"run.dir={run_dir}", nproc=NPROC,
                         extra=("--max-restarts=1",)),
            cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for_checkpoint(proc, run_dir)
            pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(pids) == NPROC, pids
            os.kill(int(pids[-1]), signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "resuming from" in text, text[-4000:]  # the restarted group (a fresh run.dir never resumes)
    reference = runs["ddp", "fsdp-tp"]
    got, ref = metrics(run_dir), metrics(reference)
    print(f"restarted fsdp x tp vs uninterrupted: max abs {max_abs_diff(weights(run_dir), weights(reference)):.3g}")
    assert same_weights(weights(run_dir), weights(reference))
    assert got["val_loss"] == ref["val_loss"] and got["global_step"] == ref["global_step"]


# ------------------------------------------------------------------------------------- refusals (fast)
def sizes_refused(world_size: int, *overrides: str) -> str:
    with pytest.raises(DistMnistError) as err:
        parallel.layout(load_config("smoke", list(overrides)), world_size)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_sizes_that_do_not_divide_are_refused_naming_sizes_that_fit():
    with pytest.raises(DistMnistError, match=r"model.hidden\[0\]=128: use train.tp_size=1, 2, 4, 8, 16, 32, 64$"):
        load_config("smoke", ["train.tp_size=3"])
    with pytest.raises(DistMnistError, match=r"model.hidden\[0\]=96: use train.tp_size=1, 2, 3, 4, 6, 8, 12"):
        load_config("smoke", ["train.tp_size=5", "model.hidden=[96,128]"])
    assert "does not divide the 6 processes: use train.tp_size=1, 2" in sizes_refused(6, "train.tp_size=4")
    assert "train.replicate_size=1, 2, 4" in sizes_refused(4, "train.parallel=hsdp", "train.replicate_size=3")
    assert "data-parallel size 2" in sizes_refused(4, "train.parallel=hsdp", "train.replicate_size=4",
                                                   "train.tp_size=2")
    with pytest.raises(DistMnistError, match="needs train.replicate_size"):
        load_config("smoke", ["train.parallel=hsdp"])
    with pytest.raises(DistMnistError, match="applies to train.parallel=hsdp only"):
        load_config("smoke", ["train.parallel=fsdp", "train.replicate_size=2"])
    with pytest.raises(DistMnistError, match="16-mixed"):
        load_config("smoke", ["train.tp_size=2", "train.precision=16-mixed", "train.accelerator=cuda"])


def test_layouts_as_mesh_degrees():
    cfg = load_config("smoke", ["train.parallel=hsdp", "train.replicate_size=2", "train.tp_size=2"])
    lay = parallel.layout(cfg, 8)
    assert (lay.replicate, lay.shard, lay.tp, lay.dp) == (2, 2, 2, 4) and lay.describe() == "hsdp 2x2 x tp 2"
    assert [lay.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # a TP group: neighbouring ranks
    assert [lay.tp_rank(r) for r in range(8)] == [0, 1] * 4
    ddp = parallel.layout(load_config("smoke", []), 4)
    assert (ddp.replicate, ddp.shard, ddp.tp, ddp.on_mesh) == (4, 1, 1, False)
    pure = parallel.layout(load_config("smoke", ["train.tp_size=4"]), 4)
    assert (pure.dp, pure.on_mesh, pure.describe()) == (1, True, "ddp 1 x tp 4")


@pytest.mark.slow  # a process (Lightning's import): not the fast tier
@pytest.mark.timeout(300)
def test_lightning_refuses_what_its_mesh_cannot_hold_in_one_line(tmp_path):
    """ModelParallelStrategy's mesh is data_parallel x tensor_parallel: HSDP (here 1 x 1 on one process) and DDP
    replicas next to TP are refused with exit 2 before anything is written."""
    from distmnist.lightning import adapters

    for overrides in (("train.parallel=hsdp", "train.replicate_size=2"), ("train.tp_size=2",)):
        lay = parallel.layout(load_config("smoke", list(overrides)), 4)
        with pytest.raises(DistMnistError, match="cannot be expressed in Lightning's ModelParallelStrategy"):
            adapters.model_parallel_sizes(lay)
    assert adapters.model_parallel_sizes(parallel.layout(load_config("smoke", LAYOUTS["fsdp-tp"]), 4)) == (2, 2)
    proc = run_module("distmnist.fabric", "-c", "smoke", "train.parallel=hsdp", "train.replicate_size=1",
                      f"run.dir={tmp_path / 'r'}", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "ModelParallelStrategy" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()
