"""Exact test-set evaluation of a run, its model.pt or any of its checkpoints, with any number of processes.

    distmnist evaluate runs/ddp-fashion-0a1b2c3d                  # model.pt, else the newest checkpoint
    distmnist evaluate runs/ddp-fashion-0a1b2c3d/checkpoints/step=00000938.ckpt
    torchrun --nproc_per_node=3 -m distmnist.evaluate --model runs/fabric-fsdp-smoke-.../checkpoints/step=...ckpt

What it takes: a run dir (its ``model.pt``, or while the run goes on its newest checkpoint), a ``model.pt``, or a
checkpoint of any strategy -- a single file, or the sharded folder of an FSDP run (its shards are joined into the
whole model, so it evaluates on any number of processes). The data set, its root and the precision come from
the run's own ``config.yaml``; ``-c`` and ``section.key=value`` override them. Each test image is counted once
whatever the world size. The result (val_acc, val_loss, samples counted) is printed first, then written as JSON
(``<run dir>/eval.json``, ``eval-step=N.json`` for a checkpoint, or ``--out``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from distmnist.core import checkpoint, data, dist
from distmnist.core.config import Config
from distmnist.core.errors import DistMnistError, count, report_errors
from distmnist.core.metrics import EvalMetrics, all_evaluate
from distmnist.core.model import NNModel, load_model, weights_in
from distmnist.core.precision import autocast_factory
from distmnist.core.state import TrainState

OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[\w.]+=")  # section.key=value
CONFIG = "config.yaml"  # the run's own config, written by RunDir next to model.pt and checkpoints/


def find_weights(given: str | Path) -> tuple[Path, Path]:
    """What `given` names: (the model.pt or checkpoint to evaluate, the run dir it belongs to)."""
    given = Path(given)
    if given.is_dir() and not checkpoint.NAME.match(given.name):  # a run dir
        if (given / "model.pt").is_file():
            return given / "model.pt", given
        found = checkpoint.newest_good(given / "checkpoints", check=lambda obj, path: None)
        if found is None:
            raise DistMnistError(
                f"{given} holds neither model.pt nor checkpoints/; give a run dir, its model.pt or a checkpoint"
            )
        return found[0], given
    if not given.exists():
        raise DistMnistError(f"--model {given} does not exist; give a run dir, its model.pt or a checkpoint")
    in_checkpoints = given.parent.name == "checkpoints" and checkpoint.NAME.match(given.name)
    return given, given.parent.parent if in_checkpoints else given.parent


def load_weights(path: Path) -> tuple[NNModel, int | None]:
    """The NNModel in a model.pt or a checkpoint (any strategy, single file or sharded), and the checkpoint's
    global step (None for a model.pt)."""
    if not (path.is_dir() or checkpoint.NAME.match(path.name)):
        return load_model(path), None
    obj = checkpoint.read_full(path)
    state, meta = weights_in(obj), obj.get("distmnist")
    if state is None or not isinstance(meta, dict):
        raise DistMnistError(f"{path} is not a distmnist checkpoint (no model weights and position in it)")
    return load_model(path, state), TrainState.from_checkpoint(meta).global_step


def run_config(run_dir: Path) -> Path | None:
    """The config a run was trained with (None when `run_dir` has none: a model.pt copied elsewhere)."""
    path = run_dir / CONFIG
    return path if path.is_file() else None


def evaluate_model(model_path: str | Path, cfg: Config, out: str | Path | None = None) -> dict:
    """Evaluate `model_path` (a run dir, model.pt or checkpoint) under `cfg`; print the result, then write it."""
    path, run_dir = find_weights(model_path)
    model, step = load_weights(path)
    env = dist.read_env(cfg.train.accelerator)
    with dist.process_group(env, cfg.dist.timeout_s, cfg.dist.startup_timeout_s):
        data.all_ensure_available(cfg.data, env)
        model.to(env.device)
        result = all_evaluate(
            model,
            data.eval_batches(cfg, env),
            EvalMetrics().to(env.device),
            autocast_factory(cfg.train.precision, env.device),
            env.device,
        )
        result = {"model": str(path), "global_step": step, "dataset": cfg.data.name, "world_size": env.world_size,
                  **result}
        if env.is_zero:
            what = f"{path} (step {step})" if step is not None else str(path)
            print(
                f"val_acc {result['val_acc']:.4f} val_loss {result['val_loss']:.4f} on {result['val_samples']} "
                f"{cfg.data.name} test samples ({count(env.world_size, 'process', 'processes')}) of {what}",
                flush=True,
            )
            out = Path(out) if out else run_dir / ("eval.json" if step is None else f"eval-step={step}.json")
            try:  # atomic: a failed write leaves nothing behind
                checkpoint.atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
            except DistMnistError as err:
                raise DistMnistError(f"{err}; the result is printed above -- give --out PATH to write it elsewhere") \
                    from None
            print(f"wrote {out}", flush=True)
    return result


@report_errors
def main(argv: list[str] | None = None) -> int:
    from distmnist.core.args import Parser, add_config_args, config_of
    from distmnist.core.config import load_config

    p = Parser(prog="distmnist evaluate", usage="%(prog)s RUN [-c CONFIG] [--out FILE] [section.key=value ...]",
               description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="RUN", help="the same as RUN: a run dir, its model.pt or a checkpoint")
    p.add_argument("--out", help="JSON result file (default: <run dir>/eval.json, eval-step=N.json for a checkpoint)")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    # RUN is the one argument that is not a section.key=value override (a checkpoint's name has a '=' too)
    given = [a for a in args.overrides if not OVERRIDE.match(a)] + ([args.model] if args.model else [])
    if len(given) != 1:
        p.error(f"give one run dir, model.pt or checkpoint to evaluate (got {len(given)}: {' '.join(given)})")
    args.overrides = [a for a in args.overrides if OVERRIDE.match(a)]
    config = args.config or run_config(find_weights(given[0])[1])
    evaluate_model(given[0], load_config(config, config_of(args)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
