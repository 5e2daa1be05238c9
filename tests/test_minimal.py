"""The minimal copies in examples/minimal/ on 2 gloo ranks on real Fashion-MNIST reach the accuracy of the full
strategy with the same recipe (1 epoch on the first 20,000 training samples; tolerance 0.02: they share the data
order, the initial weights and the arithmetic, and measured equal to 4 digits)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from procs import REPO, child_env, ok, run_module, torchrun

pytestmark = pytest.mark.slow

SOURCE = "/usr/share/datasets/fashion-mnist"
EXAMPLES = REPO / "examples" / "minimal"
TRAIN_SAMPLES = 20000
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimal") / "data"
    ok(run_module("distmnist", "data", "prepare", "--name", "fashion-mnist", "--from", SOURCE, "--root", str(root),
                  cwd=REPO))
    return root


@pytest.fixture(scope="module")
def full_val_acc(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    ok(torchrun("distmnist.ddp", "-c", "fashion", f"data.root={data_root}", "train.epochs=1",
                f"data.train_samples={TRAIN_SAMPLES}", f"run.dir={run_dir}", "--quiet", cwd=REPO))
    return json.loads((run_dir / "metrics.json").read_text())["val_acc"]


@pytest.mark.parametrize("name", ["ddp", "fabric", "trainer"])
def test_minimal_copy_reaches_the_full_strategys_accuracy(name, data_root, full_val_acc, tmp_path):
    proc = ok(torchrun(str(EXAMPLES / f"{name}.py"), "--data-root", str(data_root), "--dataset", "fashion-mnist",
                       "--epochs", "1", "--train-samples", str(TRAIN_SAMPLES), "--workers", "0", cwd=tmp_path))
    last = proc.stdout.strip().splitlines()[-1]
    match = re.search(r"val_acc=([0-9.]+)", last)
    assert match, f"last line has no val_acc=: {last!r}"
    assert abs(float(match.group(1)) - full_val_acc) <= TOLERANCE, (name, match.group(1), full_val_acc)
    # the copy writes nothing where it runs
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


def test_minimal_copies_are_lint_clean_and_import_nothing_of_distmnist():
    for path in EXAMPLES.glob("*.py"):
        assert not re.search(r"^\s*(import|from) distmnist", path.read_text(), re.M), path
        assert len(path.read_text().splitlines()) <= 130, path
    ok(subprocess.run([sys.executable, "-m", "ruff", "check", str(EXAMPLES)], capture_output=True, text=True,
                      timeout=60, env=child_env()))


def test_minimal_copy_without_data_exits_2_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ddp.py"), "--data-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=child_env())
    assert proc.returncode == 2, proc.stderr
    assert "MNIST/raw does not exist" in proc.stderr.strip().splitlines()[-1]
