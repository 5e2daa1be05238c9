"""Faults, for real: SIGTERM/SIGUSR1 mid-epoch, kill -9 of a rank under torchrun --max-restarts, a stalled
rank, damaged and foreign checkpoints. Nothing is lost and the final weights equal an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import (
    STRATEGIES,
    child_env,
    free_port,
    metrics,
    ok,
    old_record,
    position,
    run_module,
    same_weights,
    teardown_aborts,
    torchrun,
    torchrun_cmd,
    wait_for_checkpoint,
    weights,
)

from distmnist.core import checkpoint

pytestmark = [pytest.mark.timeout(600)]
slow = pytest.mark.slow

# 2 ranks x 32: 188 steps per epoch; a checkpoint every 20 steps gives the test a moment to strike mid-epoch
FAULT = ("-c", "smoke", "data.train_samples=12000", "train.epochs=2", "checkpoint.every_n_steps=20",
         "dist.timeout_s=30")
STEPS_PER_EPOCH = 188


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run. The three strategies give bit-identical weights (test_distributed), so raw DDP's
    run is the reference for all of them."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(torchrun("distmnist.ddp", *FAULT, f"run.dir={tmp / 'run'}", cwd=tmp))
    return tmp / "run"


def start(tmp: Path, strategy: str, run_dir: Path, extra: tuple = (), late_restart: bool = False) -> subprocess.Popen:
    """torchrun's workers run `-m distmnist.<strategy>`; with late_restart through tests/late_start.py, so that
    rank 1 of a restarted attempt arrives 3 s after rank 0."""
    log = open(tmp / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = torchrun_cmd(f"distmnist.{strategy}", *FAULT, f"run.dir={run_dir}", extra=extra)
    if late_restart:
        at = cmd.index(f"distmnist.{strategy}")
        cmd[at - 1:at] = [str(Path(__file__).with_name("late_start.py"))]  # `-m MODULE` -> `late_start.py MODULE`
    return subprocess.Popen(cmd, cwd=tmp, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True)


def log_of(tmp: Path, run_dir: Path) -> str:
    return (tmp / f"{run_dir.name}.log").read_text()


def worker_env(pid: int) -> dict[str, str]:
    """The environment torchrun gave a worker process ({} once it is gone)."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def worker_pids(agent: subprocess.Popen, count: int = 2) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from their environment)."""
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    ranks = {int(env["RANK"]): pid for pid in map(int, out) if "RANK" in (env := worker_env(pid))}
    assert len(ranks) == count, ranks
    return ranks


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert same_weights(weights(run_dir), weights(reference))
    got, ref = metrics(run_dir), metrics(reference)
    assert [h["epoch"] for h in got["history"]] == [1, 2]
    assert got["val_acc"] == ref["val_acc"] and got["val_loss"] == ref["val_loss"]
    for mine, theirs in zip(got["history"], ref["history"], strict=True):
        # the interrupted epoch's training loss is summed in another order: equal to float64 rounding
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-12)
        assert mine["train_acc"] == theirs["train_acc"]


SIGNALS = {"ddp": signal.SIGTERM, "trainer": signal.SIGUSR1, "fabric": signal.SIGTERM}


@slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_signal_mid_epoch_checkpoints_every_rank_then_resumes_exactly(reference, tmp_path, strategy):
    """A signal that reaches one rank only (rank 1: a rank-0-only check would miss it): the ranks agree, each stops
    at the same step, one checkpoint is written, each exits 75; the same command then finishes the run as if
    nothing happened. (SLURM signals every process; the agreement must not rely on that.)"""
    run_dir = tmp_path / "run"
    proc = start(tmp_path, strategy, run_dir)
    try:
        wait_for_checkpoint(proc, run_dir)
        os.kill(worker_pids(proc)[1], SIGNALS[strategy])
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = log_of(tmp_path, run_dir)
    assert proc.returncode != 0
    assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", out)) == 2, out[-3000:]  # both ranks: the distinct code
    stopped = re.findall(rf"distmnist: stopped by {SIGNALS[strategy].name} at step (\d+)", out)
    assert len(stopped) == 1, out[-3000:]  # rank 0 alone says it
    newest = checkpoint.listing(run_dir / "checkpoints")[0]
    state = position(newest)
    assert state.global_step == int(stopped[0])
    assert 0 < state.step_in_epoch < STEPS_PER_EPOCH, state  # mid-epoch
    assert not (run_dir / "model.pt").exists()

    again = ok(torchrun(f"distmnist.{strategy}", *FAULT, f"run.dir={run_dir}", cwd=tmp_path))
    assert "resuming from" in again.stdout
    assert_same_run(run_dir, reference)


@slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_9_of_rank_1_restarts_and_ends_with_the_uninterrupted_weights(reference, tmp_path, strategy):
    """Plain `torchrun --standalone --max-restarts=1`: the restarted group shares torchrun's store with the dead
    one's keys (pytorch/pytorch#135712); core/startup.py gives each start its own key, so it connects and resumes.
    The restarted rank 1 arrives 3 s after rank 0: without that key, rank 0 reads the dead rank 1's gloo address
    and fails (Connection refused) every time, not only when the two happen to start in that order."""
    run_dir = tmp_path / "run"
    proc = start(tmp_path, strategy, run_dir, extra=("--max-restarts=1",), late_restart=True)
    try:
        wait_for_checkpoint(proc, run_dir)
        pids = worker_pids(proc)
        # torchrun's default path: its rendezvous store, shared with the workers and kept for the restart
        env = worker_env(pids[1])
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True" and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        while Path(f"/proc/{pids[0]}").exists() and time.monotonic() - killed < 60:
            time.sleep(0.05)
        survivor_s = time.monotonic() - killed
        proc.wait(timeout=300)
    finally:
        proc.kill()
    out = log_of(tmp_path, run_dir)
    # rank 0 is gone long before dist.timeout_s (30 s): its peer's death is noticed, not waited out
    assert survivor_s < 15, f"rank 0 outlived its killed peer by {survivor_s:.1f} s"
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from" in out
    assert_same_run(run_dir, reference)


@slow
def test_kill_9_on_one_of_two_torchrun_nodes_restarts_both_under_one_key(reference, tmp_path):
    """Two torchrun agents (--nnodes=2, one process each, one c10d rendezvous, --max-restarts=1), the worker of one
    killed: its agent counts a restart, the other restarts its worker because a node waits, often without counting
    one -- TORCHELASTIC_RESTART_COUNT then differs between the ranks of one attempt and could not name it; the key
    rank 0 hands out does. Both agents end with 0 and the weights of the uninterrupted run."""
    run_dir, port = tmp_path / "run", free_port()
    cmd = torchrun_cmd("distmnist.ddp", *FAULT, f"run.dir={run_dir}", nproc=1, extra=(
        "--max-restarts=1", "--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t"))
    cmd.remove("--standalone")
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]  # noqa: SIM115 - closed below
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
              for log in logs]
    restart_counts: dict[int, str] = {}  # rank -> TORCHELASTIC_RESTART_COUNT of the restarted workers
    try:
        wait_for_checkpoint(agents[1], run_dir)
        first = {**worker_pids(agents[0], count=1), **worker_pids(agents[1], count=1)}
        os.kill(worker_pids(agents[1], count=1).popitem()[1], signal.SIGKILL)
        deadline = time.monotonic() + 300
        while any(a.poll() is None for a in agents) and time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", ",".join(str(a.pid) for a in agents)],
                                      capture_output=True, text=True).stdout.split()
            for pid in set(map(int, children)) - set(first.values()):
                if "RANK" in (env := worker_env(pid)):
                    restart_counts.setdefault(int(env["RANK"]), env["TORCHELASTIC_RESTART_COUNT"])
            time.sleep(0.1)
    finally:
        for a in agents:
            a.kill()
            a.wait()
        for log in logs:
            log.close()
    out = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    print(f"\nTORCHELASTIC_RESTART_COUNT of the restarted ranks: {restart_counts}")
    assert [a.returncode for a in agents] == [0, 0], out[-4000:]
    assert "resuming from" in out and restart_counts, out[-4000:]
    assert_same_run(run_dir, reference)


