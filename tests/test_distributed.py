"""Real 2-rank gloo training under torchrun, for the three strategies: parity, resume, precision, logging.

One set of short runs (configs/smoke.yaml: synthetic data, 2 epochs) is shared by many assertions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import STRATEGIES, child_env, free_port, metrics, ok, run_module, same_weights, torchrun, weights

from distmnist.core import tblog

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMOKE = ("-c", "smoke", "dist.timeout_s=60")


def train(tmp: Path, strategy: str, name: str, *overrides: str, nproc: int = 2):
    run_dir = tmp / name
    proc = ok(torchrun(f"distmnist.{strategy}", *SMOKE, f"run.dir={run_dir}", *overrides, nproc=nproc, cwd=tmp))
    return run_dir, proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 ranks x batch 32, fp32, each strategy; plus the Trainer on the DataLoader path."""
    tmp = tmp_path_factory.mktemp("parity")
    out = {s: train(tmp, s, s) for s in STRATEGIES}
    out["trainer-dataloader"] = train(tmp, "trainer", "trainer-dl", "data.loader=dataloader", "data.num_workers=1")
    return out


def test_model_pt_bit_identical_across_strategies(runs):
    ref = weights(runs["ddp"][0])
    for name in ("trainer", "fabric", "trainer-dataloader"):
        assert same_weights(ref, weights(runs[name][0])), f"{name} model.pt differs from ddp's"
    # and training did move the weights away from their (shared) initial values
    from distmnist.core.model import build_model

    init = build_model([128, 128], 0).state_dict()
    assert not any(torch.equal(init[k], ref[k]) for k in init)


def test_metrics_json_same_numbers_and_shape(runs):
    ref = metrics(runs["ddp"][0])
    keys = ("strategy", "world_size", "epochs", "global_step", "val_acc", "val_loss", "train_samples_per_sec", "wall_s")
    for key in keys:
        assert key in ref
    assert ref["world_size"] == 2 and ref["epochs"] == 2 and ref["global_batch_size"] == 64
    assert ref["global_step"] == 2 * 32  # 2048 samples / 2 ranks / 32 per batch = 32 steps per epoch
    assert ref["val_samples"] == 500 and ref["val_acc"] > 0.9
    for name in ("trainer", "fabric"):
        m = metrics(runs[name][0])
        assert m["strategy"] == name
        assert set(m) == set(ref)
        for key in ("val_acc", "val_loss", "train_loss", "train_acc", "global_step", "epochs", "val_samples"):
            assert m[key] == ref[key], (name, key)
        assert [h["val_acc"] for h in m["history"]] == [h["val_acc"] for h in ref["history"]]


def test_tensorboard_same_tags_steps_and_values(runs):
    ref = tblog.read_scalars(runs["ddp"][0])
    assert set(ref) == set(tblog.TAGS)
    assert [s for s, _ in ref["train/loss"]] == list(range(10, 65, 10))  # log_every_n_steps=10 in smoke.yaml
    assert [s for s, _ in ref["val/acc"]] == [32, 64]
    for name in ("trainer", "fabric"):
        got = tblog.read_scalars(runs[name][0])
        assert set(got) == set(ref), name
        for tag in ref:
            steps = [s for s, _ in ref[tag]]
            assert [s for s, _ in got[tag]] == steps, (name, tag)
            if not tag.startswith("perf/"):  # timings
                assert got[tag] == ref[tag], (name, tag)


def test_hparams_recorded_once(runs):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for name in STRATEGIES:
        sessions = 0
        for f in runs[name][0].glob("events.out.tfevents.*"):
            for event in EventFileLoader(str(f)).Load():
                for value in event.summary.value:
                    plugin = value.metadata.plugin_data.plugin_name
                    if plugin == "hparams" and value.tag == "_hparams_/session_start_info":
                        sessions += 1
        assert sessions == 1, name


