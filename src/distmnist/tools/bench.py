"""Side-by-side speed of the three strategies against the classic tutorial loops, on the same data, batch size,
precision and recipe.

    distmnist bench                                  # Fashion-MNIST, batch 64, fp32, 1 epoch, 1 process
    distmnist bench --accelerator cuda --precision bf16-mixed
    distmnist bench --world-size 2 --strategies ddp,fabric --loaders resident
    distmnist bench --time-to-acc 0.88 -c fast --world-size 2     # seconds until val_acc first reaches 88%
    distmnist bench --world-size 2 --parallel ddp,fsdp               # each strategy replicated and sharded
    distmnist bench --world-size 4 --strategies ddp --parallel ddp,tp4,tp2,fsdp+tp2,hsdp+r2   # every layout

Rows:
* ``tutorial``: the PyTorch quickstart loop -- torchvision dataset + ``ToTensor`` + ``DataLoader`` (no workers),
  forward / loss / backward / step / zero_grad, ``loss.item()`` every 100 batches; the baseline of the ratios;
* ``tutorial-lightning``: the Lightning introduction -- a LightningModule with ``self.log`` of the loss every step,
  the same DataLoader, a default ``Trainer`` (progress bar, logger, checkpointing);
* ``floor``: the same model, initial weights and recipe in a bare eager loop over resident tensors, one process, no
  metrics, no logging (``tools/bare_loop.py``, only torch): what this machine can do; column ``t/floor`` is each
  row's s/epoch over it (at ``--world-size`` W > 1 the strategy rows' processes train 1/W of the epoch each);
* ``stock-ddp`` (``--world-size`` > 1 only): the same bare loop under torchrun at the bench's world size, the model in
  ``DistributedDataParallel`` with torch's default buckets, as the tutorials write it; column ``t/stock-ddp``;
* each strategy x loader, run as real processes (``python -m`` for one process, torchrun for several);
  with ``--parallel ddp,fsdp`` each strategy also sharded (rows ``<strategy>-fsdp/<loader>``, ``train.parallel=fsdp``);
  a layout is ``train.parallel`` and its mesh sizes joined by ``+``: ``tp2`` (DDP x TP 2; ``tp<W>`` is pure TP),
  ``fsdp+tp2``, ``hsdp+r2`` (``train.replicate_size=2``), ``hsdp+r2+tp2``; rows ``<strategy>-<layout>/<loader>``.
  A layout that Fabric's and the Trainer's ModelParallelStrategy cannot hold (HSDP, DDP replicas beside TP) has
  no row for them (said on stderr), as those strategies refuse it.
  MB/rank: parameters + gradients + optimizer state held by each process (metrics.json's ``state_mb``).

Every run trains ``--warmup-epochs`` (default 1) more epochs than ``--epochs``; the warm-up epochs (CUDA and
allocator initialisation, graph capture, DataLoader start) are excluded. s/epoch is the median of the timed
epochs (their range is shown), samples/s the training samples of one epoch over it. The recipe
(optimizer, lr, ...) is the config's (default: configs/seed.yaml, the tutorial's own) for every row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from distmnist.core import data
from distmnist.core.config import PARALLEL, STRATEGIES, Config, batching, load_config
from distmnist.core.dist import pick_device
from distmnist.core.errors import DistMnistError, report_errors
from distmnist.tools.table import text_table
from distmnist.tools.tutorials import run_tutorial, run_tutorial_lightning

COLUMNS = ("row", "strategy", "parallel", "loader", "world_size", "precision", "device", "s_per_epoch",
           "samples_per_sec", "x_tutorial", "x_tutorial_lightning", "t_floor", "t_stock_ddp", "val_acc", "state_mb")
BARE_LOOP = Path(__file__).with_name("bare_loop.py")  # the floor and stock-ddp rows: a script of torch alone


# ------------------------------------------------------------------------------------------- baselines
def run_bare(cfg: Config, args, world_size: int, tmp: Path) -> dict:
    """tools/bare_loop.py on the config's data and recipe: one process (the floor) or torchrun (stock DDP)."""
    tmp.mkdir(parents=True, exist_ok=True)
    split = tmp / "split.pt"  # the very samples the strategy rows train on (synthetic, train_samples...)
    torch.save({"train": data.load_split(cfg.data, True), "test": data.load_split(cfg.data, False)}, split)
    o, step_batch = cfg.optim, batching(cfg, world_size).step_batch  # one optimizer step's samples per process
    script = [str(BARE_LOOP), "--data", str(split), "--out", str(tmp / "times.json"),
              "--epochs", str(args.warmup_epochs + args.epochs), "--batch-size", str(step_batch),
              "--hidden", ",".join(map(str, cfg.model.hidden)), "--optimizer", o.name, "--lr", str(o.lr),
              "--momentum", str(o.momentum), "--weight-decay", str(o.weight_decay), "--schedule", o.schedule,
              "--precision", cfg.train.precision, "--device", pick_device(cfg.train.accelerator).type,
              "--seed", str(cfg.seed)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    cmd = [sys.executable, *(launcher if world_size > 1 else []), *script]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if world_size > 1 else {})}  # as run_strategy
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DistMnistError(f"bench: {BARE_LOOP.name} failed (exit {proc.returncode}): {tail}")
    result = json.loads((tmp / "times.json").read_text())
    return {**result, "times": result["times"][args.warmup_epochs:]}


