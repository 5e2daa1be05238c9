"""slurm/train.sh under a real one-node SLURM cluster (tests/slurm/start_cluster.sh): the three strategies with
2 CPU processes (gloo) on synthetic data, a job that requeues itself on SIGUSR1 and resumes bit-identically,
and mistakes that fail within seconds with one line in the job's log.

Jobs run in tmp_path: their logs (slurm-distmnist-<job id>.out, the script's --output) and run dirs
(runs/distmnist-<job id>, its default) land there. Job ids restart at 1 with every cluster start.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from procs import REPO, Job, assert_resumed_exactly, child_env, metrics, same_weights, torchrun_cmd, weights

from distmnist.core import tblog

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SINGLE_NODE = REPO / "launch" / "single_node.sh"
SMOKE = ("-c", "smoke", "dist.timeout_s=60")
# the sbatch options of a 2-process CPU job, per strategy (the script's header asks for GPUs and 1 task per node)
CPU_JOB = {
    "ddp": ("--gpus-per-node=0", "--cpus-per-task=2"),
    "fabric": ("--gpus-per-node=0", "--cpus-per-task=2"),
    "trainer": ("--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"),
}
TAGS = {"train/loss", "lr", "train/acc", "val/loss", "val/acc", "perf/samples_per_sec"}


def finished_job(cluster, cwd: Path, sbatch_opts, args, timeout: float = 90) -> Job:
    """One job, submitted and waited for (cancelled if the wait fails): its exit code is job.rc."""
    job = Job(cluster, cwd, sbatch_opts, args, timeout=timeout)
    try:
        job.wait()
    finally:
        job.cancel()
    return job


# ---------------------------------------------------------------------------------------------- three strategies
@pytest.fixture(scope="module")
def strategy_jobs(slurm_cluster, tmp_path_factory):
    """One 2-process CPU job per strategy, submitted together (the node runs two at a time).
    fabric picks its strategy from DISTMNIST_STRATEGY, the others from --strategy."""
    tmp = tmp_path_factory.mktemp("strategies")
    jobs = {
        "ddp": Job(slurm_cluster, tmp, CPU_JOB["ddp"], ("--strategy", "ddp", *SMOKE)),
        "trainer": Job(slurm_cluster, tmp, CPU_JOB["trainer"], ("--strategy", "trainer", *SMOKE)),
        "fabric": Job(slurm_cluster, tmp, CPU_JOB["fabric"], SMOKE, env={"DISTMNIST_STRATEGY": "fabric"}),
    }
    try:
        for job in jobs.values():
            job.wait()
        yield jobs
    finally:
        for job in jobs.values():
            job.cancel()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "trainer", "fabric"])
def test_sbatch_trains_with_two_cpu_processes(strategy_jobs, strategy):
    job = strategy_jobs[strategy]
    print(f"{strategy}: job {job.id} took {job.elapsed:.1f} s (3 jobs submitted together)")
    assert job.rc == 0, job.describe()
    log = job.log
    start = f"strategy={strategy} nodes=1 processes=2 (2 per node, CPU, gloo) run.dir={job.run_dir} restart=0"
    assert start in log, log
    m = metrics(job.run_dir)  # the run dir is tied to the job: runs/<job name>-<job id>
    assert (m["strategy"], m["world_size"], m["num_nodes"], m["epochs"]) == (strategy, 2, 1, 2), m
    assert m["global_step"] == 64 and m["val_acc"] > 0.9, m
    assert (job.run_dir / "model.pt").is_file()
    scalars = tblog.read_scalars(job.run_dir)
    assert TAGS <= set(scalars), sorted(scalars)
    assert [step for step, _ in scalars["val/acc"]] == [32, 64]


@pytest.mark.timeout(240)
def test_config_args_are_taken_in_any_order_like_the_entry_points(slurm_cluster, tmp_path):
    """-c and -q among the overrides, as `python -m distmnist.ddp` takes them (parse_intermixed_args): the script
    checks them with distmnist's own parser (core.args.launch_check), so it accepts what the training accepts."""
    args = ("optim.lr=0.1", "-c", "smoke", "train.epochs=1", "-q", "dist.timeout_s=60")
    job = finished_job(slurm_cluster, tmp_path, CPU_JOB["ddp"], args, timeout=180)
    assert job.rc == 0, job.describe()
    m = metrics(job.run_dir)
    assert (m["strategy"], m["world_size"], m["dataset"], m["epochs"], m["global_step"]) == (
        "ddp", 2, "synthetic", 1, 32), m  # 2048 samples / 2 processes / batch 32: 32 steps in the one epoch
    cfg = yaml.safe_load((job.run_dir / "config.yaml").read_text())
    assert (cfg["optim"]["lr"], cfg["train"]["epochs"], cfg["train"]["quiet"]) == (0.1, 1, True), cfg


