"""Single-file checkpoints: names, listing, pruning, the newest good one, and save/load for every rank."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from distmnist.core.checkpoint.files import atomic_torch_save, read
from distmnist.core.checkpoint.sharded import (
    load_sharded,
    read_sharded,
    restore_sharded,
    save_sharded,
    sharded_state_dicts,
    state_of,
)
from distmnist.core.errors import DistMnistError

# /2: the training position is the record's "train_state" entry (core/state.py); /1 spliced it into the record.
# Both resume here; a version that knows only /1 refuses a /2 checkpoint in one line instead of misreading it.
FORMAT = "distmnist-checkpoint/2"
FORMATS = (FORMAT, "distmnist-checkpoint/1")
SUFFIX = ".ckpt"
NAME = re.compile(r"^step=(\d+)\.ckpt$")


def read_any(path: str | Path) -> dict[str, Any]:
    """A checkpoint, single file or sharded folder (:func:`read` / :func:`read_sharded`), for checking it."""
    return read_sharded(path) if Path(path).is_dir() else read(path)


def step_path(ckpt_dir: Path, global_step: int) -> Path:
    return Path(ckpt_dir) / f"step={global_step:08d}{SUFFIX}"


def listing(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files, newest (highest global step) first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def step_of(path: Path) -> int:
    return int(NAME.match(path.name).group(1))


def prune(ckpt_dir: str | Path, keep: int, newest_step: int | None = None) -> None:
    """Keep the `keep` newest checkpoints up to `newest_step` (the one just written). Files of a higher step are
    left alone: the run resumed from an older one, so they did not load (reported at start) -- counting them would
    delete the good checkpoint just written."""
    mine = [p for p in listing(ckpt_dir) if newest_step is None or step_of(p) <= newest_step]
    for old in mine[keep:]:
        try:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        except FileNotFoundError:
            pass


def newest_good(ckpt_dir: str | Path, check, quiet: bool = False) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and passes `check(obj, path)`; damaged ones are reported and skipped.

    `check` raises DistMnistError for a checkpoint that must not be used at all (other model, other config):
    that is not skipped but stops the run, since an older file of the same run dir would be just as foreign.
    """
    found, damaged = listing(ckpt_dir), []
    for path in found:
        try:
            obj = read_any(path)
        except DistMnistError as err:
            damaged.append(str(err))
            continue
        if not quiet:  # reported once a good one is found: otherwise the refusal below says it all
            for line in damaged:
                print(f"distmnist: warning: {line}; using an older checkpoint", file=sys.stderr, flush=True)
        check(obj, path)
        return path, obj
    if found:  # never a silent restart from step 0 over a run dir that holds checkpoints
        more = f" (and {len(found) - 1} more that do not load either)" if len(found) > 1 else ""
        raise DistMnistError(
            f"no checkpoint in {ckpt_dir} loads: {damaged[0]}{more}; to start this run again from scratch, move "
            f"them out of that folder"
        )
    return None


def all_save_state(path: str | Path, state: dict[str, Any], is_zero: bool = True) -> None:
    """Like ``fabric.save`` (every rank calls it; all wait until it is written): modules, optimizers and scalers
    in `state` are stored as their state_dicts -- by rank 0 in one file, or, for a sharded model (FSDP), by every
    rank into one sharded checkpoint."""
    from distmnist.core import dist, parallel

    model = next((v for v in state.values() if isinstance(v, torch.nn.Module)), None)
    if model is not None and parallel.is_sharded(model):
        save_sharded(path, sharded_state_dicts(state))
    elif is_zero:
        atomic_torch_save({k: state_of(v) for k, v in state.items()}, path)
    dist.barrier()


def all_load_state(source: str | Path | dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Like ``fabric.load``: restore the stateful objects of `state` in place from `source` -- a checkpoint
    :func:`read` already, or the path of one (a single file, or a sharded folder: every rank reads its shards) --
    and return the other entries."""
    if not isinstance(source, dict) and Path(source).is_dir():
        obj = load_sharded(source, sharded_state_dicts({k: v for k, v in state.items() if _is_model_or_optimizer(v)}))
        restore_sharded(obj, state)
    else:
        obj = source if isinstance(source, dict) else read(source)
        for key, target in state.items():
            if _is_model_or_optimizer(target) and key in obj:
                target.load_state_dict(obj[key])
    for key, target in state.items():
        if not _is_model_or_optimizer(target) and hasattr(target, "load_state_dict") and key in obj:
            target.load_state_dict(obj[key])
    return {k: v for k, v in obj.items() if k not in state}


def _is_model_or_optimizer(obj: Any) -> bool:
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))
