"""Compare finished (or running) runs side by side: one table, and optionally one PNG plot.

    distmnist compare runs/ddp-smoke runs/trainer-smoke runs/fabric-smoke   # the table
    distmnist compare runs/* --out compare.png                              # + val_acc against wall time and step
    distmnist compare runs/ddp-smoke runs/fabric-smoke --json               # the rows as JSON, for scripts
    python -m distmnist.tools.compare RUN_DIR...                            # the same

`tensorboard --logdir runs` opens all runs in one TensorBoard: every run dir is one run there, named by its
folder, with the same tags (train/loss, val/acc, ...) against the global step.

The numbers come from each run's metrics.json: s/epoch is the mean training seconds of an epoch (history
epoch_s), samples/s the run's train_samples_per_sec (all training samples over all training seconds), wall_s the
seconds from the first training step to the end, evaluation and earlier attempts of a resumed run included. A run dir
without metrics.json that has TensorBoard events (a run still training, or stopped) is shown from its events and
marked "(running)"; its wall times are the events' own clocks, and s/epoch is not known.

A run dir that is missing, has neither metrics.json nor events, or holds a damaged metrics.json (not JSON, nested
too deeply, a value of the wrong kind or out of range) is named in one warning line on stderr and the other runs
are compared (exit code 0); when no run is left, that is an error (one line, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distmnist.core import tblog
from distmnist.core.config import read_run_header
from distmnist.core.errors import DistMnistError, report_errors
from distmnist.tools.table import text_table

NUMBER = (int, float)

# The metrics.json keys the table needs, and the per-epoch keys the plot needs.
METRIC_KEYS = {"strategy": str, "world_size": int, "epochs": int, "history": list}
HISTORY_KEYS = ("epoch", "global_step", "val_acc", "wall_s", "epoch_s")


@dataclass
class Run:
    """One run dir, as the table and the plot see it."""

    run: str  # the label: the dir name (the path as given when two names collide)
    path: str
    status: str  # "done" (metrics.json) or "running" (TensorBoard events only)
    strategy: str | None
    world_size: int | None
    precision: str | None
    device: str | None
    dataset: str | None
    epochs: int
    global_step: int | None
    val_acc: float | None
    val_loss: float | None
    s_per_epoch: float | None
    samples_per_sec: float | None
    wall_s: float | None
    # curves for the plot: (x, val_acc) points
    by_wall: list[tuple[float, float]] = field(default_factory=list, repr=False)
    by_step: list[tuple[int, float]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        """The JSON row: everything but the curves; NaN (an epoch of 0 s) as null, so the JSON is strict."""
        out = asdict(self)
        del out["by_wall"], out["by_step"]
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- reading
def read_header(run_dir: Path) -> dict[str, Any]:
    """strategy / world_size / device from config.yaml's first line, precision / dataset from its body."""
    try:
        text = (run_dir / "config.yaml").read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, Any] = {}
    header = read_run_header(text.splitlines()[0] if text else "")
    if header:
        out.update(header, device=header["device"].split(":")[0])
    try:
        import yaml

        body = yaml.safe_load(text)
    except Exception:  # a config we cannot read only costs the precision column
        body = None
    if isinstance(body, dict):
        train, data = body.get("train"), body.get("data")
        if isinstance(train, dict) and isinstance(train.get("precision"), str):
            out["precision"] = train["precision"]
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            out["dataset"] = data["name"]
    return out