@slow
def test_stalled_rank_fails_the_job_after_the_timeout_with_a_clear_line(tmp_path):
    """Rank 1 frozen (SIGSTOP): rank 0's next collective gives up after dist.timeout_s, says so in one line."""
    run_dir = tmp_path / "run"
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        torchrun_cmd("distmnist.ddp", *FAULT[:-1], "dist.timeout_s=5", f"run.dir={run_dir}"),
        cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    frozen = None
    try:
        wait_for_checkpoint(proc, run_dir)
        frozen = worker_pids(proc)[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        deadline = stopped_at + 90
        while "lost its peers" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        waited = time.monotonic() - stopped_at
        os.kill(frozen, signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        if frozen:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
        proc.kill()
    out = (tmp_path / "run.log").read_text()
    lines = [ln for ln in out.splitlines() if "lost its peers" in ln]
    assert lines and lines[0].startswith("distmnist: error: rank 0 lost its peers"), out[-3000:]
    assert 4 < waited < 60, waited  # the 5 s process-group timeout, not forever
    assert proc.returncode != 0


# ------------------------------------------------------------------------ damaged and foreign files
def smoke_run(tmp: Path, run_dir: Path, *overrides: str, strategy: str = "ddp") -> subprocess.CompletedProcess:
    return run_module(f"distmnist.{strategy}", "-c", "smoke", f"run.dir={run_dir}", *overrides, cwd=tmp)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch single-process run with checkpoints at steps 64 and 128."""
    tmp = tmp_path_factory.mktemp("finished")
    ok(smoke_run(tmp, tmp / "run"))
    assert [p.name for p in checkpoint.listing(tmp / "run" / "checkpoints")] == [
        "step=00000128.ckpt", "step=00000064.ckpt"]
    return tmp / "run"


@slow
def test_a_checkpoint_of_the_format_before_train_state_had_its_own_entry_resumes_exactly(tmp_path):
    """A mid-epoch checkpoint whose record has the position spliced in and the tally as a list (as written before
    TrainState became the record's "train_state" entry) resumes: same weights and epoch numbers as uninterrupted."""
    run_dir, every = tmp_path / "run", ("checkpoint.every_n_steps=40", "checkpoint.keep=5")
    ok(smoke_run(tmp_path, run_dir, *every))
    whole, done = weights(run_dir), metrics(run_dir)
    mid = run_dir / "checkpoints" / "step=00000080.ckpt"  # epoch 2, 16 of its 64 steps done
    for path in checkpoint.listing(run_dir / "checkpoints"):
        if path != mid:
            path.unlink()
    (run_dir / "model.pt").unlink()
    obj = checkpoint.read(mid)
    assert obj["distmnist"]["train_state"]["tally"]["count"] == 16 * 32
    checkpoint.atomic_torch_save({**obj, "distmnist": old_record(obj["distmnist"])}, mid)
    again = ok(smoke_run(tmp_path, run_dir, *every))
    assert "resuming from" in again.stdout and "step=00000080.ckpt" in again.stdout, again.stdout
    assert same_weights(weights(run_dir), whole)
    assert metrics(run_dir)["history"][1]["train_loss"] == done["history"][1]["train_loss"]


@slow
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(finished, tmp_path, damage):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run_dir)], check=True)
    newest = run_dir / "checkpoints" / "step=00000128.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    proc = ok(smoke_run(tmp_path, run_dir))
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("distmnist: warning")]
    assert len(warnings) == 1 and "step=00000128.ckpt" in warnings[0], proc.stderr
    assert "resuming from" in proc.stdout and "step=00000064.ckpt" in proc.stdout
    # epoch 2 was trained again from the good checkpoint: the same weights as the first time
    assert same_weights(weights(run_dir), weights(finished))
    assert position(newest).global_step == 128  # a good file again


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@slow
@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (("optim.lr=0.1",), ("optim.lr", "0.05", "0.1")),
        (("model.hidden=[64]",), ("model.hidden",)),
        (("seed=1",), ("seed",)),
        (("data.batch_size=16",), ("global batch: 32 -> 16",)),  # run.py's check of the global batch
    ],
)
def test_other_config_is_refused_and_nothing_is_overwritten(finished, overrides, words, tmp_path):
    before = snapshot(finished)
    refused(smoke_run(tmp_path, finished, *overrides), "another config", *words)
    assert snapshot(finished) == before


