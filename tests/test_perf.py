"""Throughput figures and the profiler, end to end: one short profiled run of each strategy at 2 gloo processes
(synthetic smoke set, 1 epoch, a configured peak so that MFU is reported), and one plain 1-process run (profiler
off, no peak known on a CPU). The FLOPs must be the counted ones (forward and backward), the same for all three
strategies; each epoch's FLOP/s, MFU and data-wait share follow from its record; TensorBoard carries them as
``perf/*``; every rank's trace parses and holds the matmuls, the profiler steps of the window and the all-reduce.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from procs import STRATEGIES, metrics, ok, run_module, torchrun

from distmnist.core import tblog
from distmnist.core.model import IMAGE_SIZE, NUM_CLASSES
from distmnist.core.throughput import count_step_flops

pytestmark = pytest.mark.slow

PEAK = 1e12  # train.peak_flops: per device
WAIT, STEPS = 2, 3  # the profiler's window
SHORT = ("-c", "smoke", "train.epochs=1", "data.train_samples=640")  # 10 steps at 2 processes
PROFILED = (*SHORT, "train.profile=true", f"train.profile_wait={WAIT}", f"train.profile_steps={STEPS}",
            f"train.peak_flops={PEAK}")


def analytic_flops(hidden: list[int], batch: int) -> int:
    """By hand: forward 2·B·in·out per Linear; backward the weight gradient of every Linear and the input gradient
    of all but the first (the images need none)."""
    widths = [IMAGE_SIZE, *hidden, NUM_CLASSES]
    layers = [2 * batch * a * b for a, b in zip(widths, widths[1:], strict=False)]
    return 2 * sum(layers) + sum(layers[1:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("perf")
    out = {}
    for name in STRATEGIES:
        proc = ok(torchrun(f"distmnist.{name}", *PROFILED, f"run.dir={tmp / name}", cwd=tmp))
        out[name] = (tmp / name, proc.stdout)
    proc = ok(run_module("distmnist.ddp", *SHORT, f"run.dir={tmp / 'plain'}", cwd=tmp))
    out["plain"] = (tmp / "plain", proc.stdout)
    return out


def test_flop_counter_counts_forward_and_backward_not_6nb():
    assert count_step_flops([128, 128], 64) == analytic_flops([128, 128], 64) == 32_473_088
    assert count_step_flops([64, 32, 16], 7) == analytic_flops([64, 32, 16], 7)
    params = 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert 6 * params * 64 > 1.35 * count_step_flops([128, 128], 64)  # the estimate is ~40% off


def test_metrics_json_carries_the_counted_flops_and_each_epochs_throughput(runs):
    for name in STRATEGIES:
        m = metrics(runs[name][0])
        # smoke: batch 32 per process x 2 processes = one optimizer step of 64 samples
        assert m["flops_per_step"] == analytic_flops([128, 128], 64), name
        assert m["flops_per_sample"] * m["global_batch_size"] == m["flops_per_step"]
        assert m["peak_flops"] == 2 * PEAK  # the job's two devices
        (epoch,) = m["history"]
        flops = m["flops_per_sample"] * epoch["train_samples"]
        assert epoch["flops_per_sec"] == pytest.approx(flops / epoch["epoch_s"])
        assert epoch["mfu"] == pytest.approx(epoch["flops_per_sec"] / (2 * PEAK))
        assert 0 < epoch["data_wait_s"] < epoch["epoch_s"], (name, epoch)
        assert epoch["data_wait_share"] == pytest.approx(epoch["data_wait_s"] / epoch["epoch_s"])
        assert m["train_flops_per_sec"] == pytest.approx(epoch["flops_per_sec"])
        assert m["train_mfu"] == pytest.approx(epoch["mfu"])
        assert m["data_wait_share"] == pytest.approx(epoch["data_wait_share"])
        line = next(ln for ln in runs[name][1].splitlines() if ln.startswith(f"[{name}] epoch 1/1"))
        assert f"{epoch['flops_per_sec'] / 1e9:.2f} GFLOP/s MFU {epoch['mfu']:.2%} data wait" in line, line


def test_no_mfu_without_a_known_peak(runs):
    run_dir, stdout = runs["plain"]
    m = metrics(run_dir)
    assert m["flops_per_step"] == analytic_flops([128, 128], 32)
    assert "peak_flops" not in m and "train_mfu" not in m and "mfu" not in m["history"][0]
    assert "GFLOP/s data wait" in stdout
    assert tblog.TAG_MFU not in tblog.read_scalars(run_dir)


def test_tensorboard_perf_tags_are_the_records(runs):
    for name in STRATEGIES:
        run_dir = runs[name][0]
        (epoch,) = metrics(run_dir)["history"]
        scalars = tblog.read_scalars(run_dir)
        for tag, key in ((tblog.TAG_FLOPS, "flops_per_sec"), (tblog.TAG_MFU, "mfu"),
                         (tblog.TAG_DATA_WAIT, "data_wait_share")):
            ((step, value),) = scalars[tag]
            assert step == epoch["global_step"] and value == pytest.approx(epoch[key], rel=1e-6), (name, tag)


def trace_events(path: Path) -> collections.Counter:
    events = json.loads(path.read_text())["traceEvents"]
    return collections.Counter(e["name"] for e in events if e.get("ph") == "X")


def test_profile_writes_one_trace_per_rank_with_matmuls_and_the_all_reduce(runs):
    for name in STRATEGIES:
        traces = sorted((runs[name][0] / "profile").glob("*.pt.trace.json"))
        assert [p.name.split(".")[0] for p in traces] == ["rank0", "rank1"], (name, traces)
        for path in traces:
            names = trace_events(path)
            steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
            assert steps == [f"ProfilerStep#{WAIT + 1 + i}" for i in range(STEPS)], (name, steps)
            # forward: addmm per Linear; backward: mm for the gradients; the gradients summed over the ranks
            assert names["aten::addmm"] >= 3 * STEPS and names["aten::mm"] >= 5 * STEPS, (name, path.name)
            assert names["gloo:all_reduce"] >= STEPS, (name, path.name, names["gloo:all_reduce"])


def test_profile_off_writes_nothing(runs):
    assert not (runs["plain"][0] / "profile").exists()
