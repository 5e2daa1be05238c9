"""Preparing data.root safely: runs that start together, a killed preparation, a preparation that takes too long,
and a failure reported once -- real processes, real flock, the real Fashion-MNIST files of Debian's package."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from procs import child_env, ok, same_weights, torchrun, weights

from distmnist.core import data
from distmnist.core.data import RAW_FILES, preparation
from distmnist.core.errors import DistMnistError

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not all((FASHION / f"{n}.gz").is_file() for n in RAW_FILES),
    reason="Fashion-MNIST files of Debian's dataset-fashion-mnist are not installed",
)
# a short real run on Fashion-MNIST: what matters here is getting the files, not the training
FASHION_RUN = ("-c", "smoke", "data.name=fashion-mnist", "data.train_samples=1000", "data.test_samples=500",
               "train.epochs=1", "-q")


def raw_of(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def assert_intact(root: Path) -> None:
    """The four files, byte for byte those of the source; no temporary file or download folder left."""
    raw = raw_of(root)
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_FILES)
    assert sorted(p.name for p in raw.parent.iterdir()) == [data.PREPARE_LOCK, "raw"]
    for name in RAW_FILES:
        assert (raw / name).read_bytes() == gzip.decompress((FASHION / f"{name}.gz").read_bytes()), name


def start(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (a waiter opens the lock file, then polls its flock)."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def distmnist_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distmnist:")]


# ------------------------------------------------------------------------------------------- in one process
def test_a_held_lock_times_out_with_one_line_naming_root_lock_and_holder(tmp_path):
    with data.PrepareLock("fashion-mnist", tmp_path, 60) as holder:
        assert holder.held
        start_t = time.monotonic()
        with pytest.raises(DistMnistError) as info, data.PrepareLock("fashion-mnist", tmp_path, 0.5):
            pass
        waited = time.monotonic() - start_t
    message = str(info.value)
    assert 0.5 <= waited < 5, waited
    assert "slow or stuck" in message and "data.prepare_timeout_s" in message
    assert str(tmp_path) in message and str(holder.path) in message
    assert f"pid {os.getpid()} on " in message
    with data.PrepareLock("fashion-mnist", tmp_path, 0.5) as again:  # released: the next one gets it at once
        assert again.held


def test_a_stuck_download_is_cut_at_the_deadline(tmp_path):
    with data.PrepareLock("mnist", tmp_path, 1.0) as lock:
        start_t = time.monotonic()
        with pytest.raises(DistMnistError) as info:
            preparation._within(start_t + 1.0, "downloading", lambda: time.sleep(30), lock)
        assert 1.0 <= time.monotonic() - start_t < 5
        assert lock.keep  # the stuck thread may still write: the lock stays held until the process exits
    lock.keep = False
    os.close(lock.fd)
    message = str(info.value)
    assert message.startswith(f"downloading mnist into {tmp_path} is slow or stuck")
    assert "data.prepare_timeout_s=1 s" in message and "distmnist data prepare --name mnist" in message


# ---------------------------------------------------------------------------------------- real processes
# The four scenarios run at the same time (a thread each, like test_cli_errors' jobs): each is mostly process
# start-up, and the CI budget is wall time. {name: what the test checks}.
def _concurrent_first_runs(folder: Path):
    """Two `python -m distmnist.ddp` on one empty data.root. The test holds the lock until both are waiting on
    it, so that they start their preparation at the same moment."""
    root = folder / "data"
    with data.PrepareLock("fashion-mnist", root, 5) as held:
        runs = [start("distmnist.ddp", *FASHION_RUN, f"data.root={root}", f"run.dir={folder / f'run{i}'}",
                      cwd=folder) for i in (0, 1)]
        deadline = time.monotonic() + 240
        while not all(has_open(p.pid, held.path) for p in runs):
            if any(p.poll() is not None for p in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        waiting = [has_open(p.pid, held.path) for p in runs]
        time.sleep(0.5)
        prepared_while_held = raw_of(root).exists()
    results = []
    for p in runs:
        out, err = p.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return root, waiting, prepared_while_held, results


def _killed_preparation(folder: Path):
    """`distmnist data prepare` killed with SIGKILL while it writes a file, then a run on that data.root."""
    root = folder / "data"
    for _ in range(3):  # the copy lasts ~0.5 s; should it ever finish before it is caught, try again
        prep = start("distmnist.tools.cli", "data", "prepare", "--name", "fashion-mnist", "--from", str(FASHION),
                     "--root", str(root), cwd=folder)
        while prep.poll() is None and not list(raw_of(root).glob(".*.tmp")):
            time.sleep(0.002)
        prep.send_signal(signal.SIGKILL)
        prep.communicate(timeout=60)
        if prep.returncode == -signal.SIGKILL:
            break
        shutil.rmtree(root, ignore_errors=True)
    left = {"tmp": list(raw_of(root).glob(".*.tmp")), "lock": data.lock_path("fashion-mnist", root).read_text()}
    run = subprocess.run([sys.executable, "-m", "distmnist.ddp", *FASHION_RUN, f"data.root={root}",
                          f"run.dir={folder / 'run'}", "data.prepare_timeout_s=60"],
                         cwd=folder, env=child_env(), capture_output=True, text=True, timeout=240)
    return root, prep, left, run


def _slow_preparation(folder: Path):
    """Another process (this one) holds the lock; 2 ranks with data.prepare_timeout_s=3 and dist.timeout_s=600."""
    root = folder / "data"
    with data.PrepareLock("fashion-mnist", root, 5) as held:
        start_t = time.monotonic()
        result = torchrun("distmnist.ddp", *FASHION_RUN, f"data.root={root}", f"run.dir={folder / 'run'}",
                          "data.prepare_timeout_s=3", "dist.timeout_s=600", cwd=folder, timeout=240)
        elapsed = time.monotonic() - start_t
    return root, held.path, elapsed, result


def _failed_download(folder: Path):
    """MNIST missing, data.download=false (what no internet comes to), 2 ranks."""
    root = folder / "empty"
    return root, torchrun("distmnist.ddp", "-c", "smoke", "data.name=mnist", "data.download=false",
                          f"data.root={root}", f"run.dir={folder / 'run'}", cwd=folder, timeout=240)


SCENARIOS = {"concurrent": _concurrent_first_runs, "killed": _killed_preparation, "slow": _slow_preparation,
             "failed": _failed_download}


@pytest.fixture(scope="module")
def scenario(request, tmp_path_factory):
    """Run the scenarios the selected tests name (their `job` parameter), all at once: {name: (folder, result)}."""
    wanted = []
    for item in request.session.items:
        job = getattr(item, "callspec", None) and item.callspec.params.get("job")
        if item.module is request.module and job in SCENARIOS and job not in wanted:
            wanted.append(job)
    folders = {job: tmp_path_factory.mktemp(job) for job in wanted}
    with ThreadPoolExecutor(max_workers=len(wanted) or 1) as pool:
        futures = {job: pool.submit(SCENARIOS[job], folders[job]) for job in wanted}
        return {job: (folders[job], futures[job].result()) for job in wanted}


@pytest.mark.timeout(600)  # the first of these runs all the scenarios
@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("job", ["concurrent"])
def test_two_concurrent_first_runs_on_one_empty_root(scenario, job):
    """Both succeed, the files are intact (the source's bytes, no temporary file left), the same weights."""
    folder, (root, waiting, prepared_while_held, results) = scenario[job]
    assert waiting == [True, True], [r.stderr[-2000:] for r in results]  # both were waiting on the lock
    assert not prepared_while_held, "a run prepared the files while another process held the lock"
    for r in results:
        ok(r)
    assert_intact(root)
    assert same_weights(weights(folder / "run0"), weights(folder / "run1"))


@pytest.mark.timeout(600)  # the first of these runs all the scenarios
@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("job", ["killed"])
def test_a_run_recovers_from_a_killed_preparation(scenario, job):
    """The killed preparation's flock died with it and a half-written temporary file stayed; the next run does
    not wait for the dead holder (it would fail after data.prepare_timeout_s=60), mistakes nothing for good data
    and removes the leftovers."""
    _, (root, prep, left, run) = scenario[job]
    assert prep.returncode == -signal.SIGKILL, "the preparation was never caught mid-copy"
    assert left["tmp"], "no temporary file left by the killed preparation"
    assert f"pid {prep.pid} " in left["lock"]  # the lock file names the dead holder
    ok(run)
    assert_intact(root)


@pytest.mark.timeout(600)  # the first of these runs all the scenarios
@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("job", ["slow"])
def test_a_slow_preparation_is_reported_once_as_slow_on_2_ranks(scenario, job):
    """One line that says the preparation is slow or stuck (not that a rank died), naming the root, the lock and
    its holder; after data.prepare_timeout_s, long before dist.timeout_s=600; exit 2 on the workers."""
    folder, (root, lock, elapsed, result) = scenario[job]
    report = f"exit {result.returncode}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode != 0, report
    lines = distmnist_lines(result.stderr)
    assert len(lines) == 1, report
    for text in ("slow or stuck", "data.prepare_timeout_s", str(root), str(lock), f"pid {os.getpid()} on "):
        assert text in lines[0], f"{text!r} not in the line\n{report}"
    assert "exitcode  : 2" in result.stderr, report  # torchrun's summary: the workers exited with 2
    assert 3 <= elapsed < 120, elapsed
    assert not (folder / "run").exists()
    assert not raw_of(root).exists()


@pytest.mark.timeout(600)  # the first of these runs all the scenarios
@pytest.mark.slow
@pytest.mark.parametrize("job", ["failed"])
def test_a_failed_download_is_reported_once_on_2_ranks(scenario, job):
    """One line with the fix, exit 2 on both ranks -- not one line per rank."""
    folder, (root, result) = scenario[job]
    report = f"exit {result.returncode}\n--- stderr\n{result.stderr[-4000:]}"
    lines = distmnist_lines(result.stderr)
    assert len(lines) == 1, report
    for text in ("data.download=false", str(root / "MNIST" / "raw"), "distmnist data prepare --name mnist"):
        assert text in lines[0], f"{text!r} not in the line\n{report}"
    assert "exitcode  : 2" in result.stderr and "exitcode  : 1 " not in result.stderr, report
    assert not (folder / "run").exists()