@slow
def test_run_dir_of_another_strategy_is_refused(finished, tmp_path):
    before = snapshot(finished)
    refused(smoke_run(tmp_path, finished, strategy="fabric"), "belongs to a ddp run")
    assert snapshot(finished) == before


@slow
def test_checkpoint_with_weights_of_another_shape_is_refused_not_loaded(finished, tmp_path):
    """Meta data that claims this config over weights that do not fit: refused by the shape check."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run_dir)], check=True)
    newest = run_dir / "checkpoints" / "step=00000128.ckpt"
    obj = torch.load(newest, weights_only=False)
    obj["model"] = {k: torch.zeros(64, 784) if k.endswith("0.weight") else v for k, v in obj["model"].items()}
    torch.save(obj, newest)
    refused(smoke_run(tmp_path, run_dir), "step=00000128.ckpt", "layer shapes")


HOSTILE = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"distmnist": {"format": "distmnist-checkpoint/1"}, "model": Payload()}, sys.argv[1])
"""


@slow
@pytest.mark.parametrize("strategy", ["ddp", "trainer", "fabric"])
def test_a_checkpoint_that_pickles_code_is_refused_and_nothing_runs(tmp_path, strategy):
    """The only checkpoint of a run dir runs a command when unpickled: refused with one line, exit 2, and the
    command never ran (the one reader that the three strategies share loads with weights_only)."""
    run_dir, marker = tmp_path / "run", tmp_path / "payload-ran"
    crafted = run_dir / "checkpoints" / "step=99999999.ckpt"
    crafted.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", HOSTILE, str(crafted), str(marker)], check=True, timeout=60)
    line = refused(smoke_run(tmp_path, run_dir, strategy=strategy), "no checkpoint", "move them out")
    assert "step=99999999.ckpt" in line
    assert not marker.exists(), "the checkpoint's payload ran"


@slow
def test_retention_keeps_the_new_checkpoint_over_a_newer_damaged_one(tmp_path):
    """checkpoint.keep=1 and a damaged file of a higher step: the checkpoint written after the resume is kept (it
    used to be deleted right after it was written), the damaged file is left as it was."""
    run_dir = tmp_path / "run"
    common = ("optim.schedule=constant", "checkpoint.keep=1")  # constant: train.epochs may grow on resume
    ok(smoke_run(tmp_path, run_dir, "train.epochs=1", *common))
    damaged = run_dir / "checkpoints" / "step=99999999.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    proc = ok(smoke_run(tmp_path, run_dir, "train.epochs=2", *common))
    assert "step=00000064.ckpt" in proc.stdout  # resumed from the good one
    assert [p.name for p in checkpoint.listing(run_dir / "checkpoints")] == ["step=99999999.ckpt", "step=00000128.ckpt"]
    assert position(run_dir / "checkpoints" / "step=00000128.ckpt").global_step == 128
    assert damaged.read_bytes() == b"not a checkpoint"


