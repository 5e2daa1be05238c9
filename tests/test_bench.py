"""`distmnist bench` end to end: real baselines in process, real strategy processes, the table and the files.

The synthetic smoke set keeps it to seconds: the speeds it prints prove nothing, the shape of the report does
(every row, every round's timed epochs, ratios computed from the printed samples/s).
"""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from tests.procs import REPO, ok, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = ok(run_module(
        "distmnist", "bench", "-c", "smoke", "--data", "synthetic", "--strategies", "ddp",
        "--loaders", "resident,dataloader", "--repeats", "2", "--epochs", "1", "--out", str(out / "b"),
        cwd=out, timeout=280,
    ))
    return proc, out / "b"


def test_bench_table_lists_every_row_and_round(bench):
    proc, out = bench
    assert "2 interleaved rounds" in proc.stdout
    rows = json.loads((out / "bench.json").read_text())
    assert [r["row"] for r in rows] == ["tutorial", "tutorial-lightning", "ddp/resident", "ddp/dataloader"]
    for r in rows:
        assert r["row"] in proc.stdout
        assert len(r["epoch_s"]) == 2, r  # one timed epoch per round, the warm-up excluded
        assert r["s_per_epoch"] == pytest.approx(statistics.median(r["epoch_s"]))
        assert r["samples_per_sec"] == pytest.approx(2048 / r["s_per_epoch"])  # smoke: 2048 training samples
        assert 0.0 <= r["val_acc"] <= 1.0
    by_row = {r["row"]: r for r in rows}
    tutorial = by_row["tutorial"]["samples_per_sec"]
    assert by_row["tutorial"]["x_tutorial"] == pytest.approx(1.0)
    assert by_row["ddp/resident"]["x_tutorial"] == pytest.approx(by_row["ddp/resident"]["samples_per_sec"] / tutorial)
    # the two loaders of one strategy compute the same numbers (same order, same arithmetic)
    assert by_row["ddp/resident"]["val_acc"] == by_row["ddp/dataloader"]["val_acc"]
    with open(out / "bench.csv") as f:
        assert [r["row"] for r in csv.DictReader(f)] == list(by_row)


def test_time_to_accuracy_reports_the_epoch_it_was_reached(tmp_path):
    proc = ok(run_module(
        "distmnist", "bench", "-c", "smoke", "--time-to-acc", "0.5", "--strategies", "ddp", "--out", str(tmp_path),
        cwd=REPO, timeout=200,
    ))
    (row,) = json.loads((tmp_path / "time_to_acc.json").read_text())
    assert row["strategy"] == "ddp" and row["target"] == 0.5
    assert row["epochs"] in (1, 2) and row["final_val_acc"] >= 0.5
    assert 0 < row["train_s"] <= row["wall_s"]
    assert f"at epoch {row['epochs']}" in proc.stdout