def test_only_rank_zero_reports(runs):
    for name in STRATEGIES:
        proc = runs[name][1]
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"[{name}] epoch")]
        assert len(lines) == 2, proc.stdout


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """raw DDP in one process, batch 64."""
    tmp = tmp_path_factory.mktemp("one")
    ok(run_module("distmnist.ddp", *SMOKE, "data.batch_size=64", f"run.dir={tmp / 'ddp'}", cwd=tmp))
    return tmp / "ddp"


def test_ddp_arithmetic_two_ranks_equal_one_rank_double_batch(runs, one_rank):
    """2 ranks x 32 see, step by step, the same 64 samples as 1 rank x 64: same weights up to float rounding."""
    a, b = weights(one_rank), weights(runs["ddp"][0])
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
    assert metrics(one_rank)["global_step"] == metrics(runs["ddp"][0])["global_step"]


# The Trainer with its step inside training_step (what it does on one GPU, there replayed from a CUDA graph):
# here CapturedStep runs that step eagerly -- the path the graph falls back to for a short batch.
TRAINER_WITH_STEP_RUNNER = """
import sys
from distmnist import trainer
from distmnist.lightning import internals
runners = []
graph_start = internals.GraphStep.on_train_start
def on_train_start(self):
    graph_start(self)
    runners.append(self.step_runner)
internals.GraphStep.on_train_start = on_train_start
internals.GraphStep.capture = False  # the captured arrangement, run eagerly
trainer.capture_applies = lambda cfg, env: True  # as on one GPU
code = trainer.main(sys.argv[1:])
print("step runner steps:", sum(r.steps for r in runners))
sys.exit(code)
"""