@slow
def test_sigterm_single_process_exits_75_then_resumes(tmp_path):
    """No launcher: the process itself exits with the distinct code, and through core.errors.exit_process (an
    interpreter teardown would abort it: procs.teardown_aborts)."""
    run_dir = tmp_path / "run"
    env = child_env(DISTMNIST_TEST_ABORT_AT_TEARDOWN="1", **teardown_aborts(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "distmnist.fabric", *FAULT, f"run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_checkpoint(proc, run_dir)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in err and "teardown-abort" not in err
    ok(run_module("distmnist.fabric", *FAULT, f"run.dir={run_dir}", cwd=tmp_path))
    assert metrics(run_dir)["epochs"] == 2


@pytest.mark.timeout(120)
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A write that hits the file-size limit (as a full disk would) fails with one clear line; the file that
    was there before is untouched and no temporary file is left."""
    target = tmp_path / "step=00000010.ckpt"
    target.write_bytes(b"the good old checkpoint")
    script = (
        "import resource, signal, sys, torch\n"
        "from distmnist.core import checkpoint\n"
        "from distmnist.core.errors import report_errors\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "@report_errors\n"
        "def main():\n"
        f"    checkpoint.atomic_torch_save({{'w': torch.zeros(1 << 20)}}, {str(target)!r})\n"
        "sys.exit(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr  # the package's exit code for it, through the entry points' wrapper
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("distmnist: error: cannot write") and "intact" in lines[0], proc.stderr
    assert target.read_bytes() == b"the good old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# ------------------------------------------------------------------ resume at 3 ranks: DDP's gradient buckets
def test_ddp_buckets_are_laid_out_once_before_the_first_step(tmp_path):
    """What exact resume at 3+ ranks relies on (parallel.settle_buckets): torch's DDP lays its gradient buckets out
    in definition order, then rebuilds them once after the first backward in gradient-ready order (reversed), so
    the first step after a resume summed elements at other places of the flat buffer than the uninterrupted run.
    Settled, the layout of the first step is the layout of every step. Breaks when a torch upgrade changes the
    Reducer API it uses or how the buckets are rebuilt (a group of one process: the layout does not depend on it)."""
    import torch.distributed as tdist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from distmnist.core import parallel
    from distmnist.core.model import build_model

    def rebuilt_order(settle: bool) -> list[int]:
        net = DistributedDataParallel(build_model([128, 128], 0))
        if settle:
            parallel.settle_buckets(net)
        for _ in range(3):  # a stock rebuild happens at the start of the second forward
            net.zero_grad()
            F.cross_entropy(net(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,))).backward()
        info = net._get_ddp_logging_data()
        assert info["has_rebuilt_buckets"] == 1, info
        return [int(i) for i in info["rebuilt_per_bucket_param_indices"].split()]

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        initial = list(range(6))  # one bucket (0.47 MB < torch's 25 MB cap), the parameters in definition order
        assert rebuilt_order(settle=False) == initial[::-1]  # stock: step 1 and the later steps differ
        assert rebuilt_order(settle=True) == initial  # settled: the first step's layout, for good
    finally:
        tdist.destroy_process_group()


# W ranks x 32: one epoch of 90 steps; the first checkpoint at step 7, the stop agreed at a multiple of 3 after it
def ranks_args(nproc: int) -> tuple[str, ...]:
    return ("-c", "smoke", f"data.train_samples={90 * 32 * nproc}", "train.epochs=1", "checkpoint.every_n_steps=7",
            "checkpoint.stop_check_every_n_steps=3", "dist.timeout_s=60")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted raw-DDP run at W ranks, made once per W for the module."""
    made: dict[int, Path] = {}

    def reference(nproc: int) -> Path:
        if nproc not in made:
            tmp = tmp_path_factory.mktemp(f"reference{nproc}")
            ok(torchrun("distmnist.ddp", *ranks_args(nproc), f"run.dir={tmp / 'run'}", nproc=nproc, cwd=tmp))
            made[nproc] = tmp / "run"
        return made[nproc]

    return reference


@slow
# each strategy settles DDP's buckets at its own place (ddp.py, fabric.py, the Trainer's RunCheckpoints); 4 ranks
# (the README's torchrun --nproc_per_node=4) for raw DDP, whose code the other two share
@pytest.mark.parametrize(("strategy", "nproc"), [("ddp", 3), ("trainer", 3), ("fabric", 3), ("ddp", 4)])
def test_sigterm_at_3_or_4_ranks_resumes_bit_identical(references, tmp_path, strategy, nproc):
    """3 or 4 gloo ranks sum each gradient element in an order that depends on its place in the all-reduced buffer
    (2 ranks: a+b, whatever the order). SIGTERM to every rank mid-epoch, exit 75, the same command again: the weights
    equal the uninterrupted run's bit for bit (they are 1e-8..1e-7 off with stock DDP, whose first step after a
    resume uses its initial bucket layout where the uninterrupted run uses the rebuilt one: parallel.settle_buckets)."""
    args = ranks_args(nproc)
    reference = references(nproc)
    run_dir = tmp_path / "run"
    log = open(tmp_path / "stopped.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(torchrun_cmd(f"distmnist.{strategy}", *args, f"run.dir={run_dir}", nproc=nproc),
                            cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(proc, run_dir)
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGTERM)  # as SLURM does: every rank
        proc.wait(timeout=120)
    finally:
        proc.kill()
        log.close()
    out = (tmp_path / "stopped.log").read_text()
    assert len(re.findall(r"exitcode\s+: 75 \(pid: \d+\)", out)) == nproc, out[-3000:]
    state = position(checkpoint.listing(run_dir / "checkpoints")[0])
    assert 0 < state.step_in_epoch < 90, state  # mid-epoch

    again = ok(torchrun(f"distmnist.{strategy}", *args, f"run.dir={run_dir}", nproc=nproc, cwd=tmp_path))
    assert f"resuming from {run_dir}/checkpoints/step={state.global_step:08d}.ckpt" in again.stdout, again.stdout
    got, ref = weights(run_dir), weights(reference)
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert same_weights(got, ref), f"max |diff| {diff:.3g} to the uninterrupted run"
    assert metrics(run_dir)["val_loss"] == metrics(reference)["val_loss"]


# ----------------------------------------------------------------------------------------------------- Ctrl-C
# A Ctrl-C at a terminal is a SIGINT to the terminal's foreground process group: here the launched command runs in a
# session of its own and the test signals that whole group, as the terminal would. torchrun starts its workers in
# sessions of their own, so under torchrun the SIGINT reaches the agent, which passes it on to every worker.
WRAPPER = "distmnist.tools.torchrun"  # torchrun that ends with its workers' code and line (launch/single_node.sh)


def start_in_terminal(tmp: Path, cmd: list[str], name: str, **env: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=tmp, env=child_env(**env), stdout=subprocess.DEVNULL, stderr=log, text=True,
                            start_new_session=True)


def ctrl_c(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> int:
    """SIGINT to the process group once the first checkpoint is there; the exit code."""
    try:
        wait_for_checkpoint(proc, run_dir)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def stopped_at(err: str, run_dir: Path) -> int:
    """The step of the one 'stopped by SIGINT' line; its checkpoint is the newest one, mid-epoch."""
    stopped = re.findall(r"^distmnist: stopped by SIGINT at step (\d+) \(epoch 1\); checkpoint (\S+); run the same "
                         r"command again to resume$", err, re.MULTILINE)
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0][0])
    newest = checkpoint.listing(run_dir / "checkpoints")[0]
    assert newest == Path(stopped[0][1]) or newest.name == Path(stopped[0][1]).name
    state = position(newest)
    assert state.global_step == step and 0 < state.step_in_epoch < STEPS_PER_EPOCH, state
    assert not (run_dir / "model.pt").exists()
    return step


@slow
@pytest.mark.parametrize("strategy,launcher", [("ddp", WRAPPER), ("ddp", "torch.distributed.run"),
                                               ("trainer", WRAPPER), ("fabric", WRAPPER)])
def test_ctrl_c_under_torchrun_checkpoints_every_rank_then_resumes_exactly(reference, tmp_path, strategy, launcher):
    """Ctrl-C: the agreed stop of SIGTERM (every rank at the same step, one checkpoint), one line from rank 0 and no
    traceback of ours; distmnist.tools.torchrun then exits 130 with nothing more. Plain torchrun adds what its agent
    prints on a signal -- its own traceback (SignalException) -- and exits 1: the one part distmnist cannot remove.
    The same command resumes and ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2", "-m", f"distmnist.{strategy}",
           *FAULT, f"run.dir={run_dir}"]
    rc = ctrl_c(start_in_terminal(tmp_path, cmd, "stopped"), run_dir)
    err = (tmp_path / "stopped.log").read_text()
    stopped_at(err, run_dir)
    if launcher == WRAPPER:
        assert rc == 130, err[-3000:]
        assert not re.search(r"Traceback|elastic|FAILED", err), err[-3000:]  # torchrun's agent says nothing
    else:
        assert rc == 1, err[-3000:]
        ours, theirs = err.split("Traceback (most recent call last):", 1)
        assert "Traceback" not in ours and "SignalException: Process" in theirs and "distmnist" not in theirs, err

    again = ok(subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300))
    assert "resuming from" in again.stdout
    assert_same_run(run_dir, reference)


SINGLE = ("-c", "smoke", "data.train_samples=6000", "train.epochs=2", "checkpoint.every_n_steps=20",
          "dist.timeout_s=30")


@pytest.fixture(scope="module")
def reference_one_process(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference1")
    ok(run_module("distmnist.ddp", *SINGLE, f"run.dir={tmp / 'run'}", cwd=tmp))
    return tmp / "run"


@slow
def test_ctrl_c_in_one_process_exits_130_then_resumes_exactly(reference_one_process, tmp_path):
    """`python -m distmnist.ddp` in a terminal, Ctrl-C: a checkpoint, one line, exit 130 (not the 30-line
    KeyboardInterrupt traceback); through exit_process (an interpreter teardown would abort: procs.teardown_aborts).
    The same command resumes to the uninterrupted weights."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "distmnist.ddp", *SINGLE, f"run.dir={run_dir}"]
    aborting = teardown_aborts(tmp_path)
    proc = start_in_terminal(tmp_path, cmd, "stopped", DISTMNIST_TEST_ABORT_AT_TEARDOWN="1", **aborting)
    rc = ctrl_c(proc, run_dir)
    err = (tmp_path / "stopped.log").read_text()
    assert rc == 130, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    step = int(re.search(r"stopped by SIGINT at step (\d+)", err).group(1))
    assert position(checkpoint.listing(run_dir / "checkpoints")[0]).global_step == step

    again = ok(subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300))
    assert f"step={step:08d}.ckpt" in again.stdout
    assert same_weights(weights(run_dir), weights(reference_one_process))
    assert metrics(run_dir)["val_loss"] == metrics(reference_one_process)["val_loss"]