def first_event_time(tb_dir: Path) -> float | None:
    """When the run's TensorBoard writer was opened (the first event of the oldest file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = []
    for events in tb_dir.rglob("events.out.tfevents.*"):
        try:
            first = next(iter(EventFileLoader(str(events)).Load()), None)
        except Exception:
            continue
        if first is not None:
            times.append(first.wall_time)
    return min(times) if times else None


def damaged(path: Path, why: str) -> DistMnistError:
    return DistMnistError(f"{path.name} is damaged ({why})")


def is_number(value: Any) -> bool:
    """A JSON number the table and the plot can use: not a bool, and an int only within a float's range (JSON
    ints have no bound; format() and matplotlib turn them into floats and overflow)."""
    if isinstance(value, bool) or not isinstance(value, NUMBER):
        return False
    return isinstance(value, float) or abs(value) <= sys.float_info.max


def is_accuracy(value: Any) -> bool:
    """0..1, or NaN; anything else is no accuracy (and 1e308 overflowed the plot's percent axis)."""
    return is_number(value) and (math.isnan(value) or 0 <= value <= 1)


def check_metrics(metrics: Any, path: Path) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        raise damaged(path, f"a JSON {type(metrics).__name__}, not an object")
    for key, kind in METRIC_KEYS.items():
        value = metrics.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise damaged(path, f"{key!r} is {'missing' if key not in metrics else repr(value)[:40]}")
    for i, record in enumerate(metrics["history"]):
        if not isinstance(record, dict):
            raise damaged(path, f"history[{i}] is not an object")
        for key in HISTORY_KEYS:
            if not is_number(record.get(key)):
                raise damaged(path, f"history[{i}] has no number {key!r}")
        if not is_accuracy(record["val_acc"]):
            raise damaged(path, f"history[{i}] has val_acc {repr(record['val_acc'])[:40]}, not 0..1")
    for key in ("val_acc", "val_loss", "train_samples_per_sec", "wall_s", "global_step"):
        if metrics.get(key) is not None and not (is_accuracy if key == "val_acc" else is_number)(metrics[key]):
            raise damaged(path, f"{key!r} is {repr(metrics[key])[:40]}")
    for key in ("precision", "device", "dataset"):  # table cells and legend text
        if metrics.get(key) is not None and not isinstance(metrics[key], str):
            raise damaged(path, f"{key!r} is {repr(metrics[key])[:40]}, not text")
    return metrics


def load_finished(run_dir: Path, metrics_json: Path) -> Run:
    try:
        metrics = json.loads(metrics_json.read_text())
    except UnicodeDecodeError:
        raise damaged(metrics_json, "not text") from None
    except json.JSONDecodeError as err:
        raise damaged(metrics_json, f"not JSON: {err}") from None
    except RecursionError:  # json's decoder recurses once per level of [ or {
        raise damaged(metrics_json, "nested too deeply") from None
    except ValueError as err:  # an int of more than 4300 digits (sys.get_int_max_str_digits)
        raise damaged(metrics_json, f"not usable JSON: {' '.join(str(err).split())[:80]}") from None
    except OSError as err:
        raise DistMnistError(f"cannot read {metrics_json.name}: {err.strerror or err}") from None
    m = check_metrics(metrics, metrics_json)
    history = m["history"]
    header = read_header(run_dir)
    return Run(
        run=run_dir.name, path=str(run_dir), status="done", strategy=m["strategy"], world_size=m["world_size"],
        precision=m.get("precision") or header.get("precision"), device=m.get("device") or header.get("device"),
        dataset=m.get("dataset") or header.get("dataset"), epochs=m["epochs"], global_step=m.get("global_step"),
        val_acc=m.get("val_acc"), val_loss=m.get("val_loss"),
        s_per_epoch=sum(h["epoch_s"] for h in history) / len(history) if history else None,
        samples_per_sec=m.get("train_samples_per_sec"), wall_s=m.get("wall_s"),
        by_wall=[(h["wall_s"], h["val_acc"]) for h in history],
        by_step=[(h["global_step"], h["val_acc"]) for h in history],
    )


def load_running(run_dir: Path) -> Run:
    """A run dir without metrics.json: what its TensorBoard events hold so far."""
    events = tblog.read_events(run_dir, (tblog.TAG_VAL_ACC, tblog.TAG_VAL_LOSS, tblog.TAG_SPEED, tblog.TAG_LOSS))
    if not events:
        what = "no metrics.json and no TensorBoard events"
        if not (run_dir / "config.yaml").exists():
            what += " (not a distmnist run dir?)"
        else:
            what += " (started, stopped before its first log)"
        raise DistMnistError(what)
    header = read_header(run_dir)
    val_acc = events.get(tblog.TAG_VAL_ACC, [])
    val_loss = events.get(tblog.TAG_VAL_LOSS, [])
    rates = [v for _, _, v in events.get(tblog.TAG_SPEED, []) if v > 0]
    started = first_event_time(run_dir)
    last_time = max(t for points in events.values() for _, t, _ in points)
    last_step = max(s for points in events.values() for s, _, _ in points)
    return Run(
        run=run_dir.name, path=str(run_dir), status="running", strategy=header.get("strategy"),
        world_size=header.get("world_size"), precision=header.get("precision"), device=header.get("device"),
        dataset=header.get("dataset"), epochs=len(val_acc), global_step=last_step,
        val_acc=val_acc[-1][2] if val_acc else None, val_loss=val_loss[-1][2] if val_loss else None,
        s_per_epoch=None,
        # every epoch has the same samples: the harmonic mean is metrics.json's total samples / total seconds
        samples_per_sec=len(rates) / sum(1 / r for r in rates) if rates else None,
        wall_s=last_time - started if started is not None else None,
        by_wall=[(t - started, v) for _, t, v in val_acc] if started is not None else [],
        by_step=[(s, v) for s, _, v in val_acc],
    )


def load_run(path: str) -> Run:
    """One run dir; a DistMnistError saying what is wrong with it (its message does not repeat the path)."""
    run_dir = Path(path)
    if not run_dir.exists():
        raise DistMnistError("no such run dir")
    if not run_dir.is_dir():
        raise DistMnistError("not a folder (give a run dir, e.g. runs/ddp-smoke)")
    metrics_json = run_dir / "metrics.json"
    run = load_finished(run_dir, metrics_json) if metrics_json.exists() else load_running(run_dir)
    run.path = path
    run.run = run_dir.name or run_dir.resolve().name
    return run


def load_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
    """The runs that could be read, and one line for each that could not."""
    runs, problems = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except DistMnistError as err:
            problems.append(f"{path}: " + " ".join(str(err).split()))
    names = [r.run for r in runs]
    for r in runs:  # two dirs of the same name (runs/a, old/a): label them by the path as given
        if names.count(r.run) > 1:
            r.run = r.path
    return runs, problems


# ------------------------------------------------------------------------------------------------ table
def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_table(runs: list[Run]) -> str:
    head = ["run", "strategy", "world", "data", "precision", "device", "epochs", "val_acc", "val_loss", "s/epoch",
            "samples/s", "wall_s"]
    rows = [[
        r.run + (" (running)" if r.status == "running" else ""), r.strategy or "?",
        "?" if r.world_size is None else str(r.world_size), r.dataset or "?", r.precision or "?", r.device or "?",
        str(r.epochs),
        _num(r.val_acc, ".4f"), _num(r.val_loss, ".4f"), _num(r.s_per_epoch, ".3f"),
        _num(r.samples_per_sec, ",.0f"), _num(r.wall_s, ".1f"),
    ] for r in runs]
    return text_table(head, rows, left=5)


# ------------------------------------------------------------------------------------------------- plot
def legend_label(r: Run) -> str:
    world = "?" if r.world_size is None else r.world_size
    running = ", running" if r.status == "running" else ""
    return f"{r.run} ({r.strategy or '?'}, {world}x, {r.precision or '?'}{running})"


def time_unit(seconds: float) -> tuple[float, str]:
    if seconds > 2 * 3600:
        return 3600.0, "h"
    if seconds > 600:
        return 60.0, "min"
    return 1.0, "s"


def plot(runs: list[Run], out: Path) -> None:
    """Two panels, val_acc against wall time and against the global step, one line per run; saved as PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(10, 4.6), dpi=120, layout="constrained")
    ax_wall, ax_step = fig.subplots(1, 2, sharey=True)
    longest = max((x for r in runs for x, _ in r.by_wall), default=0.0)
    scale, unit = time_unit(longest)
    colors = [f"C{i}" for i in range(10)]
    markers = "osD^vP*Xhp"
    linestyles = ["-", "--", "-.", ":"]
    n = len(runs)
    for i, r in enumerate(runs):
        # Strategies with the same config give the same val_acc at the same steps: each line is drawn over the
        # one before, thinner, with a smaller hollow marker and other dashes, so lines on top of each other stay
        # visible as nested stripes and rings.
        shrink = i / max(n - 1, 1)
        style = dict(color=colors[i % 10], marker=markers[i % len(markers)], linestyle=linestyles[i % 4],
                     markersize=11.0 - 6.0 * shrink, markerfacecolor="none", markeredgewidth=1.6,
                     linewidth=3.4 - 2.0 * shrink, label=legend_label(r))
        if r.by_wall:
            xs, ys = zip(*r.by_wall, strict=True)
            ax_wall.plot([x / scale for x in xs], ys, **style)
        if r.by_step:
            xs, ys = zip(*r.by_step, strict=True)
            ax_step.plot(xs, ys, **style)
    ax_wall.set_xlabel(f"wall time since training started ({unit})")
    ax_step.set_xlabel("global step (optimizer steps)")
    ax_wall.set_ylabel("val_acc (test-set accuracy, %)")
    ax_wall.set_title("val_acc against wall time")
    ax_step.set_title("val_acc against step")
    ax_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_wall, ax_step):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.tick_params(labelleft=True)
    datasets = sorted({r.dataset for r in runs if r.dataset})
    fig.suptitle(f"distmnist compare: {n} run{'s' * (n != 1)}" + (f" on {', '.join(datasets)}" if datasets else ""),
                 fontsize="large", fontweight="bold")
    handles, labels = ax_step.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_wall.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(n, 2 if n > 3 else 3), frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, format="png")
    except OSError as err:
        raise DistMnistError(f"cannot write {out}: {err.strerror or err}") from None


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from distmnist.core.args import Parser

    doc = __doc__.split("\n\n")
    p = Parser(prog="distmnist compare", description="\n\n".join(doc[:3]), epilog="\n\n".join(doc[3:]),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs (run.dir of each run), e.g. runs/*")
    p.add_argument("--out", metavar="FILE.png", help="also write a PNG plot of val_acc against wall time and step")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    return p.parse_args(argv)


@report_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".png":
        raise DistMnistError(f"--out {args.out}: give a .png file name")
    if out is not None and out.is_dir():
        raise DistMnistError(f"--out {args.out} is a folder; give a .png file name")
    runs, problems = load_runs(args.run_dirs)
    if not runs:
        raise DistMnistError("nothing to compare: " + "; ".join(problems))
    for line in problems:
        print(f"distmnist: warning: skipping {line}", file=sys.stderr, flush=True)
    if out is not None:
        plot(runs, out)
    if args.json:
        print(json.dumps([r.row() for r in runs], indent=2))
    else:
        print(format_table(runs))
    if out is not None:
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