# ---------------------------------------------------------------------------------------------- requeue + resume
LONG = ("-c", "smoke", "data.train_samples=40000", "train.epochs=2", "checkpoint.every_n_steps=50", "dist.timeout_s=60")
LONG_STEPS = 2 * 40000 // 2 // 32  # 1250 optimizer steps


@pytest.fixture(scope="module")
def requeued_jobs(slurm_cluster, tmp_path_factory):
    """A long ddp job (torchrun agents under srun) and a long trainer job (one srun task per process), at once;
    each gets `scancel --signal=USR1 --batch` (what --signal=B:USR1@120 sends before the time limit) once its first
    checkpoint is there. Meanwhile one uninterrupted reference run of the same config (the strategies train
    bit-identical weights, tests/test_distributed.py)."""
    tmp = tmp_path_factory.mktemp("requeue")
    jobs = {s: Job(slurm_cluster, tmp, CPU_JOB[s], ("--strategy", s, *LONG), timeout=270) for s in ("ddp", "trainer")}
    ref_dir = tmp / "reference"
    ref = None
    timings: dict[str, dict[str, float]] = {}
    try:
        signalled: dict[str, float] = {}
        while len(signalled) < len(jobs):
            for strategy, job in jobs.items():
                if strategy in signalled:
                    continue
                if any((job.run_dir / "checkpoints").glob("step=*.ckpt")):
                    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.id)], env=slurm_cluster.env(),
                                   check=True, timeout=30)
                    signalled[strategy] = time.monotonic()
                    timings[strategy] = {"first checkpoint after sbatch": signalled[strategy] - job.started}
                elif job.proc.poll() is not None or time.monotonic() - job.started > 150:
                    job.wait()
                    pytest.fail(f"{strategy}: no checkpoint while the job ran\n{job.describe()}")
            time.sleep(0.1)
        ref = subprocess.Popen(
            ["timeout", "200", "bash", str(SINGLE_NODE), "--strategy", "ddp", "--nproc", "2", "--", *LONG,
             f"run.dir={ref_dir}"],
            cwd=tmp, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        pending: set[str] = set()
        while len(pending) < len(jobs):
            for strategy, job in jobs.items():
                if strategy not in pending and (job.state() == "PENDING" or job.proc.poll() is not None):
                    pending.add(strategy)
                    timings[strategy]["pending again after SIGUSR1"] = time.monotonic() - signalled[strategy]
            time.sleep(0.2)
        for strategy, job in jobs.items():
            job.wait()
            timings[strategy]["done after SIGUSR1"] = job.started + job.elapsed - signalled[strategy]
            timings[strategy]["total"] = job.elapsed
        ref_out = ref.communicate(timeout=200)[0]
        for strategy, t in timings.items():
            print(f"{strategy} requeue: " + "; ".join(f"{k} {v:.1f} s" for k, v in t.items()))
        assert ref.returncode == 0, ref_out[-5000:]
        yield jobs, ref_dir
    finally:
        for job in jobs.values():
            job.cancel()
        if ref is not None and ref.poll() is None:
            ref.kill()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "trainer"])
def test_usr1_checkpoints_requeues_and_resumes_bit_identically(requeued_jobs, strategy):
    jobs, ref_dir = requeued_jobs
    job = jobs[strategy]
    assert job.rc == 0, job.describe()
    log = job.log
    stop = re.search(r"distmnist: stopped by SIGUSR1 at step (\d+)", log)
    assert stop, f"the job was not stopped by the signal\n{job.describe()}"
    stopped_at = int(stop.group(1))
    assert 0 < stopped_at < LONG_STEPS, f"stopped at step {stopped_at}: the run was too short to be interrupted"
    assert f"requeued job {job.id}" in log, log
    assert f"restart=1 job={job.id}" in log, log
    assert f"resuming from {job.run_dir}/checkpoints/step={stopped_at:08d}.ckpt" in log, log
    m = metrics(job.run_dir)
    assert (m["strategy"], m["world_size"], m["epochs"], m["global_step"]) == (strategy, 2, 2, LONG_STEPS), m
    assert same_weights(weights(job.run_dir), weights(ref_dir)), "resumed model.pt differs from an uninterrupted run"


