"""Exact test-set evaluation of a model.pt, with any number of processes.

    python -m distmnist.evaluate --model runs/ddp-fashion/model.pt [-c CONFIG] [section.key=value ...]
    torchrun --nproc_per_node=3 -m distmnist.evaluate --model runs/ddp-fashion/model.pt

Each test image is counted once whatever the world size; prints and writes (JSON) val_acc, val_loss and the
number of samples counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distmnist.core import checkpoint, data, dist
from distmnist.core.config import Config
from distmnist.core.errors import report_errors
from distmnist.core.metrics import EvalMetrics, all_evaluate
from distmnist.core.model import load_model
from distmnist.core.precision import autocast_factory


def evaluate_model(model_path: str | Path, cfg: Config, out: str | Path | None = None) -> dict:
    model = load_model(model_path)
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
        result = {"model": str(model_path), "dataset": cfg.data.name, "world_size": env.world_size, **result}
        if env.is_zero:
            out = Path(out) if out else Path(model_path).with_name("eval.json")
            checkpoint.atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
            print(
                f"val_acc {result['val_acc']:.4f} val_loss {result['val_loss']:.4f} "
                f"on {result['val_samples']} {cfg.data.name} test samples ({env.world_size} processes); wrote {out}",
                flush=True,
            )
    return result


@report_errors
def main(argv: list[str] | None = None) -> int:
    from distmnist.core.args import Parser, add_config_args, config_of
    from distmnist.core.config import load_config

    p = Parser(prog="python -m distmnist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model.pt of a run")
    p.add_argument("--out", help="JSON result file (default: <model dir>/eval.json)")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    evaluate_model(args.model, load_config(args.config, config_of(args)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
