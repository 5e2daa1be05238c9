"""Data identity: Fashion-MNIST offered as MNIST is refused (one line, exit 2); offline, the cause and fixes."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from procs import run_module

FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# real data (the marker's meaning): the files of Debian's dataset-fashion-mnist, a training start among them
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")]


def fashion_copy(folder: Path, gz: bool) -> Path:
    folder.mkdir(parents=True)
    for n in NAMES:
        if gz:
            shutil.copy(FASHION / f"{n}.gz", folder / f"{n}.gz")
        else:
            with gzip.open(FASHION / f"{n}.gz") as src, open(folder / n, "wb") as out:
                shutil.copyfileobj(src, out)
    return folder


def prepare(tmp_path: Path, name: str, source: Path):
    return run_module("distmnist.tools.cli", "data", "prepare", "--name", name, "--from", str(source),
                      "--root", str(tmp_path / "root"), cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "uncompressed"])
def test_fashion_offered_as_mnist_is_refused(tmp_path, gz):
    proc = prepare(tmp_path, "mnist", fashion_copy(tmp_path / "src", gz))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "are Fashion-MNIST, not MNIST" in lines[0], proc.stderr
    assert not (tmp_path / "root" / "MNIST" / "raw" / NAMES[0]).exists()


def test_real_fashion_is_accepted_as_fashion(tmp_path):
    proc = prepare(tmp_path, "fashion-mnist", FASHION)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr


def test_fashion_put_by_hand_where_mnist_goes_is_refused_at_training_start(tmp_path):
    """Files copied into data/MNIST/raw without `data prepare` (or by an older version): the first load checks
    them too, one line from rank 0 of 2, exit 2, before any training (launched by distmnist.tools.torchrun, which
    passes the workers' code and line on)."""
    fashion_copy(tmp_path / "data" / "MNIST" / "raw", gz=False)
    proc = run_module("distmnist.tools.torchrun", "--standalone", "--nproc_per_node=2", "-m", "distmnist.ddp", "-c",
                    "smoke", "data.name=mnist", f"data.root={tmp_path / 'data'}",
                    "data.download=false", f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("distmnist: error:")]
    assert len(ours) == 1 and "are Fashion-MNIST, not MNIST" in ours[0], proc.stderr
    assert "data.name=fashion-mnist" in ours[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_offline_download_names_its_cause_and_the_fixes(tmp_path):
    proc = run_module("distmnist.ddp", "data.name=mnist", f"data.root={tmp_path / 'data'}", "train.epochs=1",
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert "download failed (" in line and ("Name or service not known" in line or "resolution" in line), line
    assert "-c fashion" in line and str(FASHION) in line and "distmnist data prepare" in line, line
    assert "-c smoke" in line, line