# ------------------------------------------------------------------------------------------ strategies
def run_strategy(strategy: str, cfg_args: list[str], world_size: int, run_dir: Path, timeout: float) -> dict:
    """One strategy as real processes; its metrics.json history gives the epoch times."""
    args = ["-m", f"distmnist.{strategy}", *cfg_args, f"run.dir={run_dir}"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    cmd = [sys.executable, *(launcher if world_size > 1 else []), *args]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if world_size > 1 else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DistMnistError(f"bench: {strategy} failed (exit {proc.returncode}): {tail}")
    return json.loads((run_dir / "metrics.json").read_text())


def timing(times: list[float], samples: int) -> dict:
    """The median of the timed epochs (robust to a noisy neighbour on a shared machine) and their range."""
    seconds = statistics.median(times)
    return {"s_per_epoch": seconds, "samples_per_sec": samples / seconds, "epoch_s": times}


def layout_overrides(spec: str) -> dict[str, str]:
    """A --parallel layout (``ddp``, ``fsdp``, ``tp2``, ``fsdp+tp2``, ``hsdp+r2``, ``hsdp+r2+tp2``) as config keys."""
    keys = {"train.parallel": "ddp"}
    for part in spec.split("+"):
        size = re.fullmatch(r"(tp|r)([1-9][0-9]*)", part)
        if part in PARALLEL:
            keys["train.parallel"] = part
        elif size:
            keys["train.tp_size" if size[1] == "tp" else "train.replicate_size"] = size[2]
        else:
            raise DistMnistError(f"bench: --parallel {spec!r}: {part!r} is none of {', '.join(PARALLEL)}, tpN, rN "
                                 "(layouts: ddp, fsdp, tp2, fsdp+tp2, hsdp+r2, hsdp+r2+tp2)")
    return keys


def lightning_holds(keys: dict[str, str], world_size: int) -> bool:
    """Whether ModelParallelStrategy holds the layout: not HSDP, not DDP replicas beside TP
    (``lightning/adapters.model_parallel_sizes`` refuses those in one line)."""
    tp = int(keys.get("train.tp_size", 1))
    parallel = keys["train.parallel"]
    return parallel != "hsdp" and not (parallel == "ddp" and tp > 1 and world_size // tp > 1)


def strategy_run(strategy: str, loader: str, cfg_args: list[str], args, run_dir: Path,
                 layout: dict[str, str] | None = None) -> dict:
    """One strategy with one loader under one layout: its timed epochs, as a baseline function returns them."""
    layout = layout or {"train.parallel": "ddp"}
    cfg_args = [*cfg_args, f"data.loader={loader}", *(f"{k}={v}" for k, v in layout.items())]
    metrics = run_strategy(strategy, cfg_args, args.world_size, run_dir, args.timeout)
    timed = metrics["history"][args.warmup_epochs:]
    return {"times": [h["epoch_s"] for h in timed], "samples": timed[0]["train_samples"],
            "val_acc": metrics["val_acc"], "device": metrics["device"], "state_mb": metrics.get("state_mb")}


def quiet(baseline: Callable[[Config, int, int], dict], cfg: Config, args) -> dict:
    """A baseline in this process, its prints (progress bars, Lightning's banner, tips and warnings) kept out of
    the table and the log."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return baseline(cfg, args.epochs, args.warmup_epochs)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ------------------------------------------------------------------------------------------------ main
def build_parser():
    from distmnist.core.args import Parser

    p = Parser(prog="distmnist bench", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default="seed", help="recipe for every row (default: seed, the tutorial's)")
    p.add_argument("--data", help="mnist | fashion-mnist | synthetic (default: fashion-mnist for the speed table, "
                                  "the config's for --time-to-acc)")
    p.add_argument("--data-root", help="default: the config's data.root")
    p.add_argument("--batch-size", type=int, help="per process (default: the config's)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (default 1)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first (default 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all rows, interleaved; s/epoch is the median over all rounds (default 1)")
    p.add_argument("--precision", help="default: the config's")
    p.add_argument("--accelerator", help="default: the config's")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"default: {','.join(STRATEGIES)}")
    p.add_argument("--loaders", default="resident,dataloader", help="default: resident,dataloader")
    p.add_argument("--parallel", default="ddp",
                   help="layouts of the strategy rows, comma-separated: ddp, fsdp, tp2 (DDP x TP 2), fsdp+tp2, "
                        "hsdp+r2, hsdp+r2+tp2 (default: ddp)")
    p.add_argument("--baselines", default="tutorial,tutorial-lightning,floor,stock-ddp",
                   help="rows besides the strategies' (stock-ddp only with --world-size > 1; default: all four)")
    p.add_argument("--world-size", type=int, default=1, help="processes per strategy row (default 1)")
    p.add_argument("--time-to-acc", type=float, help="report seconds until val_acc first reaches this")
    p.add_argument("--out", default="bench", help="folder for bench.json and bench.csv (default: bench/)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every row")
    return p


def parse_args(argv: list[str] | None):
    return build_parser().parse_args(argv)


def bench_config(args) -> tuple[Config, list[str]]:
    """The config of every row: the file, the options given, then the overrides."""
    data_name = args.data or (None if args.time_to_acc is not None else "fashion-mnist")
    options = {"data.name": data_name, "data.root": args.data_root, "data.batch_size": args.batch_size,
               "train.precision": args.precision, "train.accelerator": args.accelerator}
    overrides = [f"{k}={v}" for k, v in options.items() if v is not None]
    overrides += ["train.progress=true", *args.overrides]
    if args.time_to_acc is None:
        overrides.append(f"train.epochs={args.epochs + args.warmup_epochs}")
    cfg = load_config(args.config, overrides)
    return cfg, ["-c", args.config, *overrides]


def format_table(rows: list[dict]) -> str:
    head = ["row", "world", "precision", "device", "s/epoch", "(min-max)", "samples/s", "x tutorial",
            "x tut-Lightning", "t/floor", "t/stock-ddp", "val_acc", "MB/rank"]
    return text_table(head, [[
        r["row"], str(r["world_size"]), r["precision"], r["device"], f"{r['s_per_epoch']:.3f}",
        f"({min(r['epoch_s']):.3f}-{max(r['epoch_s']):.3f})",
        f"{r['samples_per_sec']:,.0f}", _ratio(r.get("x_tutorial")), _ratio(r.get("x_tutorial_lightning")),
        _ratio(r.get("t_floor")), _ratio(r.get("t_stock_ddp")),
        f"{r['val_acc']:.4f}", "" if r.get("state_mb") is None else f"{r['state_mb']:.2f}",
    ] for r in rows], left=1)


def _ratio(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.2f}x"


def time_to_accuracy(args, cfg_args: list[str], out: Path) -> list[dict]:
    rows = []
    for strategy in args.strategies.split(","):
        metrics = run_strategy(strategy, cfg_args, args.world_size, out / f"tta-{strategy}", args.timeout)
        hit = next((h for h in metrics["history"] if h["val_acc"] >= args.time_to_acc), None)
        rows.append({
            "strategy": strategy, "world_size": args.world_size, "target": args.time_to_acc,
            "epochs": hit["epoch"] if hit else None, "train_s": sum(
                h["epoch_s"] for h in metrics["history"][: hit["epoch"]]) if hit else None,
            "wall_s": hit["wall_s"] if hit else None, "final_val_acc": metrics["val_acc"],
        })
    print(f"time to val_acc >= {args.time_to_acc} ({args.world_size} processes, config {args.config}; wall_s counts "
          f"training and the evaluation after each epoch, from the first training step)")
    for r in rows:
        if r["epochs"] is None:
            print(f"  {r['strategy']:8s} not reached (final val_acc {r['final_val_acc']:.4f})")
        else:
            print(f"  {r['strategy']:8s} {r['wall_s']:7.2f} s wall ({r['train_s']:.2f} s training) at epoch "
                  f"{r['epochs']}, final val_acc {r['final_val_acc']:.4f}")
    return rows


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, value, least in (("--epochs", args.epochs, 1), ("--warmup-epochs", args.warmup_epochs, 0),
                               ("--repeats", args.repeats, 1), ("--world-size", args.world_size, 1)):
        if value < least:
            raise DistMnistError(f"bench: {flag} must be at least {least}, got {value}")
    cfg, cfg_args = bench_config(args)
    if cfg.data.name != "synthetic":
        from distmnist.core.dist import read_env

        data.all_ensure_available(cfg.data, read_env("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.time_to_acc is not None:
        rows = time_to_accuracy(args, cfg_args, out)
        (out / "time_to_acc.json").write_text(json.dumps(rows, indent=2) + "\n")
        return 0

    common = {"precision": cfg.train.precision}
    baselines = {"tutorial": run_tutorial, "tutorial-lightning": run_tutorial_lightning}
    bare = {"floor": 1, "stock-ddp": args.world_size}  # tools/bare_loop.py: one process, or torchrun with DDP
    jobs = []  # (row, strategy, loader, world size, run() -> times, samples, val_acc, device)
    for name in filter(None, args.baselines.split(",")):
        if name not in baselines and name not in bare:
            raise DistMnistError(f"bench: unknown baseline {name!r}; choose from {', '.join([*baselines, *bare])}")
        if name in baselines:
            jobs.append((name, name, "torchvision", 1, lambda tmp, f=baselines[name]: quiet(f, cfg, args)))
        elif name == "floor" or args.world_size > 1:
            jobs.append((name, name, "resident", bare[name], lambda tmp, w=bare[name]: run_bare(cfg, args, w, tmp)))
    layouts = {}  # row -> its --parallel layout
    for spec in filter(None, args.parallel.split(",")):
        keys = layout_overrides(spec)
        for strategy in filter(None, args.strategies.split(",")):
            name = strategy if spec == "ddp" else f"{strategy}-{spec}"
            if strategy != "ddp" and not lightning_holds(keys, args.world_size):
                print(f"bench: no {name} rows: ModelParallelStrategy cannot hold {spec} (docs/parallelism.md)",
                      file=sys.stderr)
                continue
            for loader in filter(None, args.loaders.split(",")):
                def run(tmp, s=strategy, lo=loader, la=keys):
                    return strategy_run(s, lo, cfg_args, args, tmp, la)

                layouts[f"{name}/{loader}"] = spec
                jobs.append((f"{name}/{loader}", strategy, loader, args.world_size, run))
    results: dict[str, list[dict]] = {job[0]: [] for job in jobs}
    with tempfile.TemporaryDirectory(prefix="distmnist-bench-") as tmp:
        for round_ in range(args.repeats):  # rounds interleave the rows: a slow spell of the machine hits them all
            for row, *_, run in jobs:
                print(f"bench: {row}" + (f" (round {round_ + 1}/{args.repeats})" if args.repeats > 1 else "") + " ...",
                      file=sys.stderr, flush=True)
                results[row].append(run(Path(tmp) / f"{row.replace('/', '-')}-{round_}"))
    rows = []
    for row, strategy, loader, world_size, _ in jobs:
        runs = results[row]
        rows.append({"row": row, "strategy": strategy, "loader": loader, "world_size": world_size, **common,
                     "parallel": layouts.get(row),
                     "device": runs[0]["device"], **timing([t for r in runs for t in r["times"]], runs[0]["samples"]),
                     "val_acc": runs[-1]["val_acc"], "state_mb": runs[-1].get("state_mb")})
    base = {r["row"]: r["samples_per_sec"] for r in rows if r["row"] in baselines}
    bare_s = {r["row"]: r["s_per_epoch"] for r in rows if r["row"] in bare}
    for r in rows:
        r["x_tutorial"] = r["samples_per_sec"] / base["tutorial"] if "tutorial" in base else None
        r["x_tutorial_lightning"] = (r["samples_per_sec"] / base["tutorial-lightning"]
                                     if "tutorial-lightning" in base else None)
        r["t_floor"] = r["s_per_epoch"] / bare_s["floor"] if "floor" in bare_s else None  # time: > 1 is slower
        r["t_stock_ddp"] = r["s_per_epoch"] / bare_s["stock-ddp"] if "stock-ddp" in bare_s else None
    print(f"distmnist bench: {cfg.data.name}, batch {cfg.data.batch_size} per process, {args.epochs} timed epoch(s) "
          f"after {args.warmup_epochs} warm-up epoch(s) (excluded), recipe {args.config}"
          + (f", {args.repeats} interleaved rounds (median over all)" if args.repeats > 1 else ""))
    print(format_table(rows))
    (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
