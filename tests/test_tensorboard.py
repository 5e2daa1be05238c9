"""TensorBoard as a user opens it: a real `tensorboard` server on loopback over two real smoke runs (raw DDP and the
Lightning Trainer), asked through its HTTP API for the run names, the scalar tags and the HParams experiment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from procs import child_env, free_port

from distmnist.core import tblog

pytestmark = pytest.mark.slow
RUNS = ("ddp-smoke", "trainer-smoke")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two finished smoke runs under one root (trained at the same time), one older run with its events in tb/,
    and a tensorboard server on them; the server is killed however the tests end."""
    root = tmp_path_factory.mktemp("tensorboard")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"distmnist.{name.split('-')[0]}", "-c", "smoke", f"run.dir={root / name}"],
            cwd=root, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in RUNS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    (root / "old" / "tb").mkdir(parents=True)  # an older version's layout: compare still reads it
    for f in (root / "ddp-smoke").glob("events.out.tfevents.*"):
        shutil.copy(f, root / "old" / "tb" / f.name)
    port = free_port()
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast", "false", "--reload_interval", "1"],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert tb.poll() is None, f"tensorboard exited {tb.returncode}: {tb.stderr.read()[-2000:]}"
            try:
                if len(get(url, "/data/runs")) == 3:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "tensorboard did not list the three runs within 60 s"
            time.sleep(0.5)
        yield url, root
    finally:
        tb.kill()
        tb.wait(timeout=30)


def get(url: str, route: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_runs_are_named_by_their_run_dir(server):
    url, _ = server
    assert sorted(get(url, "/data/runs")) == sorted([*RUNS, "old/tb"])


def test_every_strategy_shows_the_same_scalar_tags(server):
    url, _ = server
    tags = get(url, "/data/plugin/scalars/tags")
    for name in RUNS:
        assert set(tags[name]) == set(tblog.TAGS), (name, sorted(tags[name]))


def test_hparams_are_the_compared_ones_typed_with_the_metrics(server):
    url, _ = server
    experiment = get(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
    types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
    want = {*tblog.HPARAM_KEYS, "strategy", "world_size", "global_batch"} - {"train.accumulate_grad_batches"}
    assert set(types) == want, sorted(types)  # the curated keys only: no checkpoint.*, no data.download
    strings = {"optim.name", "optim.schedule", "data.name", "train.precision", "train.parallel", "strategy"}
    assert {k for k, t in types.items() if t == "DATA_TYPE_STRING"} == strings, types
    assert {k for k, t in types.items() if t == "DATA_TYPE_FLOAT64"} == want - strings, types
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert sorted(metrics) == sorted(tblog.HPARAM_METRICS)


def test_compare_reads_both_layouts(server):
    _, root = server
    out = subprocess.run([sys.executable, "-m", "distmnist.tools.compare", str(root / "ddp-smoke"), str(root / "old")],
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert tblog.read_scalars(root / "old") == tblog.read_scalars(root / "ddp-smoke")
