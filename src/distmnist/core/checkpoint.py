"""Checkpoints: atomic writes, validated reads, newest-good-first resume.

A checkpoint is one ``torch.save`` file written to a temporary name in the same folder, fsynced, then renamed:
a reader sees the old file or the new one, never half of one. Raw DDP writes through :func:`save_state`,
Fabric and the Lightning Trainer through :func:`checkpoint_io` (their ``CheckpointIO`` plugin), so all
three strategies share the one writer and the one reader.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distmnist.core.errors import DistMnistError

FORMAT = "distmnist-checkpoint/1"
SUFFIX = ".ckpt"
NAME = re.compile(r"^step=(\d+)\.ckpt$")


def _read_umask() -> int:
    mask = os.umask(0o022)  # os.umask can only be read by setting it: done once, at import, before any thread
    os.umask(mask)
    return mask


UMASK = _read_umask()


@contextmanager
def atomic_open(path: str | Path):
    """A binary file that appears at `path` only when the block ends without error: written to a temporary
    name in the same folder, fsynced, given the usual mode (0666 minus the umask), then renamed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise DistMnistError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota: the previous file stays as it was
        _unlink_quietly(tmp)
        raise DistMnistError(
            f"cannot write {path} ({err.strerror or err}); the previous version of it is intact -- free space "
            f"and run the same command again"
        ) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def read(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file without running code from it (``weights_only=True``: tensors and plain containers
    and numbers only -- all that the three strategies' checkpoints hold); DistMnistError (one line) if it is
    truncated, garbage, pickles anything else, or is not a checkpoint."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip errors, unpickling errors, EOF...
        text = str(err).strip()
        if "Weights only load failed" in text:  # torch refused a global: code or an object we never write
            culprit = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise DistMnistError(
                f"checkpoint {path} pickles objects other than tensors and plain data ({culprit[:100]}); not loaded, "
                f"since loading it could run code"
            ) from None
        first = text.splitlines()[0][:120] if text else type(err).__name__
        raise DistMnistError(f"checkpoint {path} is damaged or not a checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise DistMnistError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


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
            old.unlink()
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
            obj = read(path)
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


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") and callable(obj.state_dict) else obj


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Like ``fabric.save``: modules, optimizers and scalers in `state` are stored as their state_dicts."""
    atomic_torch_save({k: _state_of(v) for k, v in state.items()}, path)


def load_state(obj: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Like ``fabric.load``: restore the stateful objects of `state` in place, return the other entries."""
    for key, target in state.items():
        if hasattr(target, "load_state_dict") and key in obj:
            target.load_state_dict(obj[key])
    return {k: v for k, v in obj.items() if k not in state}


def checkpoint_io():
    """Fabric's / Lightning's CheckpointIO plugin with the atomic writer and the validated reader above."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # lightning only where it is used

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
            atomic_torch_save(checkpoint, path)

        def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
            return read(path)

    return AtomicCheckpointIO()
