"""Docs that cannot drift: README.md and docs/*.md name only links, files, test names, config keys and command lines
that exist, the config page documents every key of the schema, and the tour's code is the code of ddp.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from procs import REPO

from distmnist.core.args import parse_strategy_args
from distmnist.core.config import known_keys, load_config
from distmnist.core.errors import DistMnistError

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = ("seed", "data", "model", "optim", "train", "checkpoint", "dist", "run")
# a path the docs name, in backticks: a repo folder, or a module path under src/distmnist/
FOLDERS = "src|tests|launch|slurm|configs|docs|examples|core|lightning|tools"
PATH = re.compile(rf"`((?:{FOLDERS})/[\w./*\-]+(?:::[\w*\[\]\-]+)?)")
KEY = re.compile(r"`((?:{})\.[a-z_]+)(?:=[^`]*)?`".format("|".join(SECTIONS[1:])))


def text(page: Path) -> str:
    return page.read_text()


def code_blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text(page), flags=re.S)


def resolve(path: str) -> Path:
    for base in (REPO, REPO / "src" / "distmnist"):
        if (base / path.split("/")[0]).exists():
            return base / path
    return REPO / path


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_exists(page):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{page.name}: broken links {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_and_test_the_docs_name_exists(page):
    missing = []
    for ref in PATH.findall(text(page)):
        path, _, test = ref.partition("::")
        path = path.rstrip(".")
        if "<" in path:
            continue
        hits = sorted(REPO.glob(path)) + sorted((REPO / "src" / "distmnist").glob(path)) if "*" in path else []
        target = hits[0] if hits else resolve(path)
        if not target.exists():
            missing.append(ref)
        elif test:
            name = re.escape(test.split("[")[0]).replace(r"\*", r"\w*")
            if not re.search(rf"^def {name}\w*\(", target.read_text(), flags=re.M):
                missing.append(ref)
    assert not missing, f"{page.name}: names that do not exist {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_the_docs_name_exists(page):
    import importlib

    keys = set(known_keys())

    def other_name(dotted: str) -> bool:  # model.pt (a file), dist.init_process_group (a function): not keys
        module, _, name = dotted.partition(".")
        if dotted == "model.pt":
            return True
        try:
            return hasattr(importlib.import_module(f"distmnist.core.{module}"), name)
        except ImportError:
            return False

    unknown = sorted({k for k in KEY.findall(text(page)) if k not in keys and not other_name(k)})
    assert not unknown, f"{page.name}: config keys not in the schema {unknown}"


def test_the_config_page_documents_every_key_of_the_schema():
    page = text(REPO / "docs" / "config.md")
    undocumented = [k for k in known_keys() if f"`{k}`" not in page]
    assert not undocumented, f"docs/config.md does not name {undocumented}"


LAUNCHER_OPTIONS = ("--strategy", "--nproc", "--nproc-per-node", "--nnodes", "--endpoint")


def commands(page: Path) -> list[str]:
    lines = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#") and not re.search(r"[$<>|&;]|\.\.\.", line):
                lines.append(line)
    return lines


def check_command(line: str) -> None:
    """Parse a documented command line as distmnist would (nothing trains): DistMnistError or SystemExit if bad."""
    words = shlex.split(line)
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["torchrun"] or words[:3] == ["python", "-m", "torch.distributed.run"]:
        words = words[words.index("-m") + 1:] if "-m" in words[1:] else []
        words = ["python", "-m", *words] if words else []
    if words[:2] == ["python", "-m"] and len(words) > 2:
        module = words[2].removeprefix("distmnist.")
        if module in ("ddp", "fabric", "trainer"):
            parse_strategy_args(module, words[3:])
        return
    if words[:1] == ["distmnist"] and len(words) > 1:
        sub, rest = words[1], words[2:]
        if sub == "train":
            from distmnist.tools.cli import train_parser

            args = train_parser().parse_intermixed_args(rest)
            load_config(args.config, args.overrides)
        elif sub == "bench":
            from distmnist.tools import bench

            bench.parse_args(rest)
        elif sub == "compare":
            from distmnist.tools import compare

            compare.parse_args(rest)
        elif sub == "doctor":
            from distmnist.tools import doctor

            args = doctor.parser().parse_args(rest)
            if args.endpoint is not None:
                doctor.parse_endpoint(args.endpoint)
        elif sub == "data":
            from distmnist.tools.cli import build_parser

            build_parser().parse_args(words[1:])
        return
    scripts = [i for i, w in enumerate(words) if w.startswith(("launch/", "slurm/")) and w.endswith(".sh")]
    if words and words[0] in ("sbatch", *(words[i] for i in scripts[:1])) and scripts:
        assert (REPO / words[scripts[0]]).is_file(), line
        rest, strategy, config_args = words[scripts[0] + 1:], "ddp", []
        while rest:  # the launchers' own options, then the config args (after `--`, or from the first other word)
            word = rest.pop(0)
            if word in LAUNCHER_OPTIONS and rest:
                value = rest.pop(0)
                strategy = value if word == "--strategy" else strategy
            elif word != "--":
                config_args.append(word)
        parse_strategy_args(strategy, config_args)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_the_docs_show_parses(page):
    bad = []
    for line in commands(page):
        try:
            check_command(line)
        except (DistMnistError, SystemExit, AssertionError, ValueError) as err:
            bad.append(f"{line}  ->  {err}")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


def test_the_tour_is_the_code_of_ddp_py_lines_elided_none_changed():
    (tour,) = code_blocks(REPO / "README.md", "python")[:1]
    source = (REPO / "src" / "distmnist" / "ddp.py").read_text().splitlines()
    at = 0
    for line in tour.splitlines():
        if line.strip() in ("...", ""):
            continue
        try:
            at = source.index(line, at) + 1  # in order, verbatim
        except ValueError:
            pytest.fail(f"the README tour shows a line that ddp.py does not have (after line {at}): {line!r}")