# ------------------------------------------------------------------------- resubmitted with another process count
# A fixed global batch of 64: 2 processes x batch 32, then 1 process x batch 32 x accumulation 2 (derived).
# 24010 samples: 376 steps of 64 an epoch (the last one padded); cosine, so the learning rate changes at every step.
ELASTIC = ("-c", "smoke", "data.train_samples=24010", "data.global_batch_size=64", "optim.schedule=cosine",
           "checkpoint.every_n_steps=20", "dist.timeout_s=60")
ELASTIC_STEPS = 2 * 376


@pytest.fixture(scope="module")
def resubmitted(slurm_cluster, tmp_path_factory):
    """Raw DDP (torchrun under srun: the cheapest path, no Lightning import), 2 processes, stopped by
    `scancel --signal=USR1 --batch` after its first checkpoint; DISTMNIST_MAX_REQUEUES=0 so the job ends instead of
    requeueing itself (a requeue keeps the job's process count), and the same run dir is submitted again as a new
    job with 1 process (DISTMNIST_NPROC_PER_NODE=1). Meanwhile an uninterrupted 2-process run of the same config."""
    tmp = tmp_path_factory.mktemp("resubmit")
    run_dir, ref_dir = tmp / "runs" / "g64", tmp / "reference"
    args = ("--strategy", "ddp", *ELASTIC, f"run.dir={run_dir}")
    first = Job(slurm_cluster, tmp, CPU_JOB["ddp"], args, timeout=200, env={"DISTMNIST_MAX_REQUEUES": "0"})
    second = ref = None
    try:
        deadline = time.monotonic() + 150
        while not any((run_dir / "checkpoints").glob("step=*.ckpt")):
            assert first.proc.poll() is None and time.monotonic() < deadline, first.describe()
            time.sleep(0.05)
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(first.id)], env=slurm_cluster.env(), check=True,
                       timeout=30)
        ref = subprocess.Popen(torchrun_cmd("distmnist.ddp", *ELASTIC, f"run.dir={ref_dir}", nproc=2), cwd=tmp,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first.wait()
        second = Job(slurm_cluster, tmp, ("--gpus-per-node=0", "--cpus-per-task=1"), args, timeout=200,
                     env={"DISTMNIST_NPROC_PER_NODE": "1"})
        second.wait()
        ref_out = ref.communicate(timeout=200)[0]
        print(f"2 processes until SIGUSR1: {first.elapsed:.1f} s; resubmitted with 1: {second.elapsed:.1f} s")
        assert ref.returncode == 0, ref_out[-5000:]
        yield first, second, run_dir, ref_dir
    finally:
        for job in (first, second):
            if job is not None:
                job.cancel()
        if ref is not None and ref.poll() is None:
            ref.kill()


@pytest.mark.timeout(300)
def test_a_run_stopped_with_2_processes_resubmitted_with_1_resumes_exactly(resubmitted):
    first, second, run_dir, ref_dir = resubmitted
    log = first.log
    assert f"strategy=ddp nodes=1 processes=2 (2 per node, CPU, gloo) run.dir={run_dir} restart=0" in log, log
    stop = re.search(r"distmnist: stopped by SIGUSR1 at step (\d+)", log)
    assert stop, f"the job was not stopped by the signal\n{first.describe()}"
    step = int(stop.group(1))
    assert 0 < step < ELASTIC_STEPS, f"stopped at step {step}: the run was too short to be interrupted"
    assert first.rc not in (0, None) and "requeued job" not in log, first.describe()
    assert f"not requeueing; resubmit with run.dir={run_dir} to resume" in log, log
    log = second.log
    assert second.rc == 0, second.describe()
    assert f"strategy=ddp nodes=1 processes=1 (1 per node, CPU, gloo) run.dir={run_dir} restart=0" in log, log
    assert f"resuming from {run_dir}/checkpoints/step={step:08d}.ckpt" in log, log
    m = metrics(run_dir)
    assert (m["world_size"], m["batch_size"], m["accumulate_grad_batches"], m["global_batch_size"]) == (1, 32, 2, 64), m
    assert [h["train_samples"] for h in m["history"]] == [376 * 64] * 2, m["history"]  # padded alike at any W
    diff = assert_resumed_exactly(run_dir, ref_dir, tolerance=1e-5)
    print(f"stopped at step {step} of {ELASTIC_STEPS} with 2 processes, resumed with 1 x accumulation 2: "
          f"max abs weight difference vs the uninterrupted 2-process run {diff:.3g}")
    # micro-batch m of the one process takes what rank m took, in the same order (test_elastic): bit for bit
    assert diff == 0.0, diff


# ---------------------------------------------------------------------------------------------------- mistakes
BAD_INPUT = {
    "unknown-strategy": (CPU_JOB["ddp"], ("--strategy", "nope", *SMOKE), "unknown strategy 'nope'"),
    "missing-config": (CPU_JOB["ddp"], ("-c", "/nonexistent/distmnist.yaml"),
                       "config file /nonexistent/distmnist.yaml does not exist"),
    "unknown-key": (CPU_JOB["trainer"], ("--strategy", "trainer", *SMOKE, "optim.lrr=0.1"),
                    "unknown config key 'optim.lrr'"),
    "cuda-without-gpus": (CPU_JOB["fabric"], ("--strategy", "fabric", *SMOKE, "train.accelerator=cuda"),
                          "train.accelerator=cuda but this job has no GPUs"),
    # the node's two (fake) GPUs, one task, a config that would use GPUs: the trainer needs one task per GPU
    "trainer-tasks-vs-gpus": (("--gpus-per-node=2", "--ntasks-per-node=1", "--cpus-per-task=1"),
                              ("--strategy", "trainer", *SMOKE, "train.accelerator=auto"),
                              "runs one SLURM task per GPU, but this job has 1 task(s) and 2 GPU(s) per node: "
                              "submit with --ntasks-per-node=2"),
    "ddp-one-task-per-node": (("--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"),
                              ("--strategy", "ddp", *SMOKE), "submit with --ntasks-per-node=1"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_mistakes_fail_within_seconds_with_one_line(slurm_cluster, tmp_path, case):
    opts, args, message = BAD_INPUT[case]
    job = finished_job(slurm_cluster, tmp_path, opts, args)
    print(f"{case}: job {job.id} failed in {job.elapsed:.1f} s")
    assert job.rc == 2, job.describe()
    assert job.elapsed < 30, job.describe()
    errors = [line for line in job.log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], job.describe()
    assert "Traceback" not in job.log and not job.run_dir.exists(), job.describe()


@pytest.mark.timeout(120)
def test_a_run_dir_left_by_an_earlier_job_with_the_same_id_is_not_resumed(slurm_cluster, tmp_path):
    """Job ids start over with a fresh cluster state: a first start must not adopt another job's runs/<name>-<id>."""
    for job_id in range(1, 1001):  # the ids this session's cluster hands out
        (tmp_path / "runs" / f"distmnist-{job_id}").mkdir(parents=True)
    job = finished_job(slurm_cluster, tmp_path, CPU_JOB["ddp"], SMOKE)
    assert job.rc == 2, job.describe()
    assert f"error: {job.run_dir} already exists, left by an earlier job with the same id" in job.log, job.describe()
    assert list(job.run_dir.iterdir()) == []


@pytest.mark.timeout(300)
def test_requeues_are_capped(slurm_cluster, tmp_path):
    """DISTMNIST_MAX_REQUEUES=0: SIGUSR1 still checkpoints every rank, but the job does not requeue itself: it
    ends, and says why."""
    job = Job(slurm_cluster, tmp_path, CPU_JOB["ddp"], ("--strategy", "ddp", *LONG), timeout=200,
              env={"DISTMNIST_MAX_REQUEUES": "0"})
    try:
        deadline = time.monotonic() + 150
        while not any((job.run_dir / "checkpoints").glob("step=*.ckpt")):
            assert job.proc.poll() is None and time.monotonic() < deadline, job.describe()
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.id)], env=slurm_cluster.env(), check=True,
                       timeout=30)
        job.wait()
    finally:
        job.cancel()
    log = job.log
    assert job.rc not in (0, None), job.describe()  # torchrun, stopped by its SIGTERM, exits 1 (its workers 75)
    assert re.search(r"distmnist: stopped by SIGUSR1 at step \d+", log), log
    assert "not requeueing" in log and "DISTMNIST_MAX_REQUEUES=0" in log, log
    assert "requeued job" not in log and "restart=1" not in log, log
    assert any((job.run_dir / "checkpoints").glob("step=*.ckpt"))
