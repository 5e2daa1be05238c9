"""`distmnist compare`: two real short runs of different strategies side by side, as a user runs it (subprocesses),
plus the run dirs it must refuse: missing, empty, damaged metrics.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from procs import child_env

from distmnist.core import tblog
from distmnist.tools import compare

_script = Path(sysconfig.get_path("scripts")) / "distmnist"
DISTMNIST = [str(_script)] if _script.is_file() else [sys.executable, "-m", "distmnist"]
COMPARE_MODULE = [sys.executable, "-m", "distmnist.tools.compare"]
RUNS = {  # run dir name: (strategy, extra overrides)
    "a": ("ddp", []),
    "b": ("fabric", ["train.epochs=3"]),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=120)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two finished smoke runs, ddp (2 epochs) and fabric (3 epochs), trained at the same time."""
    root = tmp_path_factory.mktemp("compare")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"distmnist.{strategy}", "-c", "smoke", *extra, f"run.dir={root / name}"],
            cwd=root, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, (strategy, extra) in RUNS.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return root


def metrics(root: Path, name: str) -> dict:
    return json.loads((root / name / "metrics.json").read_text())


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by run name (the header and the dashes line skipped)."""
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "strategy", "world"], stdout
    assert set(lines[1].replace(" ", "")) == {"-"}, stdout
    rows = {}
    for line in lines[2:]:
        if line.startswith("wrote "):
            break
        cells = line.split()
        if cells[1] == "(running)":
            cells = [f"{cells[0]} {cells[1]}", *cells[2:]]
        rows[cells[0]] = cells
    return rows


def check_png(path: Path) -> None:
    from PIL import Image, ImageStat

    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        width, height = img.size
        assert 900 <= width <= 2000 and 350 <= height <= 1000, img.size  # 10 x 4.6 in at 120 dpi
        rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "too few colours: blank or nearly"
    assert min(ImageStat.Stat(rgb).stddev) > 20, "no contrast: blank or nearly"
    # lines of several colours, not only text: at least three pixels of strongly saturated colour each
    saturated = [c for n, c in colours if max(c) - min(c) > 120 and n > 20]
    assert len(saturated) >= 3, saturated[:10]


@pytest.mark.slow
def test_table_and_png_of_two_real_runs(runs: Path):
    out = runs / "cmp.png"
    proc = run([*DISTMNIST, "compare", "a", "b", "--out", str(out)], cwd=runs)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert proc.stderr.strip() == ""
    rows = table_rows(proc.stdout)
    assert list(rows) == ["a", "b"], proc.stdout
    for name, (strategy, _) in RUNS.items():
        m = metrics(runs, name)
        cells = rows[name]
        # the data set beside the strategy: a synthetic run never sits unmarked next to a Fashion-MNIST one
        assert cells[1:7] == [strategy, str(m["world_size"]), m["dataset"], m["precision"], m["device"],
                              str(m["epochs"])]
        assert cells[7] == f"{m['val_acc']:.4f}" and cells[8] == f"{m['val_loss']:.4f}"
        mean_epoch = sum(h["epoch_s"] for h in m["history"]) / len(m["history"])
        assert cells[9] == f"{mean_epoch:.3f}"
        assert cells[10] == f"{m['train_samples_per_sec']:,.0f}" and cells[11] == f"{m['wall_s']:.1f}"
    assert [metrics(runs, n)["epochs"] for n in RUNS] == [2, 3]
    assert f"wrote {out}" in proc.stdout
    check_png(out)


@pytest.mark.slow
def test_json_matches_metrics(runs: Path):
    proc = run([*COMPARE_MODULE, str(runs / "b"), str(runs / "a"), "--json"], cwd=runs)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["run"] for r in rows] == ["b", "a"]
    for r in rows:
        m = metrics(runs, r["run"])
        assert r["status"] == "done"
        for key in ("strategy", "world_size", "precision", "device", "epochs", "global_step", "val_acc", "val_loss",
                    "wall_s"):
            assert r[key] == m[key], key
        assert r["samples_per_sec"] == m["train_samples_per_sec"]
        assert r["s_per_epoch"] == pytest.approx(sum(h["epoch_s"] for h in m["history"]) / m["epochs"])


@pytest.mark.slow
def test_unfinished_run_is_read_from_its_events(runs: Path, tmp_path: Path):
    """No metrics.json yet: the row comes from tb/ and says (running); the plot still has its line."""
    shutil.copytree(runs / "b", tmp_path / "b")
    (tmp_path / "b" / "metrics.json").unlink()
    m = metrics(runs, "b")
    out = tmp_path / "plots" / "cmp.png"  # a folder that does not exist yet
    proc = run([*DISTMNIST, "compare", str(runs / "a"), str(tmp_path / "b"), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    cells = rows["b (running)"]
    assert cells[1:8] == ["fabric", "1", m["dataset"], "32-true", "cpu", "3", f"{m['val_acc']:.4f}"]
    assert cells[9] == "-"  # s/epoch is not in the events
    assert float(cells[10].replace(",", "")) == pytest.approx(m["train_samples_per_sec"], rel=1e-3)
    check_png(out)
    val_acc = tblog.read_scalars(tmp_path / "b")["val/acc"]
    running = compare.load_run(str(tmp_path / "b"))
    assert running.status == "running" and running.by_step == val_acc
    assert [t for t, _ in running.by_wall] == sorted(t for t, _ in running.by_wall)


@pytest.mark.slow
def test_bad_run_dirs_are_named_and_the_rest_compared(runs: Path, tmp_path: Path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text('{"strategy": "ddp", "world_si')
    proc = run([*DISTMNIST, "compare", str(runs / "a"), str(tmp_path / "missing"), str(tmp_path / "broken"),
                "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert [r["run"] for r in json.loads(proc.stdout)] == ["a"]
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].startswith("distmnist: warning: skipping ") and "missing: no such run dir" in warnings[0]
    assert "broken: metrics.json is damaged (not JSON" in warnings[1]


# ------------------------------------------------------------------------------- no training needed
DAMAGED = {
    "truncated": '{"strategy": "ddp", "world_size": 1, "epo',
    "a list": "[1, 2, 3]",
    "no history": json.dumps({"strategy": "ddp", "world_size": 1, "epochs": 2}),
    "bad history": json.dumps({"strategy": "ddp", "world_size": 1, "epochs": 1, "history": [{"epoch": 1}]}),
    "bad val_acc": json.dumps({"strategy": "ddp", "world_size": 1, "epochs": 0, "history": [], "val_acc": "high"}),
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_metrics_json_alone_is_an_error(tmp_path: Path, capsys, content: str):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text(content)
    assert compare.main([str(tmp_path / "r")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmnist: error: nothing to compare: ")
    assert f"{tmp_path / 'r'}: metrics.json is damaged" in lines[0]


def test_binary_metrics_json_is_an_error(tmp_path: Path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_bytes(b"\x89PNG\xff\xfe\x00garbage")
    assert compare.main([str(tmp_path / "r")]) == 2
    assert "metrics.json is damaged (not text)" in capsys.readouterr().err


GOOD = {"strategy": "ddp", "world_size": 1, "epochs": 1, "precision": "32-true", "device": "cpu", "global_step": 10,
        "val_acc": 0.5, "val_loss": 0.7, "train_samples_per_sec": 100.0, "wall_s": 3.0,
        "history": [{"epoch": 1, "global_step": 10, "val_acc": 0.5, "wall_s": 1.0, "epoch_s": 1.0}]}


def good_but(history: dict | None = None, **top) -> str:
    """GOOD's metrics.json text with some of its values replaced."""
    return json.dumps({**GOOD, **top, "history": [{**GOOD["history"][0], **(history or {})}]})


