"""The package as pip installs it, away from the checkout: shipped configs, entry points, every module.

The wheel is built with `pip wheel --no-build-isolation` from a copy of what it is made of (pyproject.toml,
README.md, configs/, src/): setuptools builds in the source folder, and a build/ left in the checkout would put
stale modules into later wheels. It is installed with `pip install --target` into a temp folder, and every
command runs in a fresh folder outside the checkout with PYTHONPATH set to that folder only. The same copy is
also installed editable (`pip install -e`), where distmnist.configs must map to configs/.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import REPO, child_env, ok

pytestmark = pytest.mark.slow

TIMEOUT = 240
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet"]


@dataclass(frozen=True)
class Installed:
    project: Path  # the copy the wheel is built from
    wheel: Path
    site: Path  # the --target folder: the only entry of PYTHONPATH
    cwd: Path  # a fresh folder outside the checkout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    project = tmp / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    # examples/ ships with the repo, not in the wheel: copied here so that the wheel test can tell
    for name in ("configs", "src", "examples"):
        shutil.copytree(REPO / name, project / name, ignore=skip)
    ok(subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(project)],
        capture_output=True, text=True, timeout=TIMEOUT,
    ))
    (wheel,) = (tmp / "dist").glob("distmnist-*.whl")
    ok(subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
        capture_output=True, text=True, timeout=TIMEOUT,
    ))
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    assert not cwd.resolve().is_relative_to(REPO)
    return Installed(project=project, wheel=wheel, site=tmp / "site", cwd=cwd)


def start(installed: Installed, *argv: str) -> subprocess.Popen:
    """`argv` in installed.cwd, importing distmnist from the installed wheel only."""
    return subprocess.Popen(
        list(argv), cwd=installed.cwd, env=child_env(PYTHONPATH=str(installed.site)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return ok(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def run(installed: Installed, *args: str) -> subprocess.CompletedProcess:
    """`python args...` in installed.cwd, importing distmnist from the installed wheel only; must exit 0."""
    return finish(start(installed, sys.executable, *args))


def test_wheel_holds_the_package_the_configs_and_the_entry_point(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = wheel.read(entry_points).decode()
    assert "distmnist/configs/smoke.yaml" in names
    assert not [n for n in names if "minimal" in n or n.startswith("examples")], "examples/ is in the wheel"
    shipped = {f"distmnist/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    # packages are listed by hand in pyproject.toml (configs/ lives outside src/): every module must be there
    modules = {f"distmnist/{p.relative_to(REPO / 'src' / 'distmnist').as_posix()}"
               for p in (REPO / "src" / "distmnist").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel (pyproject.toml packages?): {sorted(modules - names)}"
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert parser["console_scripts"]["distmnist"] == "distmnist.tools.cli:entry"


def test_installed_package_and_configs_come_from_the_wheel(installed):
    proc = run(installed, "-c", (
        "import distmnist\n"
        "from distmnist.core.config import resolve_path\n"
        "from distmnist.core.errors import DistMnistError\n"
        "print(distmnist.__file__)\n"
        "print(resolve_path('smoke'))\n"
        "try:\n"
        "    resolve_path('no-such-config')\n"
        "except DistMnistError as err:\n"
        "    print(err)\n"
    ))
    package, smoke, error = proc.stdout.splitlines()
    site = installed.site.resolve()
    assert Path(package).resolve() == site / "distmnist" / "__init__.py"
    assert Path(smoke).resolve() == site / "distmnist" / "configs" / "smoke.yaml"
    assert error == "config file no-such-config does not exist (shipped configs: default, fashion, fast, seed, smoke)"


def test_installed_wheel_trains_with_a_shipped_config(installed):
    run_dir = installed.cwd / "runs" / "smoke"
    run(installed, "-m", "distmnist.ddp", "-c", "smoke", f"run.dir={run_dir}", "--quiet")
    assert (run_dir / "model.pt").is_file()


def test_installed_cli_and_console_script(installed):
    # the console script (pip install --target puts it in bin/) and `python -m distmnist`, side by side
    procs = [start(installed, str(installed.site / "bin" / "distmnist"), "bench", "--help"),
             start(installed, sys.executable, "-m", "distmnist", "bench", "--help")]
    for proc in [finish(p) for p in procs]:
        assert proc.stdout.startswith("usage: distmnist bench"), proc.stdout[:200]


def test_editable_install_finds_the_shipped_configs(installed):
    """`pip install -e` maps distmnist.configs to configs/ (which needs its __init__.py: pypa/setuptools#4943)."""
    editable = installed.project.parent / "editable"
    ok(subprocess.run(
        [*PIP, "install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(editable),
         "-e", str(installed.project)],
        capture_output=True, text=True, timeout=TIMEOUT,
    ))
    # -S: this environment's site-packages (torch, yaml) without its .pth files, which may hold an editable
    # install of the checkout; the editable install's folder with its .pth (the import hook) first: its finder
    # module has the same name as the checkout's editable finder in site-packages
    libs = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    code = (
        f"import site, sys\nsite.addsitedir({str(editable)!r})\nsys.path += {libs!r}\n"
        "import importlib.resources, distmnist\n"
        "from distmnist.core.config import resolve_path\n"
        "print(distmnist.__file__)\n"
        "print(importlib.resources.files('distmnist.configs').joinpath('smoke.yaml'))\n"
        "print(resolve_path('smoke'))\n"
    )
    env = child_env()
    env.pop("PYTHONPATH", None)
    proc = ok(subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=installed.cwd, env=env, capture_output=True, text=True,
        timeout=TIMEOUT,
    ))
    package, resource, smoke = (Path(line).resolve() for line in proc.stdout.splitlines())
    project = installed.project.resolve()
    assert package == project / "src" / "distmnist" / "__init__.py"
    assert resource == smoke == project / "configs" / "smoke.yaml"


def test_version_flag_prints_the_package_version_of_pyproject():
    """`distmnist --version`: the version pyproject.toml declares, exit 0, nothing else printed."""
    declared = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                    if line.startswith("version = "))
    proc = ok(subprocess.run([sys.executable, "-m", "distmnist.tools.cli", "--version"], cwd=REPO,
                             env=child_env(), capture_output=True, text=True, timeout=60))
    assert proc.stdout.strip() == f"distmnist {declared}", proc.stdout
