"""One line per mistake, not one per process, under the launchers (real torchrun, 2 CPU processes).

A mistake every process meets alike (the command line, the config, the run dir) is printed by local rank 0 alone;
the other workers wait until torchrun stops them, so that torchrun cannot stop the printer first. Plain torchrun
then adds its own traceback and failure summary and exits 1 -- its "Root Cause" shows the same message (read from
the worker's error file) instead of "To enable traceback see ...". distmnist.tools.torchrun (what
launch/single_node.sh runs) leaves exactly the one line and exits 2.

Slow only for the CI budget: no training, but each launch spends seconds starting torch in 3 processes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from procs import REPO, child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BAD_LR = "config key 'optim.lr' must be a finite number greater than zero, got -1.0"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WRAPPER = [sys.executable, "-m", "distmnist.tools.torchrun", "--standalone", "--nproc_per_node=2"]
FOREIGN = "belongs to a fabric run: continue it with `python -m distmnist.fabric`"


def foreign_run_dir(tmp: Path) -> Path:
    """A run dir that a fabric run wrote (its owner line is all that is read before refusing)."""
    run_dir = tmp / "fabric-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("# distmnist run: strategy=fabric world_size=2 device=cpu\n")
    return run_dir


CASES = {
    "torchrun-bad-config": lambda tmp: [*TORCHRUN, "-m", "distmnist.ddp", "-c", "smoke", "optim.lr=-1"],
    "wrapper-bad-config": lambda tmp: [*WRAPPER, "-m", "distmnist.ddp", "-c", "smoke", "optim.lr=-1"],
    "wrapper-bad-argument": lambda tmp: [*WRAPPER, "-m", "distmnist.trainer", "-c", "smoke", "--bogus"],
    "wrapper-distmnist-train": lambda tmp: [*WRAPPER, "-m", "distmnist", "train", "-c", "smoke", "optim.lr=-1"],
    "single-node-foreign-run-dir": lambda tmp: [REPO / "launch" / "single_node.sh", "--nproc", "2", "--", "-c",
                                                "smoke", f"run.dir={foreign_run_dir(tmp)}"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    def launch(name: str) -> subprocess.CompletedProcess:
        tmp = tmp_path_factory.mktemp(name)
        cmd = [str(part) for part in CASES[name](tmp)]
        return subprocess.run(["timeout", "200", *cmd], cwd=tmp, env=child_env(), capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        return dict(zip(CASES, pool.map(launch, CASES), strict=True))


def said(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


def test_plain_torchrun_prints_the_line_once_and_its_summary_names_it(results):
    proc = results["torchrun-bad-config"]
    assert proc.returncode == 1, proc.stderr  # torchrun's own code for any failed worker
    assert said(proc.stderr, "distmnist: error:") == [f"distmnist: error: {BAD_LR}"], proc.stderr
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)", root) and re.search(r"exitcode\s+: 2 ", root), root
    assert f"traceback : {BAD_LR}" in root, root  # from rank 0's error file, not "To enable traceback see"
    assert "To enable traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name,line", [
    ("wrapper-bad-config", f"distmnist: error: {BAD_LR}"),
    ("wrapper-distmnist-train", f"distmnist: error: {BAD_LR}"),
    ("wrapper-bad-argument", "python -m distmnist.trainer: error: unrecognized arguments: --bogus "
                             "(see python -m distmnist.trainer --help)"),
])
def test_distmnist_torchrun_leaves_one_line_and_exit_2(results, name, line):
    proc = results[name]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [line], proc.stderr


def test_single_node_refused_run_dir_is_one_line_exit_2(results):
    """Not caught by the script's check before torchrun (the arguments are fine): refused by the processes."""
    proc = results["single-node-foreign-run-dir"]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("single_node.sh: strategy=ddp processes=2"), lines
    assert len(lines) == 2 and lines[1].startswith("distmnist: error: run.dir ") and FOREIGN in lines[1], lines
