"""One config schema for every strategy: YAML file + ``section.key=value`` overrides.

    cfg = load_config("configs/fashion.yaml", ["optim.lr=0.1", "model.hidden=[256,256]"])

Values on the command line are parsed as YAML scalars/lists, then checked against the schema: an
unknown key, a wrong type or an impossible value raises :class:`DistMnistError` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distmnist.core.errors import DistMnistError

DATASETS = ("mnist", "fashion-mnist", "synthetic")
LOADERS = ("resident", "dataloader")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "trainer", "fabric")
PARALLEL = ("ddp", "fsdp")

def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A schema field that must be one of `choices` (validate checks it)."""
    return field(default=default, metadata={"choices": choices})


def positive(default: Any, zero: bool = False) -> Any:
    """A schema field holding a finite number greater than zero (`zero`: or zero); None, where it is the default,
    means unset (validate checks it)."""
    return field(default=default, metadata={"positive": "zero or more" if zero else "greater than zero"})


# The shipped configs of the checkout this file is in (<repo>/src/distmnist/core/config.py -> <repo>/configs).
# Installed, they are the package distmnist.configs (see resolve_path).
SHIPPED_CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@dataclass
class DataConfig:
    name: str = one_of("mnist", DATASETS)
    root: str = "data"
    # per process (per micro-batch); global batch = batch_size * world size * accumulation
    batch_size: int = positive(64)
    # the optimizer's batch over all processes; when set, it holds whatever the number of processes (the accumulation
    # is derived when not given) and every optimizer step has exactly this many samples: resume on another number of
    # processes is exact (README, Preemption and elastic resume)
    global_batch_size: int | None = positive(None)
    eval_batch_size: int = positive(1000)
    loader: str = one_of("resident", LOADERS)  # resident: whole split as one tensor on the device; dataloader: classic
    num_workers: int = positive(2, zero=True)  # only for loader=dataloader
    train_samples: int | None = positive(None)  # synthetic: size of the set; real data: use the first N
    test_samples: int | None = positive(None)
    download: bool = True  # torchvision download when the files are missing (one process per data.root)
    # how long preparing the files (waiting for another process's preparation, copying, downloading) may take
    # before the run stops saying so; separate from dist.timeout_s. 20 minutes: Fashion-MNIST's 30 MB from a
    # mirror at 25 kB/s.
    prepare_timeout_s: float = positive(1200.0)


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 128])


@dataclass
class OptimConfig:
    name: str = one_of("sgd", OPTIMIZERS)
    lr: float = positive(0.05)
    momentum: float = positive(0.9, zero=True)  # and below 1
    weight_decay: float = positive(0.0, zero=True)
    schedule: str = one_of("cosine", SCHEDULES)  # constant | cosine (per step, to 0 at the end of train.epochs)


@dataclass
class TrainConfig:
    epochs: int = positive(5)
    precision: str = one_of("32-true", PRECISIONS)
    # ddp: the whole model on every rank; fsdp: parameters, gradients, optimizer state sharded
    parallel: str = one_of("ddp", PARALLEL)
    accelerator: str = one_of("auto", ACCELERATORS)
    log_every_n_steps: int = positive(50)
    progress: bool = True  # progress bar on rank 0
    quiet: bool = False  # no progress bar, no per-epoch lines (--quiet): errors and the final line only
    cuda_graphs: bool = True  # one process on a CUDA device: replay the step from a CUDA graph (Trainer: 32-true)
    # micro-batches per optimizer step (Lightning's name); null: 1, or derived from data.global_batch_size
    accumulate_grad_batches: int | None = positive(None)


@dataclass
class CheckpointConfig:
    every_n_steps: int = positive(0, zero=True)  # 0: only at the end of each epoch
    keep: int = positive(2)
    stop_check_every_n_steps: int = positive(10)  # how often the ranks agree on a SIGTERM/SIGUSR1 (one tiny all-reduce)


