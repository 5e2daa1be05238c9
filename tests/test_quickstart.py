"""The README's Quick start, run top to bottom in one fresh folder: every line exits 0, each command gets a run
dir of its own (none is refused as "another config"), and running a line again finds its own run.

What is changed, and why: every line gets the same small-size overrides (seconds, not minutes, on 2 cores);
the MNIST lines train on the synthetic set (MNIST cannot be downloaded here; the offline path has its own tests
in test_identity.py); `torchrun` is `python -m torch.distributed.run --standalone` (a free port: tests may run
beside other jobs); `distmnist` is this interpreter's `python -m distmnist`; the `sbatch` line needs the SLURM
cluster and is covered by tests/test_slurm.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from procs import REPO, child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = ["data.train_samples=512", "data.test_samples=200", "train.epochs=1"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def quick_start_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("Train on MNIST", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def runnable(line: str) -> list[str] | None:
    words = shlex.split(line)
    if words[0] == "sbatch":
        return None
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    elif words[0] == "distmnist":
        words = [sys.executable, "-m", "distmnist", *words[1:]]
    elif words[0] == "python":
        words = [sys.executable, *words[1:]]
    elif words[0].startswith("launch/"):
        words = [str(REPO / words[0]), *words[1:]]
    config = words[words.index("-c") + 1] if "-c" in words else "default"
    data = [] if config == "smoke" or (config == "fashion" and FASHION.is_dir()) else ["data.name=synthetic"]
    return [*words, *SMALL, *data]


def test_the_lines_are_what_the_readme_shows():
    lines = quick_start_lines()
    assert len(lines) >= 5 and any(line.startswith("torchrun") for line in lines), lines
    assert sum(runnable(line) is not None for line in lines) >= 5


def test_quick_start_top_to_bottom_every_line_exits_0_in_a_run_dir_of_its_own(tmp_path):
    commands = [c for c in map(runnable, quick_start_lines()) if c is not None]
    seen: list[Path] = []
    for cmd in commands:
        proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{shlex.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
        dirs = sorted(p.parent for p in (tmp_path / "runs").glob("*/metrics.json"))
        new = [d for d in dirs if d not in seen]
        assert len(new) == 1, f"{shlex.join(cmd)} wrote {new}, had {seen}"  # a run dir of its own
        seen.append(new[0])
        strategy = re.search(r"(ddp|fabric|trainer)", shlex.join(cmd[:8])).group(1)
        assert new[0].name.startswith(f"{strategy}-"), new[0]
    # the same line again finds its own run: nothing to train, the same dir, exit 0
    again = subprocess.run(commands[-1], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{seen[-1].relative_to(tmp_path)} already holds 1 epoch" in again.stdout + again.stderr
    assert sorted(p.parent for p in (tmp_path / "runs").glob("*/metrics.json")) == sorted(seen)


def test_hints_of_a_finished_run_lead_to_commands_that_work(tmp_path):
    """A finished constant-schedule run: the hint's train.epochs continues it in the same dir; the run's own
    config.yaml reruns it with its own strategy (no --strategy needed)."""

    def distmnist(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "distmnist", *args], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{args}\n{proc.stderr[-3000:]}"
        return proc

    distmnist("train", "--strategy", "fabric", "-c", "smoke", *SMALL)
    (run_dir,) = (tmp_path / "runs").iterdir()  # runs/fabric-smoke-<digest of the SMALL changes>
    again = distmnist("train", "--strategy", "fabric", "-c", "smoke", *SMALL)
    hint = re.search(r"already holds 1 epoch; (train\.epochs=\d+) or more continues it", again.stdout + again.stderr)
    assert hint, again.stdout + again.stderr
    more = distmnist("train", "--strategy", "fabric", "-c", "smoke", *SMALL, hint.group(1))
    assert "resuming from" in more.stdout + more.stderr
    assert list((tmp_path / "runs").iterdir()) == [run_dir]
    assert '"epochs": 2' in (run_dir / "metrics.json").read_text()
    rerun = distmnist("train", "-c", str(run_dir / "config.yaml"))  # fabric, from the file's first line
    assert "already holds 2 epochs" in rerun.stdout + rerun.stderr
    assert list((tmp_path / "runs").iterdir()) == [run_dir]