@slow
def test_second_ctrl_c_quits_at_once(tmp_path):
    """The first Ctrl-C asks for the agreed stop; before it comes (here: never, the stop check is out of reach) a
    second Ctrl-C ends the process at once, by SIGINT's default action: no traceback, no new checkpoint."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "distmnist.ddp", *SINGLE, "checkpoint.stop_check_every_n_steps=100000",
           "train.epochs=50", f"run.dir={run_dir}"]  # long enough to be running still at the second Ctrl-C
    proc = start_in_terminal(tmp_path, cmd, "quit")
    try:
        wait_for_checkpoint(proc, run_dir)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first Ctrl-C did not wait for the agreed stop"
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "quit.log").read_text()
    assert rc == -signal.SIGINT and "Traceback" not in err, (rc, err[-3000:])


@pytest.mark.timeout(120)
def test_ctrl_c_while_starting_is_one_line_exit_130(tmp_path):
    """A Ctrl-C in the first second (importing torch, or starting up): one line, exit 130, no KeyboardInterrupt
    traceback from the middle of an import."""
    proc = start_in_terminal(tmp_path, [sys.executable, "-m", "distmnist.ddp", *SINGLE, f"run.dir={tmp_path / 'run'}"],
                             "starting")
    try:
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "starting.log").read_text()
    assert rc == 130, err[-3000:]
    assert re.fullmatch(r"distmnist: interrupted \(Ctrl-C\) (while starting; nothing was run|outside the training "
                        r"loop; .*)\n", err), err[-3000:]
