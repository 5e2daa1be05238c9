"""The command line as a user meets it: real subprocesses, one-line errors with exit code 2, no debris.

Every bad input runs the real entry point (`python -m distmnist.ddp`, `distmnist train`,
`python -m distmnist.evaluate`, `distmnist data prepare`) in its own folder. The error cases are started
together in a small thread pool (each process spends seconds importing torch; two cores overlap them), and
each test then checks its own result.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distmnist.core.data import RAW_FILES

FASHION = Path("/usr/share/datasets/fashion-mnist")
RAW_NAMES = RAW_FILES  # the four standard IDX file names
TIMEOUT = 180

_script = Path(sysconfig.get_path("scripts")) / "distmnist"
# the `distmnist` console script of this interpreter's environment, else the same main() through -m
DISTMNIST = [str(_script)] if _script.is_file() else [sys.executable, "-m", "distmnist"]
DDP = [sys.executable, "-m", "distmnist.ddp"]
EVALUATE = [sys.executable, "-m", "distmnist.evaluate"]
PREPARE = [*DISTMNIST, "data", "prepare", "--name", "fashion-mnist", "--from", "{dir}/src", "--root", "{dir}/data"]


def clean_env() -> dict[str, str]:
    """No launcher variables from the outside: each command is one plain process."""
    env = dict(os.environ)
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_ID",
    ):
        env.pop(var, None)
    return env


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)


def problem_lines(stderr: str) -> list[str]:
    """stderr without empty lines and without Python warnings (the warning line and its source line)."""
    lines, in_warning = [], False
    for line in stderr.splitlines():
        if not line.strip():
            continue
        if re.search(r"\b\w*Warning: ", line):
            in_warning = True
            continue
        if in_warning and line[:1].isspace():
            continue
        in_warning = False
        lines.append(line)
    return lines


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    report = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stderr, report
    assert result.returncode == 2, report
    lines = problem_lines(result.stderr)
    assert len(lines) == 1, report
    for text in expected:
        assert text in lines[0], f"{text!r} not in the error line\n{report}"
    return lines[0]


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()


def tiny_idx_folder(folder: Path, skip: str | None = None, truncate: str | None = None) -> Path:
    folder.mkdir(parents=True)
    for name in RAW_NAMES:
        if name == skip:
            continue
        raw = idx_bytes(np.zeros((3, 28, 28) if "images" in name else (3,), dtype=np.uint8))
        (folder / name).write_bytes(raw[:-50] if name == truncate else raw)
    return folder


# ------------------------------------------------------------------------------------------ error cases
@dataclass
class Case:
    argv: list[str]  # {run} is replaced by the case's run.dir, {dir} by its own folder
    expected: tuple[str, ...]  # texts the one error line must hold ({dir} replaced)
    training: bool = True  # a training entry point: no run directory may be left behind
    setup: Callable[[Path], object] | None = None  # prepares files in the case's folder


def _empty_root(folder: Path) -> None:
    (folder / "empty-data").mkdir()


def _text_model(folder: Path) -> None:
    (folder / "model.pt").write_text("this is a text file, not a model\n")


def _foreign_dict(folder: Path) -> None:
    torch.save({"weight": torch.zeros(10, 784), "bias": torch.zeros(10)}, folder / "model.pt")


CASES: dict[str, Case] = {
    # config mistakes, through `distmnist train` (they stop before torch is even imported)
    "train-unknown-key": Case([*DISTMNIST, "train", "optim.lrr=0.1", "run.dir={run}"], ("optim.lrr",)),
    "train-unknown-section-key": Case(
        [*DISTMNIST, "train", "data.bogus=1", "run.dir={run}"], ("data.bogus",)
    ),
    "train-unknown-top-key": Case([*DISTMNIST, "train", "bogus=1", "run.dir={run}"], ("bogus",)),
    "train-wrong-type": Case(
        [*DISTMNIST, "train", "data.batch_size=abc", "run.dir={run}"], ("data.batch_size",)
    ),
    "train-bool-for-int": Case(
        [*DISTMNIST, "train", "train.epochs=true", "run.dir={run}"], ("train.epochs",)
    ),
    "train-negative-lr": Case([*DISTMNIST, "train", "optim.lr=-0.1", "run.dir={run}"], ("optim.lr",)),
    "train-batch-size-0": Case(
        [*DISTMNIST, "train", "data.batch_size=0", "run.dir={run}"], ("data.batch_size",)
    ),
    "train-unknown-dataset": Case(
        [*DISTMNIST, "train", "data.name=cifar10", "run.dir={run}"], ("data.name",)
    ),
    "train-unknown-precision": Case(
        [*DISTMNIST, "train", "train.precision=fp8", "run.dir={run}"], ("train.precision",)
    ),
    "train-missing-config": Case(
        [*DISTMNIST, "train", "-c", "{dir}/nope.yaml", "run.dir={run}"], ("nope.yaml",)
    ),
    "train-override-without-equals": Case([*DISTMNIST, "train", "optim.lr", "run.dir={run}"], ("optim.lr",)),
    "train-unknown-strategy": Case(
        [*DISTMNIST, "train", "--strategy", "horovod", "run.dir={run}"], ("horovod",)
    ),
    "train-unknown-option": Case([*DISTMNIST, "train", "--bogus-flag", "run.dir={run}"], ("--bogus-flag",)),
    # the same parser behind the torchrun entry point
    "ddp-unknown-key": Case([*DDP, "optim.lrr=0.1", "run.dir={run}"], ("optim.lrr",)),
    # no data and no way to get it
    "ddp-offline-without-data": Case(
        [
            *DDP,
            "-c",
            "smoke",
            "data.name=mnist",
            "data.download=false",
            "data.root={dir}/empty-data",
            "run.dir={run}",
        ],
        ("data.download", "{dir}/empty-data"),
        setup=_empty_root,
    ),
    # a file that is not a model.pt
    "evaluate-text-file": Case(
        [*EVALUATE, "--model", "{dir}/model.pt", "-c", "smoke"],
        ("model.pt",),
        training=False,
        setup=_text_model,
    ),
    "evaluate-foreign-dict": Case(
        [*EVALUATE, "--model", "{dir}/model.pt", "-c", "smoke"],
        ("model.pt", "state_dict of distmnist's MLP"),
        training=False,
        setup=_foreign_dict,
    ),
    # the benchmark's own flags
    "bench-repeats-0": Case([*DISTMNIST, "bench", "--repeats", "0", "--out", "{dir}/bench"], ("--repeats",),
                            training=False),
    "bench-unknown-baseline": Case(
        [*DISTMNIST, "bench", "-c", "smoke", "--data", "synthetic", "--baselines", "keras", "--strategies", "",
         "--out", "{dir}/bench"], ("keras", "tutorial"), training=False),
    # data prepare from a folder that lacks a file / holds a truncated one
    "prepare-missing-file": Case(
        PREPARE,
        ("t10k-labels-idx1-ubyte",),
        training=False,
        setup=lambda d: tiny_idx_folder(d / "src", skip="t10k-labels-idx1-ubyte"),
    ),
    "prepare-truncated-file": Case(
        PREPARE,
        ("train-images-idx3-ubyte",),
        training=False,
        setup=lambda d: tiny_idx_folder(d / "src", truncate="train-images-idx3-ubyte"),
    ),
}


def _fill(text: str, folder: Path) -> str:
    return text.replace("{run}", str(folder / "run")).replace("{dir}", str(folder))


def _error_job(name: str):
    case = CASES[name]

    def job(folder: Path):
        if case.setup is not None:
            case.setup(folder)
        return run([_fill(a, folder) for a in case.argv], cwd=folder)

    return job


# ------------------------------------------------------------------------------------- real data, positive
needs_fashion = pytest.mark.skipif(
    not all((FASHION / f"{n}.gz").is_file() for n in RAW_NAMES),
    reason="Fashion-MNIST files of Debian's dataset-fashion-mnist are not installed",
)


def _truncated_real_data_job(folder: Path):
    """data.root holding the real Fashion-MNIST files, train-images cut in half, then `distmnist train`."""
    raw = folder / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_NAMES:
        content = gzip.decompress((FASHION / f"{name}.gz").read_bytes())
        if name == "train-images-idx3-ubyte":
            content = content[: len(content) // 2]
        (raw / name).write_bytes(content)
    return run(
        [
            *DISTMNIST,
            "train",
            "-c",
            "smoke",
            "data.name=fashion-mnist",
            f"data.root={folder / 'data'}",
            "data.download=false",
            f"run.dir={folder / 'run'}",
        ],
        cwd=folder,
    )


def _smoke_job(folder: Path):
    """`python -m distmnist.ddp -c smoke`, then `python -m distmnist.evaluate` on its model.pt."""
    train = run([*DDP, "-c", "smoke", f"run.dir={folder / 'run'}"], cwd=folder)
    if train.returncode != 0:
        return train, None
    evaluate = run([*EVALUATE, "--model", str(folder / "run" / "model.pt"), "-c", "smoke"], cwd=folder)
    return train, evaluate


JOBS = {
    **{name: _error_job(name) for name in CASES},
    "truncated-real-data": _truncated_real_data_job,
    "smoke": _smoke_job,
}


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    """Run the jobs of the selected tests of this module, a few at a time: {job: (folder, result)}.

    A test names its job through its `job` parameter; deselected tests (e.g. `-m "not slow"`) start nothing.
    """
    wanted = []
    for item in request.session.items:
        job = getattr(item, "callspec", None) and item.callspec.params.get("job")
        if item.module is request.module and job in JOBS and job not in wanted:
            wanted.append(job)
    wanted.sort(key=lambda job: job in CASES)  # the long chains first: they bound the wall time
    folders = {job: tmp_path_factory.mktemp(job) for job in wanted}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {job: pool.submit(JOBS[job], folders[job]) for job in wanted}
        return {job: (folders[job], futures[job].result()) for job in wanted}


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("job", CASES)
def test_bad_input_is_one_line_exit_2(cli, job):
    folder, result = cli[job]
    case = CASES[job]
    assert_one_line_error(result, *(_fill(t, folder) for t in case.expected))
    if case.training:
        assert not (folder / "run").exists(), f"{job}: a failed start left the run directory {folder / 'run'}"
        assert not (folder / "runs").exists()
    if job.startswith("prepare-"):
        assert not (folder / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("job", ["truncated-real-data"])
def test_truncated_idx_file_in_data_root(cli, job):
    folder, result = cli[job]
    assert_one_line_error(result, "train-images-idx3-ubyte")
    assert not (folder / "run").exists(), f"a failed start left the run directory {folder / 'run'}"


# -------------------------------------------------------------------------------------------- positive
METRIC_KEYS = {
    "strategy",
    "world_size",
    "epochs",
    "global_step",
    "val_acc",
    "val_loss",
    "train_samples_per_sec",
    "wall_s",
}


def smoke_outputs(cli, job):
    folder, (train, evaluate) = cli[job]
    assert train.returncode == 0, train.stderr
    assert "Traceback" not in train.stderr
    return folder / "run", evaluate


@pytest.mark.slow
@pytest.mark.parametrize("job", ["smoke"])
def test_smoke_training_writes_the_run_dir(cli, job):
    run_dir, _ = smoke_outputs(cli, job)
    for name in ("model.pt", "metrics.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["strategy"] == "ddp"
    assert metrics["world_size"] == 1
    assert metrics["epochs"] == 2
    assert metrics["global_step"] == 2 * 2048 // 32  # smoke: 2048 samples, batch 32, 2 epochs, one process
    assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["val_loss"] > 0
    assert metrics["train_samples_per_sec"] > 0 and metrics["wall_s"] > 0
    text = (run_dir / "config.yaml").read_text()
    assert text.startswith("# distmnist run: strategy=ddp world_size=1")
    saved = yaml.safe_load(text)
    assert saved["data"]["name"] == "synthetic"
    assert saved["run"]["dir"] == str(run_dir)
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard event file in the run dir"
    from distmnist.core.model import hidden_from_state_dict

    assert hidden_from_state_dict(torch.load(run_dir / "model.pt", weights_only=True)) == [128, 128]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["smoke"])
def test_smoke_tensorboard_tags(cli, job):
    run_dir, _ = smoke_outputs(cli, job)
    from distmnist.core.tblog import read_scalars

    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "lr", "train/acc", "val/loss", "val/acc", "perf/samples_per_sec"):
        assert tag in scalars, tag
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last_step, last_acc = scalars["val/acc"][-1]
    assert last_step == metrics["global_step"]
    assert last_acc == pytest.approx(metrics["val_acc"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["smoke"])
def test_evaluate_reproduces_the_final_val_acc(cli, job):
    run_dir, result = smoke_outputs(cli, job)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    printed = re.search(r"val_acc ([0-9.]+)", result.stdout)
    assert printed, result.stdout
    assert float(printed.group(1)) == pytest.approx(metrics["val_acc"], abs=1e-6)
    out = json.loads((run_dir / "eval.json").read_text())
    assert out["val_samples"] == 500
    assert out["val_acc"] == pytest.approx(metrics["val_acc"], abs=1e-6)
    assert out["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["smoke"])
def test_run_config_yaml_loads_back_as_a_config(cli, job):
    """A resume of another config is told to use the run's own config.yaml (rundir.check_checkpoint)."""
    run_dir, _ = smoke_outputs(cli, job)
    from distmnist.core.config import load_config

    assert load_config(run_dir / "config.yaml") == load_config("smoke", [f"run.dir={run_dir}"])


def test_every_bench_option_with_a_default_says_it_in_help():
    """`distmnist bench --help` shows what each option is when it is not given."""
    from distmnist.tools.bench import build_parser

    for action in build_parser()._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert "default" in (action.help or ""), action.option_strings
