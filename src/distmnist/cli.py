"""Command line: `distmnist train|evaluate|data ...` and the shared parser of the strategy entry points.

    distmnist train --strategy ddp -c configs/fashion.yaml optim.lr=0.1
    distmnist evaluate --model runs/ddp/model.pt [-c CONFIG] [key=value ...]
    distmnist data prepare --name fashion-mnist --from /usr/share/datasets/fashion-mnist [--root data]
    distmnist bench [--help]                      # the strategies against the tutorial loops, one table

`python -m distmnist.ddp|trainer|fabric [-c CONFIG] [key=value ...]` take the same config arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distmnist.config import STRATEGIES, load_config
from distmnist.errors import USAGE_EXIT, DistMnistError, report_errors


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (argparse's own code)."""

    def error(self, message: str):  # noqa: D401
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file, or the name of a shipped one (default, fashion...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=0.1")


def strategy_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Train NNModel; config = YAML file + section.key=value overrides.")
    add_config_args(p)
    return p


def train_with(strategy: str, cfg) -> dict:
    if strategy not in STRATEGIES:
        raise DistMnistError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    module = importlib.import_module(f"distmnist.{strategy}")
    return module.train(cfg)


@report_errors
def run_strategy(strategy: str, argv: list[str] | None = None) -> int:
    """`python -m distmnist.<strategy> [-c CONFIG] [key=value ...]`."""
    args = strategy_parser(f"python -m distmnist.{strategy}").parse_args(argv)
    train_with(strategy, load_config(args.config, args.overrides))
    return 0


def build_parser() -> Parser:
    p = Parser(prog="distmnist", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train with one strategy (in this process; use torchrun for several)")
    t.add_argument("--strategy", default="ddp", help="ddp | trainer | fabric (default ddp)")
    add_config_args(t)

    e = sub.add_parser("evaluate", help="exact test-set accuracy and loss of a model.pt")
    e.add_argument("--model", required=True, help="model.pt of a run (an NNModel state_dict)")
    e.add_argument("--out", help="where to write the JSON result (default: <model dir>/eval.json)")
    add_config_args(e)

    sub.add_parser("bench", help="speed of the strategies against the tutorial loops (distmnist bench --help)")

    d = sub.add_parser("data", help="data set files")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    prep = dsub.add_parser("prepare", help="copy and check the four IDX files where torchvision expects them")
    prep.add_argument("--name", required=True, help="mnist | fashion-mnist")
    prep.add_argument("--from", dest="source", required=True, help="folder with the four IDX files (.gz or not)")
    prep.add_argument("--root", default="data", help="data.root to fill (default: data)")
    return p


@report_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from distmnist.bench import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        train_with(args.strategy, load_config(args.config, args.overrides))
    elif args.command == "evaluate":
        from distmnist.evaluate import evaluate_model

        evaluate_model(args.model, load_config(args.config, args.overrides), args.out)
    elif args.command == "data":
        from distmnist.data import prepare

        dest = prepare(args.name, args.source, args.root)
        print(f"{args.name}: four IDX files checked and placed in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