@dataclass
class DistConfig:
    timeout_s: float = positive(300.0)  # process-group timeout: a dead or stuck rank fails the job after this
    # every process must reach the process group within this, or each one that came names the missing ones (exit
    # 69). 180 s: on a real cluster the nodes of one job start seconds to a minute apart (srun/torchrun starting,
    # `import torch` from a cold shared file system on hundreds of nodes at once), so a shorter default would fail
    # healthy jobs; far below dist.timeout_s, NCCL's 10 and gloo's 30 minutes.
    startup_timeout_s: float = positive(180.0)


@dataclass
class RunConfig:
    # default: runs/<strategy>-<run.name>
    dir: str | None = None
    # the name of the default run dir: the config file's name (`default` without -c), and when overrides change
    # what the run computes, a digest of those changes -- the same command finds its run again, another config
    # never lands in it. Filled in by load_config when unset.
    name: str | None = None


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self, strategy: str) -> Path:
        if self.run.dir is not None:
            return Path(self.run.dir)
        return Path("runs") / f"{strategy}-{self.run.name or 'default'}"


# Keys that decide the training trajectory: resuming a run dir with other values would not continue the same
# run, so it is refused. (train.epochs may grow, which continues training -- unless a schedule depends on it.)
TRAJECTORY_KEYS = (
    "seed",
    "data.name",
    "data.global_batch_size",  # the global batch itself is checked by run.py (data.batch_size and the accumulation
    "data.train_samples",      # may change with the number of processes as long as it holds)
    "model.hidden",
    "optim.name",
    "optim.lr",
    "optim.momentum",
    "optim.weight_decay",
    "optim.schedule",
    "train.precision",
)


def resolve_path(path: str | Path) -> Path:
    """A config file as given, else configs/NAME[.yaml] under the cwd, else a shipped config by name
    (`fashion` -> fashion.yaml of the package distmnist.configs)."""
    p = Path(path)
    if p.is_file():
        return p
    for c in (Path("configs") / p, (Path("configs") / p).with_suffix(".yaml")):
        if c.is_file():
            return c
    shipped = _shipped_configs()
    if shipped is not None and p.name:
        for name in (p.as_posix(), p.with_suffix(".yaml").as_posix()):
            c = shipped.joinpath(name)
            if c.is_file():
                return c  # a pathlib.Path unless the package is imported from a zip file
    names = []
    if shipped is not None:
        names = sorted(f.name[:-5] for f in shipped.iterdir() if f.name.endswith(".yaml"))
    hint = f" (shipped configs: {', '.join(names)})" if names else ""
    raise DistMnistError(f"config file {path} does not exist{hint}")


