"""A finished run exits 0 even when the interpreter's own teardown would abort it.

After an FSDP run, torch's DTensor caches keep the device mesh and its gloo process groups (and their threads)
alive past ``destroy_process_group``; the destructors that then run during interpreter teardown have aborted a
finished run in CI (``terminate called without an active exception``, SIGABRT, torchrun exit 1). The entry points
end with ``core.errors.exit_process`` (atexit handlers, flush, ``os._exit``), so that teardown never runs.

These tests make the teardown abort for certain: a ``sitecustomize`` on the workers' PYTHONPATH holds an object
whose finalizer calls ``os.abort()``. Without exit_process every such run dies by SIGABRT after its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import child_env, ok, run_module, teardown_aborts, torchrun

pytestmark = pytest.mark.timeout(300)

@pytest.fixture(scope="module")
def aborting(tmp_path_factory) -> dict[str, str]:
    return teardown_aborts(tmp_path_factory.mktemp("site"))


def test_the_probe_aborts_a_plain_interpreter(aborting, tmp_path):
    """The control: without exit_process, a process carrying the probe dies by SIGABRT at its end."""
    proc = subprocess.run(
        [sys.executable, "-c", "print('last line')"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=child_env(DISTMNIST_TEST_ABORT_AT_TEARDOWN="1", **aborting),
    )
    assert proc.returncode == -6 and "last line" in proc.stdout and "teardown-abort" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fabric", "trainer"])
def test_fsdp_run_on_two_ranks_exits_0_without_the_interpreter_teardown(strategy, aborting, tmp_path):
    run_dir = tmp_path / "run"
    proc = ok(torchrun(
        f"distmnist.{strategy}", "-c", "smoke", "data.train_samples=512", "train.epochs=1", "dist.timeout_s=30",
        "train.parallel=fsdp", f"run.dir={run_dir}", cwd=tmp_path, **aborting,
    ))
    assert "teardown-abort" not in proc.stderr
    assert f"[{strategy}] done:" in proc.stdout  # everything written before the exit
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
    assert (run_dir / "model.pt").is_file()


def test_console_script_exits_without_the_interpreter_teardown(aborting, tmp_path):
    """`distmnist` (the console script, tools/cli.py:entry), in one process."""
    proc = run_module(
        "distmnist.tools.cli", "train", "--strategy", "fabric", "-c", "smoke", "data.train_samples=256",
        "train.epochs=1", f"run.dir={tmp_path / 'run'}", cwd=tmp_path, DISTMNIST_TEST_ABORT_AT_TEARDOWN="1",
        **aborting,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teardown-abort" not in proc.stderr and "[fabric] done:" in proc.stdout
    assert Path(tmp_path / "run" / "metrics.json").is_file()
