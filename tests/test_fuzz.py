"""Random and garbage input to the config parser and the IDX reader: a clean DistMnistError or a valid result,
never another exception -- and at the command line, one line and exit code 2, never a traceback."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmnist.core.config import Config, known_keys, load_config, parse_override
from distmnist.core.data import parse_idx
from distmnist.core.errors import DistMnistError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20),
)
yaml_values = st.recursive(
    yaml_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(st.dictionaries(st.sampled_from([*known_keys(), "data", "optim", "x.y", "seed.z", ""]), yaml_values, max_size=6))
def test_overrides_give_a_config_or_a_clean_error(values):
    overrides = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items()]
    try:
        cfg = load_config(None, overrides)
    except DistMnistError as err:
        assert str(err).strip() and "\n" not in str(err).strip()
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(st.text(max_size=300))
def test_any_yaml_text_gives_a_config_or_a_clean_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except DistMnistError:
        pass


@FUZZ
@given(st.text(max_size=40))
def test_any_override_string_parses_or_fails_cleanly(item):
    try:
        key, _ = parse_override(item)
    except DistMnistError:
        return
    assert key


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_are_never_more_than_a_clean_idx_error(raw):
    try:
        t = parse_idx(raw)
    except DistMnistError:
        return
    assert t.dtype == torch.uint8


@FUZZ
@given(st.integers(1, 3), st.lists(st.integers(0, 40), min_size=3, max_size=3), st.integers(-50, 50))
def test_valid_headers_with_wrong_lengths(ndim, dims, delta):
    dims = dims[:ndim]
    body = bytes(max(0, _prod(dims) + delta))
    raw = struct.pack(">HBB", 0, 0x08, ndim) + struct.pack(f">{ndim}I", *dims) + body
    try:
        t = parse_idx(raw)
    except DistMnistError:
        assert len(body) != _prod(dims)  # refused only when the length is wrong
        return
    assert len(body) == _prod(dims) and list(t.shape) == dims


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


@pytest.mark.slow  # a CLI process per input
@pytest.mark.timeout(120)
def test_garbage_config_file_at_the_cli_is_one_line(tmp_path):
    import os

    for i, blob in enumerate([os.urandom(300), b"data: [unclosed", b"- a\n- list\n", b"\xff\xfe\x00garbage"]):
        cfg = tmp_path / f"bad{i}.yaml"
        cfg.write_bytes(blob)
        proc = subprocess.run([sys.executable, "-m", "distmnist", "train", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow  # a CLI process per input
@pytest.mark.timeout(120)
def test_deeply_nested_config_at_the_cli_is_one_line(tmp_path):
    """2000 nested lists in a config file or an override: one line naming the file or the key, exit 2."""
    deep = "[" * 2000
    (tmp_path / "deep.yaml").write_text(f"model:\n  hidden: {deep}\n")
    for args, named in ((["-c", "deep.yaml"], "deep.yaml"), ([f"model.hidden={deep}"], "model.hidden")):
        proc = subprocess.run([sys.executable, "-m", "distmnist", "train", *args],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("distmnist: error: ") and named in lines[0], proc.stderr[-2000:]
