"""Command-line arguments shared by every entry point: the strategies' ``main`` and the tools.

    python -m distmnist.ddp [-c CONFIG] [-q] [section.key=value ...]

argparse with one-line usage errors (exit 2); ``-c`` and the overrides may come in any order (intermixed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from distmnist.core.config import Config, load_config
from distmnist.core.errors import USAGE_EXIT, alike_on_every_rank, report_errors, say


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (argparse's own code); under a launcher,
    local rank 0 alone prints it (every process parses the same command line)."""

    def error(self, message: str):  # noqa: D401
        say(f"{self.prog}: error: {message} (see {self.prog} --help)", USAGE_EXIT, "local", prefix="")
        sys.exit(USAGE_EXIT)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file, or the name of a shipped one (default, fashion...)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="for scripts: no progress bar, no per-epoch lines (the same as train.quiet=true)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=0.1")


def config_of(args) -> list[str]:
    return [*args.overrides, *(["train.quiet=true"] if args.quiet else [])]


def strategy_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Train the MNIST MLP; config = YAML file + section.key=value overrides.")
    add_config_args(p)
    return p


def parse_strategy_args(strategy: str, argv: list[str] | None = None) -> Config:
    """The config of `python -m distmnist.<strategy> [-c CONFIG] [key=value ...]` (UsageError if bad: every process
    of a launch reads the same arguments and config files, and local rank 0 alone says what is wrong)."""
    args = strategy_parser(f"python -m distmnist.{strategy}").parse_intermixed_args(argv)
    with alike_on_every_rank():
        return load_config(args.config, config_of(args))


@report_errors
def launch_check(strategy: str, argv: list[str]) -> int:
    """For the launch scripts (slurm/train.sh, launch/single_node.sh), before they start any process: read the
    config args exactly as ``python -m distmnist.<strategy>`` will (parse_strategy_args, so the two never
    disagree; a mistake is one line on stderr and exit code 2) and print what the script needs to know:
    ``train.accelerator <TAB> run.dir`` (run.dir resolved; empty when neither the args nor the config set it)."""
    cfg = parse_strategy_args(strategy, argv)
    run_dir = cfg.run_dir(strategy).resolve() if cfg.run.dir is not None else ""
    print(cfg.train.accelerator, run_dir, sep="\t")
    return 0


def strategy_main(strategy: str, train: Callable[[Config], dict]) -> Callable[[list[str] | None], int]:
    """The ``main(argv)`` of a strategy module: parse, train, map errors to exit codes (errors.report_errors)."""

    @report_errors
    def main(argv: list[str] | None = None) -> int:
        train(parse_strategy_args(strategy, argv))
        return 0

    return main
