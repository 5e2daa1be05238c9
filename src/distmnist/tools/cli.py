"""Command line: `distmnist train|evaluate|bench|compare|predict|doctor|data ...`, and the parser of the strategy
entry points.

    distmnist train --strategy ddp -c configs/fashion.yaml optim.lr=0.1
    distmnist evaluate runs/ddp-fashion [-c CONFIG] [key=value ...]   # a run dir, model.pt or checkpoint
    distmnist data prepare --name fashion-mnist --from /usr/share/datasets/fashion-mnist [--root data]
    distmnist bench [--help]                      # the strategies against the tutorial loops, one table
    distmnist compare RUN_DIR... [--out cmp.png]  # runs side by side
    distmnist predict --model RUN_DIR/model.pt IMAGE...
    distmnist doctor [--endpoint HOST:PORT]      # versions, devices, network: a bug report; exit 1 on a problem

`python -m distmnist.ddp|trainer|fabric [-c CONFIG] [key=value ...]` take the same config arguments.
"""

from __future__ import annotations

import importlib
import sys

from distmnist import __version__
from distmnist.core.args import Parser, add_config_args, config_of
from distmnist.core.config import STRATEGIES, load_config
from distmnist.core.errors import DistMnistError, alike_on_every_rank, exit_process, report_errors


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise DistMnistError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def train_with(strategy: str, cfg) -> dict:
    check_strategy(strategy)
    module = importlib.import_module(f"distmnist.{strategy}")
    return module.train(cfg)


# commands whose module has its own main(argv) and --help
DELEGATED = {
    "evaluate": ("distmnist.tools.evaluate", "exact test-set accuracy of a run, model.pt or checkpoint"),
    "bench": ("distmnist.tools.bench", "speed of the strategies against the tutorial loops, one table"),
    "compare": ("distmnist.tools.compare",
                "runs side by side: table + PNG plot (`tensorboard --logdir runs` shows all)"),
    "predict": ("distmnist.tools.predict", "classify image files with a model.pt"),
    "doctor": ("distmnist.tools.doctor",
               "versions, devices, hostname, the interface towards --endpoint: a report; exit 1 on a problem"),
}


def train_parser() -> Parser:
    p = Parser(prog="distmnist train", description="Train with one strategy in this process (torchrun for several).")
    p.add_argument("--strategy",
                   help="ddp | trainer | fabric (default: the strategy a run's config.yaml names, else ddp)")
    add_config_args(p)
    return p


def build_parser() -> Parser:
    p = Parser(prog="distmnist", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"distmnist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("train", help="train with one strategy (distmnist train --help)")
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (distmnist {name} --help)")
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
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command in DELEGATED:
        return importlib.import_module(DELEGATED[command][0]).main(rest)
    if command == "train":  # intermixed: options may come after key=value overrides
        args = train_parser().parse_intermixed_args(rest)
        from distmnist.core.run import run_strategy  # not at import: `distmnist --help` stays quick

        strategy = args.strategy or (args.config and run_strategy(args.config)) or "ddp"
        with alike_on_every_rank():  # every process of a launch reads the same arguments: said once
            check_strategy(strategy)
            cfg = load_config(args.config, config_of(args))
        train_with(strategy, cfg)
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "data":
        from distmnist.core.data import prepare

        dest = prepare(args.name, args.source, args.root)
        print(f"{args.name}: four IDX files checked and placed in {dest}")
    return 0


def entry() -> None:
    """The `distmnist` console script: main(), then an exit that skips the interpreter's teardown
    (core/errors.exit_process: after an FSDP run that teardown can abort a finished process)."""
    exit_process(main())


if __name__ == "__main__":
    entry()