def test_trainer_step_inside_training_step_equals_raw_ddp(one_rank, tmp_path):
    """Backward inside training_step with Lightning's backward and zero_grad hooks standing aside: bit for bit the
    weights, metrics and logged losses of raw DDP (a second backward would fail, a late zero_grad leave the weights
    where they started)."""
    run_dir = tmp_path / "trainer"
    proc = ok(subprocess.run(
        [sys.executable, "-c", TRAINER_WITH_STEP_RUNNER, *SMOKE, "data.batch_size=64", f"run.dir={run_dir}"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=240,
    ))
    m, ref = metrics(run_dir), metrics(one_rank)
    assert f"step runner steps: {ref['global_step']}" in proc.stdout
    assert same_weights(weights(run_dir), weights(one_rank))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "global_step"):
        assert m[key] == ref[key], key
    got, want = tblog.read_scalars(run_dir), tblog.read_scalars(one_rank)
    assert got["train/loss"] == want["train/loss"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_equals_uninterrupted(runs, tmp_path, strategy):
    """1 epoch, stop, start again with the same run.dir and 2 epochs: same final weights as 2 epochs at once."""
    run_dir, _ = train(tmp_path, strategy, "resumed", "train.epochs=1")
    assert metrics(run_dir)["epochs"] == 1
    proc = ok(torchrun(f"distmnist.{strategy}", *SMOKE, f"run.dir={run_dir}", "train.epochs=2", cwd=tmp_path))
    assert "resuming from" in proc.stdout
    assert same_weights(weights(run_dir), weights(runs[strategy][0]))
    m = metrics(run_dir)
    assert m["epochs"] == 2 and [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["val_acc"] == metrics(runs[strategy][0])["val_acc"]


def test_bf16_mixed_on_cpu_trains_and_matches_across_strategies(tmp_path):
    dirs = {s: train(tmp_path, s, f"bf16-{s}", "train.precision=bf16-mixed")[0] for s in STRATEGIES}
    ref = metrics(dirs["ddp"])
    assert ref["precision"] == "bf16-mixed"
    assert ref["val_acc"] >= 0.85, ref["val_acc"]  # measured 0.918 (fp32: 0.964)
    for s in ("trainer", "fabric"):
        assert metrics(dirs[s])["val_acc"] == ref["val_acc"]
        assert same_weights(weights(dirs[s]), weights(dirs["ddp"])), s


def test_evaluate_under_torchrun_counts_each_sample_once(runs, tmp_path):
    run_dir = runs["ddp"][0]
    out = tmp_path / "eval3.json"
    proc = ok(torchrun("distmnist.evaluate", "--model", str(run_dir / "model.pt"), "--out", str(out), *SMOKE,
                       nproc=3, cwd=tmp_path))
    result = json.loads(out.read_text())
    assert result["world_size"] == 3
    assert result["val_samples"] == 500  # 500 = 167 + 167 + 166: no padding counted
    assert abs(result["val_acc"] - metrics(run_dir)["val_acc"]) < 1e-6
    assert proc.stdout.count("val_acc") == 1  # rank 0 alone prints


def test_evaluate_a_checkpoint_of_each_strategy_gives_its_epochs_numbers(runs, tmp_path):
    """The end-of-epoch-1 checkpoint (raw DDP and Fabric: 'model'; the Trainer: Lightning's 'state_dict'),
    evaluated in one process, scores exactly what that epoch's evaluation by 2 ranks recorded."""
    from distmnist.core import checkpoint
    from distmnist.core.config import load_config
    from distmnist.tools.evaluate import evaluate_model

    for s in STRATEGIES:
        run_dir = runs[s][0]
        first = metrics(run_dir)["history"][0]
        path = checkpoint.step_path(run_dir / "checkpoints", first["global_step"])
        result = evaluate_model(path, load_config(run_dir / "config.yaml"), tmp_path / f"{s}.json")
        assert result["global_step"] == first["global_step"] == 32, s
        assert result["val_acc"] == first["val_acc"], s
        assert result["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6), s


def test_evaluate_a_run_dir_needs_no_config_and_prints_before_it_writes(runs, tmp_path):
    """`distmnist evaluate RUN_DIR`: the data set from the run's config.yaml; a result that cannot be written
    (--out under a file) is printed all the same, then one line and exit 2."""
    run_dir = runs["fabric"][0]
    proc = ok(run_module("distmnist.tools.cli", "evaluate", str(run_dir), cwd=tmp_path))
    assert f"of {run_dir / 'model.pt'}" in proc.stdout and "synthetic test samples" in proc.stdout
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["val_acc"] == metrics(run_dir)["val_acc"] and result["dataset"] == "synthetic"
    bad = run_module("distmnist.tools.cli", "evaluate", str(run_dir), "--out", str(run_dir / "model.pt" / "x.json"),
                     cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert re.search(r"^val_acc [0-9.]+ ", bad.stdout, re.M), bad.stdout
    assert bad.stderr.strip().count("\n") == 0 and "cannot write" in bad.stderr and "--out" in bad.stderr


def test_env_contract_without_torchrun_trains_the_same_weights(runs, tmp_path):
    """The plain env:// contract of Kubeflow's PyTorchJob and MPI wrappers (docs/clusters.md): one process per pod,
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and no LOCAL_RANK; every strategy trains the weights that torchrun's
    2 ranks train, bit for bit."""
    for s in STRATEGIES:
        run_dir, port = tmp_path / s, str(free_port())
        procs = [subprocess.Popen([sys.executable, "-m", f"distmnist.{s}", *SMOKE, f"run.dir={run_dir}", "-q"],
                                  cwd=tmp_path, env=child_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                              MASTER_PORT=port),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=240) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], (s, [err[-2000:] for _, err in outs])
        assert metrics(run_dir)["world_size"] == 2
        assert same_weights(weights(run_dir), weights(runs[s][0])), s


def test_fashion_mnist_one_epoch_reaches_80_percent(tmp_path):
    """The real Debian Fashion-MNIST files, found without being named, 2 ranks, 1 epoch of configs/fashion.yaml."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    run_dir = tmp_path / "fashion"
    ok(torchrun("distmnist.ddp", "-c", "fashion", "train.epochs=1", f"data.root={tmp_path / 'data'}",
                f"run.dir={run_dir}", "train.progress=false", cwd=tmp_path))
    m = metrics(run_dir)
    assert m["val_samples"] == 10000
    assert m["val_acc"] >= 0.80, m["val_acc"]
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 47040016


def test_tensorboard_figures_in_every_strategy(runs):
    """Once per run the training samples; per epoch the confusion matrix and the misclassified test images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in STRATEGIES:
        steps: dict[str, list[int]] = {}
        for f in runs[name][0].glob("events.out.tfevents.*"):
            acc = EventAccumulator(str(f), size_guidance={"images": 0})
            acc.Reload()
            for tag in acc.Tags()["images"]:
                steps.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
                assert all(e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" for e in acc.Images(tag))
        assert set(steps) == set(tblog.FIGURES), (name, steps)
        assert steps["data/samples"] == [0]
        assert sorted(steps["val/confusion_matrix"]) == sorted(steps["val/misclassified"]) == [32, 64], name
        history = metrics(runs[name][0])["history"]
        for h in history:  # the confusion matrix behind the figure counts every test sample once
            assert sum(map(sum, h["confusion"])) == 500
            assert sum(h["confusion"][i][i] for i in range(10)) == round(h["val_acc"] * 500)


@pytest.mark.parametrize("strategy", ["ddp", "trainer"])
def test_quiet_prints_one_line(tmp_path, strategy):
    proc = ok(run_module(f"distmnist.{strategy}", *SMOKE, "--quiet", f"run.dir={tmp_path / 'q'}", cwd=tmp_path))
    assert [ln for ln in proc.stdout.splitlines() if ln.strip()] == [
        f"[{strategy}] done: val_acc {metrics(tmp_path / 'q')['val_acc']:.4f} after 2 epochs; wrote "
        f"{tmp_path / 'q' / 'model.pt'} and {tmp_path / 'q' / 'metrics.json'}"
    ]
    assert "epoch 1/2" not in proc.stderr and "it/s" not in proc.stderr and "step/s" not in proc.stderr


@pytest.mark.parametrize("strategy", ["ddp", "trainer"])
def test_resume_with_another_number_of_processes_is_refused(runs, tmp_path, strategy):
    """Written by 2 processes without data.global_batch_size, resumed by 1: refused with one line (exit 2) -- never
    a silent change of global batch, data order and schedule (with data.global_batch_size the resume is exact:
    test_elastic.py). Nothing in the run dir changes."""
    run_dir = tmp_path / strategy
    shutil.copytree(runs[strategy][0], run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_module(f"distmnist.{strategy}", *SMOKE, f"run.dir={run_dir}", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "written by 2 processes" in lines[0] and "this job has 1" in lines[0], lines[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_diverging_run_stops_every_rank_with_exit_3_and_writes_nothing_non_finite(tmp_path, strategy):
    """SGD at lr 1e4 on 2 gloo ranks: every rank exits 3 at the same step, one line says where, metrics.json says
    diverged, no model.pt, and no file of the run dir holds a non-finite tensor (checkpoints are tried every 4
    steps, so the check before a save is exercised as well as the stop check's flag)."""
    run_dir = tmp_path / "run"
    proc = torchrun(f"distmnist.{strategy}", *SMOKE, f"run.dir={run_dir}", "optim.lr=1e4",
                    "checkpoint.every_n_steps=4", cwd=tmp_path)
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", proc.stderr, flags=re.M)  # torchrun's failure summary
    assert proc.returncode != 0 and sorted(codes) == ["3", "3"], proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distmnist: error: training diverged")]
    assert len(lines) == 1 and re.search(r"by step \d+", lines[0]), proc.stderr[-3000:]
    m = metrics(run_dir)
    assert m["status"] == "diverged" and m["diverged"] == lines[0][len("distmnist: error: "):]
    assert not (run_dir / "model.pt").exists()
    files = list(run_dir.rglob("*.ckpt"))
    for f in files:
        tensors = list(all_tensors(torch.load(f, weights_only=True)))
        assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), f