# metrics.json texts that parse (or nearly) but used to stop the whole comparison with a traceback
ODD = {
    "deep_list": "[" * 100_000 + "]" * 100_000,  # json's decoder recurses once per level: RecursionError
    "deep_object": '{"a": ' * 100_000 + "1" + "}" * 100_000,
    "long_int": json.dumps(GOOD).replace('"world_size": 1', '"world_size": ' + "9" * 5000),  # over 4300 digits
    "huge_val_acc": good_but(val_acc=10**400),  # no float holds it: the table's format() overflowed
    "huge_epoch_s": good_but(history={"epoch_s": 10**400}),
    "huge_curve": good_but(history={"val_acc": 1e308}),  # the plot's percent axis overflowed
    "precision_list": good_but(precision=["32-true"]),  # the table wants text
    "device_object": good_but(device={"cpu": 1}),
}


def test_odd_metrics_json_is_named_and_the_rest_compared(tmp_path: Path):
    for name, text in {"good": json.dumps(GOOD), **ODD}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    (tmp_path / "a_file").write_text("x")
    bad = [*ODD, "missing", "a_file"]
    proc = run([*DISTMNIST, "compare", "good", *bad, "--out", "cmp.png"], cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(table_rows(proc.stdout)) == ["good"], proc.stdout
    check_png(tmp_path / "cmp.png")
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == len(bad), proc.stderr[-3000:]
    for name, line in zip(bad, warnings, strict=True):
        assert line.startswith(f"distmnist: warning: skipping {name}: ") and len(line) < 300, line
    assert all("metrics.json is damaged" in line for line in warnings[: len(ODD)]), warnings
    assert "nested too deeply" in warnings[0] and "nested too deeply" in warnings[1], warnings


def test_only_odd_metrics_json_is_one_line_exit_2(tmp_path: Path, capsys):
    for name, text in ODD.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    assert compare.main([str(tmp_path / name) for name in ODD]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmnist: error: nothing to compare: "), lines
    assert lines[0].count("metrics.json is damaged") == len(ODD)


def test_no_usable_run_dir_is_one_line_exit_2(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    proc = run([*DISTMNIST, "compare", "missing", "empty", "file", "--out", "x.png"], cwd=tmp_path)
    assert proc.returncode == 2
    no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("distmnist: error: nothing to compare: ")
    assert "missing: no such run dir" in line and "empty: no metrics.json and no TensorBoard events" in line
    assert "file: not a folder" in line
    assert proc.stdout == "" and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: RUN_DIR"),
    (["r", "--out", "plot.jpg"], "--out plot.jpg: give a .png file name"),
])
def test_usage_errors(tmp_path: Path, capsys, argv: list[str], expected: str):
    try:
        code = compare.main(argv)
    except SystemExit as stop:  # argparse's errors (through cli.Parser: one line, code 2)
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_help_names_tensorboard_logdir(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    assert "tensorboard --logdir runs" in capsys.readouterr().out
    assert "tensorboard --logdir runs" in compare.__doc__
