"""The config schema: its sections and keys (one comment per key), the checks every value passes, what
identifies a run (the trajectory keys), and the batching every strategy derives from it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmnist.core.errors import DistMnistError

DATASETS = ("mnist", "fashion-mnist", "synthetic")
LOADERS = ("resident", "dataloader")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "trainer", "fabric")
PARALLEL = ("ddp", "fsdp", "hsdp")

def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A schema field that must be one of `choices` (validate checks it)."""
    return field(default=default, metadata={"choices": choices})


def positive(default: Any, zero: bool = False) -> Any:
    """A schema field holding a finite number greater than zero (`zero`: or zero); None, where it is the default,
    means unset (validate checks it)."""
    return field(default=default, metadata={"positive": "zero or more" if zero else "greater than zero"})



@dataclass
class DataConfig:
    name: str = one_of("mnist", DATASETS)
    root: str = "data"
    # per process (per micro-batch); global batch = batch_size * world size * accumulation
    batch_size: int = positive(64)
    # the optimizer's batch over all processes; when set, it holds whatever the number of processes (the accumulation
    # is derived when not given) and every optimizer step has exactly this many samples: resume on another number of
    # processes is exact (docs/elastic.md)
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
    # how the data-parallel dimension holds the model -- ddp: whole on every data-parallel rank; fsdp: parameters,
    # gradients, optimizer state sharded over them; hsdp: train.replicate_size groups, sharded within each
    parallel: str = one_of("ddp", PARALLEL)
    # ranks that split each of the first two Linear layers (Megatron tensor parallelism, docs/parallelism.md); the
    # data-parallel size is the number of processes / train.tp_size. Must divide model.hidden[0] and the processes.
    tp_size: int = positive(1)
    # train.parallel=hsdp only: groups that each hold one sharded copy (replicas); must divide the data-parallel size
    replicate_size: int | None = positive(None)
    accelerator: str = one_of("auto", ACCELERATORS)
    log_every_n_steps: int = positive(50)
    progress: bool = True  # progress bar on rank 0
    quiet: bool = False  # no progress bar, no per-epoch lines (--quiet): errors and the final line only
    cuda_graphs: bool = True  # one process on a CUDA device: replay the step from a CUDA graph (Trainer: 32-true)
    # micro-batches per optimizer step (Lightning's name); null: 1, or derived from data.global_batch_size
    accumulate_grad_batches: int | None = positive(None)
    # peak FLOP/s of one device at the run's precision, for MFU; null: the datasheet peak of a known GPU (H100,
    # H200), else no MFU
    peak_flops: float | None = positive(None)
    # a torch.profiler trace per rank under <run.dir>/profile/ (Chrome JSON), of a window of optimizer steps
    profile: bool = False
    profile_wait: int = positive(5, zero=True)  # optimizer steps not recorded first (then one warm-up step)
    profile_steps: int = positive(5)  # optimizer steps recorded


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



def identity(cfg: Config) -> dict[str, Any]:
    """What makes two runs the same run: the trajectory, how the model is held, and without
    data.global_batch_size the per-process batch the global batch is made of."""
    out = {**trajectory(cfg), "train.parallel": cfg.train.parallel, "train.tp_size": cfg.train.tp_size,
           "train.replicate_size": cfg.train.replicate_size}
    if cfg.data.global_batch_size is None:
        out["data.batch_size"] = cfg.data.batch_size
        out["train.accumulate_grad_batches"] = cfg.train.accumulate_grad_batches
    return out



def known_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    return keys



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
    check_layout(cfg)
    if cfg.train.parallel != "ddp" and cfg.train.precision == "16-mixed":
        raise DistMnistError(
            f"train.parallel={cfg.train.parallel} does not support train.precision=16-mixed (a gradient scaler over "
            "sharded gradients); use bf16-mixed or 32-true"
        )


def _divisors(n: int, limit: int = 64) -> str:
    return ", ".join(str(d) for d in range(1, min(n, limit) + 1) if n % d == 0)


def check_layout(cfg: Config) -> None:
    """What the mesh degrees need whatever the number of processes (core.parallel.layout checks them against it):
    train.tp_size splits model.hidden[0] (the column-parallel first layer's outputs, the row-parallel second
    layer's inputs); train.replicate_size belongs to hsdp."""
    tp, replicate, width = cfg.train.tp_size, cfg.train.replicate_size, cfg.model.hidden[0]
    if width % tp:
        raise DistMnistError(
            f"train.tp_size={tp} does not divide the first hidden layer's width model.hidden[0]={width}: use "
            f"train.tp_size={_divisors(width)}"
        )
    if tp > 1 and cfg.train.precision == "16-mixed":
        raise DistMnistError("train.tp_size > 1 does not support train.precision=16-mixed; use bf16-mixed or 32-true")
    if cfg.train.parallel == "hsdp" and replicate is None:
        raise DistMnistError(
            "train.parallel=hsdp needs train.replicate_size (how many groups each hold one sharded copy), e.g. "
            "train.replicate_size=2"
        )
    if cfg.train.parallel != "hsdp" and replicate is not None:
        raise DistMnistError(
            f"train.replicate_size={replicate} applies to train.parallel=hsdp only (this run has "
            f"train.parallel={cfg.train.parallel}); drop it or use train.parallel=hsdp"
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
    tp = cfg.train.tp_size
    procs = f"{world_size} processes" if tp == 1 else \
        f"{world_size} data-parallel processes (the processes / train.tp_size={tp})"
    if g % world_size:
        fits = [w for w in range(1, min(g, 64) + 1) if g % w == 0]
        raise DistMnistError(
            f"data.global_batch_size={g} cannot be split over {procs}: run with a number of processes "
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
        f"data.global_batch_size={g} with {procs} needs data.batch_size x "
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
