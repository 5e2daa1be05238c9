"""CUDA paths (skipped without a GPU; run on a lent GPU machine with `python -m pytest -m gpu`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from procs import ok, run_module, same_weights, weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# 6432 samples at batch 64: 100 full batches and a short one (the eager path next to the graph)
GPU = ("-c", "smoke", "train.accelerator=cuda", "data.train_samples=6432", "data.batch_size=64")


def train(tmp: Path, strategy: str, name: str, *overrides: str) -> Path:
    ok(run_module(f"distmnist.{strategy}", *GPU, f"run.dir={tmp / name}", *overrides, cwd=tmp))
    return tmp / name


@pytest.mark.parametrize("strategy", ["ddp", "trainer", "fabric"])
def test_cuda_graph_step_equals_eager(tmp_path, strategy):
    graphed = train(tmp_path, strategy, "graph", "train.cuda_graphs=true")
    eager = train(tmp_path, strategy, "eager", "train.cuda_graphs=false")
    a, b = weights(graphed), weights(eager)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert same_weights(a, b), f"max |graph - eager| = {diff}"


def test_strategies_agree_on_gpu(tmp_path):
    runs = {s: weights(train(tmp_path, s, s)) for s in ("ddp", "trainer", "fabric")}
    for s in ("trainer", "fabric"):
        diff = max((runs["ddp"][k] - runs[s][k]).abs().max().item() for k in runs["ddp"])
        assert diff < 1e-5, (s, diff)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("strategy", ["ddp", "trainer", "fabric"])
def test_mixed_precision_trains_on_gpu(tmp_path, strategy, precision):
    run = train(tmp_path, strategy, f"{strategy}-{precision}", f"train.precision={precision}")
    m = json.loads((run / "metrics.json").read_text())
    assert m["device"] == "cuda" and m["precision"] == precision
    assert m["val_acc"] > 0.85, m["val_acc"]
