"""core/config/: schema defaults, YAML file + `section.key=value` overrides, validation that names the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from distmnist.core.config import (
    Config,
    batching,
    config_from_flat,
    flat_dict,
    known_keys,
    load_config,
    parse_override,
    to_yaml,
    trajectory,
)
from distmnist.core.errors import DistMnistError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = ("seed", "default", "fashion", "smoke")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_load_and_match_the_schema():
    cfg = load_config()
    assert cfg.run.name == "default"  # the default run dir's name: no -c, no override (runs/<strategy>-default)
    cfg.run.name = None
    assert cfg == Config()
    assert cfg.data.name == "mnist"
    assert cfg.data.batch_size == 64
    assert cfg.model.hidden == [128, 128]
    assert cfg.train.precision == "32-true"
    assert cfg.run.dir is None
    # every key of the schema is reachable by its dotted name
    flat = flat_dict(cfg)
    assert set(flat) == set(known_keys())
    assert flat["optim.lr"] == cfg.optim.lr


def test_defaults_are_independent_objects():
    a, b = load_config(), load_config()
    a.model.hidden.append(7)
    assert b.model.hidden == [128, 128]


# --------------------------------------------------------------------------------------- file + overrides
def test_yaml_file_then_overrides(tmp_path):
    f = write(
        tmp_path / "c.yaml",
        "seed: 3\ndata:\n  name: synthetic\n  batch_size: 16\noptim:\n  lr: 0.2\n  momentum: 0.5\n",
    )
    cfg = load_config(f)
    assert (cfg.seed, cfg.data.name, cfg.data.batch_size) == (3, "synthetic", 16)
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.5
    # keys the file does not set keep their defaults
    assert cfg.data.eval_batch_size == Config().data.eval_batch_size
    assert cfg.model.hidden == [128, 128]

    cfg = load_config(f, ["optim.lr=0.01", "data.batch_size=8", "seed=11"])
    assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 8 and cfg.seed == 11
    assert cfg.optim.momentum == 0.5  # from the file, untouched by the overrides


def test_later_override_wins():
    cfg = load_config(None, ["optim.lr=0.1", "optim.lr=0.3"])
    assert cfg.optim.lr == 0.3


@pytest.mark.parametrize(
    "item, key, expected",
    [
        ("model.hidden=[256,256]", "model.hidden", [256, 256]),
        ("model.hidden=[512, 64, 32]", "model.hidden", [512, 64, 32]),
        ("run.dir=null", "run.dir", None),
        ("data.train_samples=null", "data.train_samples", None),
        ("data.train_samples=1000", "data.train_samples", 1000),
        ("optim.lr=1e-3", "optim.lr", 1e-3),  # YAML 1.1 reads this as a string
        ("optim.lr=2E-4", "optim.lr", 2e-4),
        ("optim.lr=1", "optim.lr", 1.0),
        ("optim.weight_decay=5e-4", "optim.weight_decay", 5e-4),
        ("dist.timeout_s=60", "dist.timeout_s", 60.0),
        ("train.progress=false", "train.progress", False),
        ("data.download=true", "data.download", True),
        ("data.root=/some/where/data", "data.root", "/some/where/data"),
        ("run.dir=runs/x", "run.dir", "runs/x"),
        ("train.precision=bf16-mixed", "train.precision", "bf16-mixed"),
        ("data.loader=dataloader", "data.loader", "dataloader"),
    ],
)
def test_override_values_are_parsed_as_yaml(item, key, expected):
    cfg = load_config(None, [item])
    value = flat_dict(cfg)[key]
    assert value == expected
    assert type(value) is type(expected)


def test_float_written_without_a_dot_in_a_yaml_file(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "optim:\n  lr: 1e-3\n  weight_decay: 1e-5\n"))
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 1e-5 and isinstance(cfg.optim.weight_decay, float)


def test_parse_override_splits_at_first_equals():
    assert parse_override("run.dir=a=b") == ("run.dir", "a=b")
    assert parse_override(" optim.lr =0.5") == ("optim.lr", 0.5)


def test_empty_yaml_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "empty.yaml", ""))
    assert cfg.run.name == "empty"  # the file's name names the default run dir
    cfg.run.name = None
    assert cfg == Config()


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["model.hidden=[32,16]", "optim.lr=1e-3", "run.dir=somewhere", "seed=5"])
    again = load_config(write(tmp_path / "resolved.yaml", to_yaml(cfg)))
    assert again == cfg


# ------------------------------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_by_path(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"configs/{name}.yaml is missing"
    cfg = load_config(path)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_found_by_name_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the shipped one must be found
    assert load_config(name) == load_config(CONFIGS / f"{name}.yaml")


def test_a_checkout_uses_its_own_shipped_configs():
    # with PYTHONPATH=src the import must not fall back to distmnist.configs: that is another checkout's
    # (through its editable install) or none at all
    from distmnist.core.config import loading

    assert loading._shipped_configs() == CONFIGS.resolve()


def test_seed_config_is_the_tutorial_recipe():
    cfg = load_config(CONFIGS / "seed.yaml")
    assert cfg.data.name == "mnist"
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.momentum == 0.0
    assert cfg.optim.weight_decay == 0.0
    assert cfg.optim.schedule == "constant"  # lr stays 1e-3 for the whole run, as in the tutorial
    assert cfg.data.batch_size == 64
    assert cfg.train.epochs == 5
    assert cfg.model.hidden == [128, 128]
    assert cfg.train.precision == "32-true"


def test_fashion_config_uses_fashion_mnist():
    assert load_config(CONFIGS / "fashion.yaml").data.name == "fashion-mnist"


def test_smoke_config_is_synthetic_and_small():
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert cfg.data.name == "synthetic"
    assert cfg.train.accelerator == "cpu"


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "override, key",
    [
        # unknown keys
        ("bogus=1", "bogus"),
        ("optim.lrr=0.1", "optim.lrr"),
        ("data.bogus=3", "data.bogus"),
        ("nosection.key=1", "nosection.key"),
        ("seed.sub=1", "seed.sub"),  # seed is not a section
        ("data=5", "data"),  # a section, not a value
        # wrong types
        ("data.batch_size=abc", "data.batch_size"),  # string for int
        ("data.batch_size=true", "data.batch_size"),  # bool for int
        ("seed=false", "seed"),
        ("train.epochs=2.5", "train.epochs"),
        ("optim.lr=[1,2]", "optim.lr"),  # list for float
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("train.progress=3", "train.progress"),
        ("model.hidden=abc", "model.hidden"),
        ("model.hidden=[128,abc]", "model.hidden"),
        ("model.hidden=[128,true]", "model.hidden"),
        ("data.name=[mnist]", "data.name"),
        # impossible values
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=-4", "data.batch_size"),
        ("data.eval_batch_size=0", "data.eval_batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.train_samples=0", "data.train_samples"),
        ("train.epochs=0", "train.epochs"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("dist.timeout_s=0", "dist.timeout_s"),
        ("data.name=cifar10", "data.name"),
        ("train.precision=fp8", "train.precision"),
        ("train.precision=16", "train.precision"),
        ("train.accelerator=tpu", "train.accelerator"),
        ("data.loader=magic", "data.loader"),
        ("optim.name=lbfgs", "optim.name"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.momentum=1", "optim.momentum"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("optim.momentum=-0.1", "optim.momentum"),
        ("model.hidden=[]", "model.hidden"),
        ("model.hidden=[128,0]", "model.hidden"),
        ("seed=-1", "seed"),
        ("run.dir=' '", "run.dir"),
    ],
)
def test_bad_override_raises_naming_the_key(override, key):
    with pytest.raises(DistMnistError) as info:
        load_config(None, [override])
    assert key in str(info.value)
    assert "\n" not in str(info.value).strip()


@pytest.mark.parametrize(
    "text, key",
    [
        ("bogus: 1\n", "bogus"),
        ("data:\n  bogus: 1\n", "data.bogus"),
        ("optim:\n  lr: fast\n", "optim.lr"),
        ("data:\n  batch_size: 0\n", "data.batch_size"),
        ("data:\n  name: imagenet\n", "data.name"),
        ("model:\n  hidden: []\n", "model.hidden"),
    ],
)
def test_bad_key_in_yaml_file_raises_naming_the_key(tmp_path, text, key):
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(DistMnistError) as info:
        load_config(f)
    assert key in str(info.value)


def test_16_mixed_on_cpu_is_refused():
    with pytest.raises(DistMnistError) as info:
        load_config(None, ["train.precision=16-mixed", "train.accelerator=cpu"])
    assert "16-mixed" in str(info.value)
    assert "train.precision" in str(info.value)
    # bf16-mixed on CPU is fine, and 16-mixed is not refused by the config alone when a GPU may be there
    assert (
        load_config(None, ["train.precision=bf16-mixed", "train.accelerator=cpu"]).train.precision
        == "bf16-mixed"
    )
    assert (
        load_config(None, ["train.precision=16-mixed", "train.accelerator=cuda"]).train.precision
        == "16-mixed"
    )


def test_missing_config_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(DistMnistError) as info:
        load_config(missing)
    assert "nope" in str(info.value)
    with pytest.raises(DistMnistError) as info:
        load_config("no-such-shipped-config")
    assert "no-such-shipped-config" in str(info.value)


@pytest.mark.parametrize(
    "name, text",
    [("broken.yaml", "data: [unclosed\noptim:\n  lr: 0.1\n"), ("list.yaml", "- seed: 1\n- data: {}\n"),
     ("scalar.yaml", "just a string\n")],
    ids=["invalid-yaml", "a-list", "a-scalar"],
)
def test_yaml_file_that_is_not_a_config_mapping(tmp_path, name, text):
    f = write(tmp_path / name, text)
    with pytest.raises(DistMnistError) as info:
        load_config(f)
    assert name in str(info.value)


DEEP = "[" * 2000  # PyYAML's parser recurses once per level: 2000 levels exhaust Python's stack


@pytest.mark.parametrize(
    "text", [DEEP, f"model:\n  hidden: {DEEP}\n", "{a: " * 2000], ids=["list", "in-a-section", "mapping"]
)
def test_deeply_nested_yaml_file_is_one_line_naming_it(tmp_path, text):
    f = write(tmp_path / "deep.yaml", text)
    with pytest.raises(DistMnistError) as info:
        load_config(f)
    assert str(f) in str(info.value) and "nest" in str(info.value)
    assert "\n" not in str(info.value).strip()


@pytest.mark.parametrize("key", ["model.hidden", "optim.lr", "run.dir"])
def test_deeply_nested_override_is_one_line_naming_the_key(key):
    with pytest.raises(DistMnistError) as info:
        load_config(None, [f"{key}={DEEP}"])
    assert key in str(info.value) and "nest" in str(info.value)
    assert "\n" not in str(info.value).strip() and len(str(info.value)) < 300  # the value is not repeated


@pytest.mark.parametrize("item", ["optim.lr", "optim.lr:0.1", "=0.1"])
def test_override_without_key_value(item):
    with pytest.raises(DistMnistError) as info:
        load_config(None, [item])
    assert item in str(info.value)


def test_config_from_flat_validates():
    assert config_from_flat({"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(DistMnistError, match="optim.lr"):
        config_from_flat({"optim.lr": -1})


# ------------------------------------------------------------------------------------------- trajectory
def test_trajectory_includes_epochs_only_with_a_schedule():
    cosine = load_config(None, ["optim.schedule=cosine"])
    constant = load_config(None, ["optim.schedule=constant"])
    assert "train.epochs" in trajectory(cosine)
    assert trajectory(cosine)["train.epochs"] == cosine.train.epochs
    assert "train.epochs" not in trajectory(constant)
    # the keys that decide the run are always there (the global batch is checked by run.py: data.batch_size and the
    # accumulation may change with the number of processes as long as it holds)
    for key in ("seed", "data.name", "data.global_batch_size", "model.hidden", "optim.lr", "optim.momentum"):
        assert key in trajectory(constant) and key in trajectory(cosine)
    assert "data.batch_size" not in trajectory(constant)


def test_trajectory_ignores_where_and_how_long_but_not_what():
    base = load_config(None, ["optim.schedule=constant"])
    same = load_config(
        None,
        [
            "optim.schedule=constant",
            "run.dir=elsewhere",
            "train.epochs=9",
            "data.root=/x",
            "train.progress=false",
        ],
    )
    assert trajectory(same) == trajectory(base)
    for change in ("optim.lr=0.5", "seed=1", "model.hidden=[64]", "data.global_batch_size=128"):
        assert trajectory(load_config(None, ["optim.schedule=constant", change])) != trajectory(base)
    # with a cosine schedule the length of the run changes the trajectory
    a = load_config(None, ["optim.schedule=cosine", "train.epochs=5"])
    b = load_config(None, ["optim.schedule=cosine", "train.epochs=6"])
    assert trajectory(a) != trajectory(b)


def test_every_schema_key_accepts_its_own_default_as_override():
    cfg = Config()
    flat = flat_dict(cfg)
    import yaml

    items = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in flat.items()
        if v is not None
    ]
    cfg.run.name = "default"  # filled in by load_config
    assert load_config(None, items) == cfg
    assert dataclasses.asdict(load_config(None, items)) == cfg.to_dict()


# ------------------------------------------------------------------ global batch and accumulation (issue 16)
@pytest.mark.parametrize(
    "overrides, world, want",
    [
        ([], 2, (64, 1, 128, False)),  # no global batch: batch x world
        (["train.accumulate_grad_batches=3"], 2, (64, 3, 384, False)),
        (["data.global_batch_size=192", "data.batch_size=96"], 2, (96, 1, 192, True)),
        (["data.global_batch_size=192", "data.batch_size=64"], 3, (64, 1, 192, True)),
        (["data.global_batch_size=192", "data.batch_size=96"], 1, (96, 2, 192, True)),  # accumulation derived
        (["data.global_batch_size=192", "data.batch_size=48", "train.accumulate_grad_batches=2"], 2,
         (48, 2, 192, True)),
    ],
)
def test_batching_holds_the_global_batch(overrides, world, want):
    b = batching(load_config(None, overrides), world)
    assert (b.batch_size, b.accumulate, b.global_batch, b.fixed) == want
    assert b.step_batch * world == b.global_batch


@pytest.mark.parametrize(
    "overrides, world, words",
    [
        (["data.global_batch_size=192"], 5, "cannot be split over 5 processes"),
        (["data.global_batch_size=192", "data.batch_size=100"], 1,
         "data.batch_size=96 train.accumulate_grad_batches=2"),
        (["data.global_batch_size=192", "data.batch_size=96", "train.accumulate_grad_batches=1"], 1,
         "needs data.batch_size x train.accumulate_grad_batches = 192"),
        (["data.global_batch_size=192", "data.batch_size=256"], 1,
         "data.batch_size=192 train.accumulate_grad_batches=1"),
    ],
)
def test_a_global_batch_that_cannot_hold_is_one_line_saying_what_to_change(overrides, world, words):
    with pytest.raises(DistMnistError) as err:
        batching(load_config(None, overrides), world)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["data.global_batch_size", "train.accumulate_grad_batches"])
def test_global_batch_and_accumulation_must_be_positive(key):
    with pytest.raises(DistMnistError, match=key):
        load_config(None, [f"{key}=0"])


# ------------------------------------------------------------------------------------------------ run names
def test_default_run_dir_is_named_after_the_config_and_what_the_overrides_change():
    """runs/<strategy>-<config name>[-<digest>]: the same command finds the same dir, another config another one."""
    assert load_config("smoke").run_dir("fabric") == Path("runs/fabric-smoke")
    assert load_config().run_dir("ddp") == Path("runs/ddp-default")
    # an override equal to the file's value changes nothing; one that changes the trajectory gets a digest
    assert load_config("smoke", ["optim.lr=0.05"]).run.name == "smoke"
    lr = load_config("smoke", ["optim.lr=0.1"]).run.name
    assert re.fullmatch(r"smoke-[0-9a-f]{8}", lr) and lr == load_config("smoke", ["optim.lr=0.1"]).run.name
    assert load_config("smoke", ["optim.lr=0.2"]).run.name != lr
    # what does not change the run's arithmetic keeps the name: a constant schedule continues over more epochs
    assert load_config("smoke", ["train.epochs=7", "checkpoint.keep=5", "train.quiet=true"]).run.name == "smoke"
    # ... a cosine schedule spans train.epochs, so more epochs are another run; so are FSDP and another batch
    assert load_config("fashion", ["train.epochs=9"]).run.name != "fashion"
    assert load_config("smoke", ["train.parallel=fsdp"]).run.name != "smoke"
    assert load_config("smoke", ["data.batch_size=16"]).run.name != "smoke"
    # explicit choices win
    assert load_config("smoke", ["optim.lr=0.1", "run.name=mine"]).run_dir("ddp") == Path("runs/ddp-mine")
    assert load_config("smoke", ["run.dir=elsewhere"]).run_dir("ddp") == Path("elsewhere")


def test_resolved_config_yaml_keeps_the_run_name(tmp_path):
    cfg = load_config("smoke", ["optim.lr=0.1"])
    again = load_config(write(tmp_path / "config.yaml", to_yaml(cfg)))
    assert again.run.name == cfg.run.name and again.run_dir("ddp") == cfg.run_dir("ddp")


@pytest.mark.parametrize("name", ["a/b", "", "..", "."])
def test_run_name_that_is_not_a_folder_name_is_refused(name):
    with pytest.raises(DistMnistError, match="run.name"):
        load_config(None, [f"run.name={name}"])
