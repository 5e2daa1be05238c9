"""Atomic files and the safe read of one: a file appears whole or not at all; reading runs no code from it."""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distmnist.core.errors import DistMnistError


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
    fsync_dir(path.parent)  # make the rename itself durable


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


def fsync_dir(path: Path) -> None:
    """fsync a directory (a rename in it is durable after this); where the file system cannot, nothing."""
    try:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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