def _shipped_configs() -> Any:
    """The folder of the shipped configs (a Path or an importlib.resources Traversable); None if none.

    Installed (wheel), they are the package distmnist.configs (configs/ of the repo, see pyproject.toml). Run
    from a checkout (editable install, or PYTHONPATH=src), that checkout's configs/ is used directly: the same
    folder an editable install maps distmnist.configs to, whereas with PYTHONPATH=src the import would find no
    distmnist.configs, or another checkout's one through that checkout's editable install.
    """
    here = Path(__file__).resolve()
    in_checkout = here.parents[2].name == "src" and (here.parents[3] / "pyproject.toml").is_file()
    if in_checkout and SHIPPED_CONFIGS.is_dir():
        return SHIPPED_CONFIGS
    try:
        return importlib.resources.files("distmnist.configs")
    except ModuleNotFoundError:
        return None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then the YAML file, then the overrides; validated."""
    flat: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise DistMnistError(f"config file {p} is not valid YAML: {_first_line(err)}") from None
        except RecursionError:  # PyYAML recurses once per level: a few hundred nested [ or { exhaust the stack
            raise DistMnistError(f"config file {p} nests lists or mappings too deeply to be a config") from None
        except (OSError, UnicodeDecodeError) as err:
            raise DistMnistError(f"cannot read config file {p}: {err}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DistMnistError(f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
        flat.update(_flatten(data, source=str(p)))
    from_file = dict(flat)
    for item in overrides:
        key, value = parse_override(item)
        flat[key] = value
    cfg = config_from_flat(flat)
    if cfg.run.name is None:
        cfg.run.name = run_name(Path(path).stem if path is not None else "default", from_file, cfg)
    return cfg


def run_name(stem: str, from_file: dict[str, Any], cfg: Config) -> str:
    """`stem`, or `stem-<digest>` when `cfg` computes something else than the config file alone: the digest
    (8 hex digits of a sha256) of the trajectory keys and train.parallel that the overrides changed."""
    try:
        base = identity(config_from_flat(from_file))
    except DistMnistError:  # the file alone is not a valid config: every key of the run counts
        base = {}
    changed = {k: v for k, v in identity(cfg).items() if base.get(k, _UNSET) != v}
    if not changed:
        return stem
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


_UNSET = object()


def identity(cfg: Config) -> dict[str, Any]:
    """What makes two runs the same run: the trajectory, how the model is held, and without
    data.global_batch_size the per-process batch the global batch is made of."""
    out = {**trajectory(cfg), "train.parallel": cfg.train.parallel}
    if cfg.data.global_batch_size is None:
        out["data.batch_size"] = cfg.data.batch_size
        out["train.accumulate_grad_batches"] = cfg.train.accumulate_grad_batches
    return out


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise DistMnistError(f"override {item!r} is not key=value (example: optim.lr=0.1)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise DistMnistError(f"override {item!r} has no key (example: optim.lr=0.1)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # a plain string such as a path with odd characters
    except RecursionError:  # see load_config; the value itself is too long to repeat
        raise DistMnistError(f"override {key!r}: the value nests lists or mappings too deeply") from None
    return key, value


def config_from_flat(flat: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in flat.items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _flatten(data: dict, source: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not isinstance(k, str):
            raise DistMnistError(f"{source}: key {k!r} is not a name")
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(key):
            out.update(_flatten(v, source, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def _is_section(key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(Config)} and dataclasses.is_dataclass(
        getattr(Config(), key)
    )


def known_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    return keys


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            close = [k for k in known_keys() if k.split(".")[-1] == parts[-1] or k.startswith(key)]
            hint = f"; did you mean {close[0]}?" if close else f"; known keys under {where}: " + ", ".join(
                sorted(names)
            )
            raise DistMnistError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(target))
            if dataclasses.is_dataclass(getattr(target, part)):
                raise DistMnistError(f"config key {key!r} is a section: set its keys, e.g. {key}.<name>=...")
            setattr(target, part, _coerce(key, value, hints[part]))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise DistMnistError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is not a section")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if isinstance(value, (int, str)) and not isinstance(value, bool) and args[0] is int:
            value = [value] if isinstance(value, int) else value
        if not isinstance(value, list):
            raise DistMnistError(f"config key {key!r} must be a list (example: {key}=[128,128]), got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DistMnistError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DistMnistError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise DistMnistError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise DistMnistError(f"config key {key!r} must be a string, got {value!r}")
    raise AssertionError(f"unsupported schema type {tp} for {key}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DistMnistError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")


def _positive(key: str, value: float | int | None, need: str) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and need == "greater than zero") or not math.isfinite(value):
        raise DistMnistError(f"config key {key!r} must be a finite number {'of ' if 'or' in need else ''}{need}, "
                             f"got {value!r}")


def _checked_fields(cfg: Config):
    """(dotted key, value, the schema's checks) of every field that declares checks (one_of / positive)."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
            if f.metadata:
                yield f"{section.name}.{f.name}", getattr(obj, f.name), f.metadata


def validate(cfg: Config) -> None:
    for key, value, meta in _checked_fields(cfg):
        if "choices" in meta:
            _choice(key, value, meta["choices"])
        if "positive" in meta:
            _positive(key, value, meta["positive"])
    if cfg.optim.momentum >= 1:
        raise DistMnistError(f"config key 'optim.momentum' must be below 1, got {cfg.optim.momentum}")
    if not cfg.model.hidden or any(h <= 0 for h in cfg.model.hidden):
        raise DistMnistError(
            f"config key 'model.hidden' must be a non-empty list of positive sizes, got {cfg.model.hidden}"
        )
    if cfg.seed < 0 or cfg.seed >= 2**63:
        raise DistMnistError(f"config key 'seed' must be between 0 and 2**63-1, got {cfg.seed}")
    if cfg.run.dir is not None and not cfg.run.dir.strip():
        raise DistMnistError("config key 'run.dir' is empty: give a folder, e.g. run.dir=runs/my-run")
    if cfg.run.name is not None and (not cfg.run.name.strip() or "/" in cfg.run.name or cfg.run.name in (".", "..")):
        raise DistMnistError(
            f"config key 'run.name' must be a plain folder name (no '/'), got {cfg.run.name!r}; e.g. run.name=my-run"
        )
    if cfg.train.precision == "16-mixed" and cfg.train.accelerator == "cpu":
        raise DistMnistError(
            "train.precision=16-mixed needs CUDA (float16 autocast with a GradScaler); on CPU use bf16-mixed"
        )
    if cfg.train.parallel == "fsdp" and cfg.train.precision == "16-mixed":
        raise DistMnistError(
            "train.parallel=fsdp does not support train.precision=16-mixed (a gradient scaler over sharded "
            "gradients); use bf16-mixed or 32-true"
        )


@dataclass(frozen=True)
class Batching:
    """How many samples one optimizer step takes, for a given number of processes."""

    batch_size: int  # per process and micro-batch
    accumulate: int  # micro-batches per optimizer step
    world_size: int
    fixed: bool  # data.global_batch_size is set: the epoch is padded to whole global batches

    @property
    def step_batch(self) -> int:
        """Samples of one process in one optimizer step."""
        return self.batch_size * self.accumulate

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulate * self.world_size


def batching(cfg: Config, world_size: int) -> Batching:
    """data.batch_size x world size x train.accumulate_grad_batches = data.global_batch_size (when set), the
    accumulation derived when not given; one line saying what to change when it cannot hold."""
    b, acc, g = cfg.data.batch_size, cfg.train.accumulate_grad_batches, cfg.data.global_batch_size
    if g is None:
        return Batching(b, acc or 1, world_size, fixed=False)
    if g % world_size:
        fits = [w for w in range(1, min(g, 64) + 1) if g % w == 0]
        raise DistMnistError(
            f"data.global_batch_size={g} cannot be split over {world_size} processes: run with a number of processes "
            f"that divides it ({', '.join(map(str, fits))}), or choose a new run.dir with another global batch"
        )
    per_process = g // world_size
    if acc is None and per_process % b == 0:
        return Batching(b, per_process // b, world_size, fixed=True)
    if acc is not None and b * acc == per_process:
        return Batching(b, acc, world_size, fixed=True)
    sizes = [d for d in range(1, per_process + 1) if per_process % d == 0 and d <= b] or [per_process]
    hint = sizes[-1]
    raise DistMnistError(
        f"data.global_batch_size={g} with {world_size} processes needs data.batch_size x "
        f"train.accumulate_grad_batches = {per_process}, got {b} x {acc if acc is not None else '(derived)'}: "
        f"use data.batch_size={hint} train.accumulate_grad_batches={per_process // hint} (or null)"
    )


def flat_dict(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in known_keys():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        out[key] = obj
    return out


def trajectory(cfg: Config) -> dict[str, Any]:
    flat = flat_dict(cfg)
    keys = TRAJECTORY_KEYS + (("train.epochs",) if cfg.optim.schedule != "constant" else ())
    return {k: flat[k] for k in keys}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
