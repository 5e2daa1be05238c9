"""Checkpoints: atomic writes, validated reads, newest-good-first resume.

A checkpoint is one ``torch.save`` file written to a temporary name in the same folder, fsynced, then renamed:
a reader sees the old file or the new one, never half of one. Raw DDP writes through :func:`all_save_state`,
Fabric and the Lightning Trainer through ``distmnist.lightning.adapters.checkpoint_io`` (their ``CheckpointIO``
plugin, around :func:`atomic_torch_save` and :func:`read`), so all three strategies share the one writer and the
one reader.

A sharded checkpoint (``train.parallel=fsdp``) is a folder of the same name, ``step=<global step>.ckpt/``: every
rank writes its own shards with ``torch.distributed.checkpoint`` (DCP; the coordinator writes its ``.metadata``),
rank 0 writes ``meta.pt`` -- everything that is not a sharded tensor (the position, the schedule, the optimizer's
hyperparameters and step counts), in the format of a single-file checkpoint, with a marker string where a shard
goes. The folder is written under a temporary name and renamed once every rank has finished (the commit): a
folder that lacks ``.metadata`` or ``meta.pt``, or whose shard files are shorter than the metadata says, is
damaged and skipped like a truncated file. Reading never unpickles arbitrary objects: ``meta.pt`` and the tensors
load with ``weights_only``, DCP's pickled ``.metadata`` through an unpickler that knows DCP's own metadata classes
only, and a checkpoint that stores anything but tensors in its shards is refused. DCP reshards on load: the
checkpoint loads on any number of processes.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
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
    _fsync_dir(path.parent)  # make the rename itself durable


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


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") and callable(obj.state_dict) else obj


def all_save_state(path: str | Path, state: dict[str, Any], is_zero: bool = True) -> None:
    """Like ``fabric.save`` (every rank calls it; all wait until it is written): modules, optimizers and scalers
    in `state` are stored as their state_dicts -- by rank 0 in one file, or, for a sharded model (FSDP), by every
    rank into one sharded checkpoint."""
    from distmnist.core import dist, parallel

    model = next((v for v in state.values() if isinstance(v, torch.nn.Module)), None)
    if model is not None and parallel.is_sharded(model):
        save_sharded(path, sharded_state_dicts(state))
    elif is_zero:
        atomic_torch_save({k: _state_of(v) for k, v in state.items()}, path)
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


# ------------------------------------------------------------------------------------------ sharded (DCP)
META = "meta.pt"  # rank 0's part of a sharded checkpoint: all but the sharded tensors
SHARD = "distmnist-shard:"  # in meta.pt, where a sharded tensor goes (the rest of the string is its DCP key)


def _is_model_or_optimizer(obj: Any) -> bool:
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))


def sharded_state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with its (FSDP) model and optimizers as DCP state dicts (fully qualified names, DTensor shards)
    and anything else with a ``state_dict()`` as that."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = next(v for v in state.values() if isinstance(v, torch.nn.Module))
    out = {}
    for key, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            out[key] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            out[key] = get_optimizer_state_dict(model, obj)  # initialises a fresh optimizer's state
        else:
            out[key] = _state_of(obj)
    return out


def restore_sharded(obj: dict[str, Any], state: dict[str, Any]) -> None:
    """Load the model and optimizer state dicts of `obj` (from :func:`load_sharded`) into `state`'s objects."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = next(v for v in state.values() if isinstance(v, torch.nn.Module))
    for key, target in state.items():
        if isinstance(target, torch.nn.Module):
            set_model_state_dict(target, obj[key])
        elif isinstance(target, torch.optim.Optimizer):
            set_optimizer_state_dict(model, target, obj[key])


def _split(obj: Any, key: str, shards: dict[str, torch.Tensor]) -> Any:
    """`obj` with every DTensor replaced by a marker (collected in `shards` under its path in `obj`)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        shards[key] = obj
        return SHARD + key
    if isinstance(obj, dict):
        return {k: _split(v, f"{key}/{k}", shards) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{key}/{i}", shards) for i, v in enumerate(obj))
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    return obj


def _join(obj: Any, shards: dict[str, Any]) -> Any:
    if isinstance(obj, str) and obj.startswith(SHARD):
        return shards[obj[len(SHARD):]]
    if isinstance(obj, dict):
        return {k: _join(v, shards) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, shards) for v in obj)
    return obj


def save_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Every rank: its shards of `state` (state dicts with DTensor leaves) into the sharded checkpoint `path`,
    committed by a rename once all ranks have written."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp

    from distmnist.core import dist

    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shards: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", shards)
    zero = tdist.get_rank() == 0
    if zero:
        shutil.rmtree(tmp, ignore_errors=True)  # a write that died half way
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(shards, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    except OSError as err:
        raise DistMnistError(
            f"cannot write {final} ({err.strerror or err}); the previous checkpoints are intact -- free space and "
            f"run the same command again"
        ) from None
    if zero:
        atomic_torch_save(skeleton, tmp / META)
    dist.barrier()  # every rank's shards are on disk
    if zero:
        old = final.with_name(f".{final.name}.old")
        if final.exists():  # the same step written again (a resumed run): the new one replaces it
            os.replace(final, old)
        os.replace(tmp, final)  # the commit
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
    dist.barrier()


def _fsync_dir(path: Path) -> None:
    """fsync a directory (a rename in it is durable after this); where the file system cannot, nothing."""
    try:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: only DCP's own metadata classes, dtypes, sizes and paths may be in it."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "PurePosixPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if name in self.ALLOWED.get(module, ()) or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def _read_dcp_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path / ".metadata", "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise DistMnistError(f"checkpoint {path} is damaged (its .metadata is missing: not committed)") from None
    except Exception as err:  # noqa: BLE001 - unpickling errors, EOF
        raise DistMnistError(f"checkpoint {path} is damaged ({path / '.metadata'}: {str(err)[:100]})") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise DistMnistError(f"checkpoint {path} is damaged ({path / '.metadata'} is not DCP metadata)")
    return md


def read_sharded(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's ``meta.pt``, each shard marker replaced by an empty ("meta" device) tensor of the
    stored full shape -- enough to check whose it is and what model it holds without reading the shards; the
    shard files are checked to be complete. DistMnistError (one line) when anything is missing or damaged."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / META).is_file():
        raise DistMnistError(f"checkpoint {path} is damaged (its {META} is missing: not committed)")
    skeleton = read(path / META)
    md = _read_dcp_metadata(path)
    ends: dict[str, int] = {}
    for info in md.storage_data.values():
        name = str(info.relative_path)
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in ends.items():
        try:
            size = (path / name).stat().st_size
        except OSError:
            raise DistMnistError(f"checkpoint {path} is damaged (shard {name} is missing)") from None
        if size < end:
            raise DistMnistError(f"checkpoint {path} is damaged (shard {name} is truncated: {size} of {end} bytes)")
    shapes = {}
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):  # distmnist stores only tensors in shards
            raise DistMnistError(f"checkpoint {path} stores a non-tensor in its shards ({key}); not loaded")
        shapes[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype, device="meta")
    try:
        return _join(skeleton, shapes)
    except KeyError as err:
        raise DistMnistError(f"checkpoint {path} is damaged ({META} names shard {err} that is not stored)") from None


def _reader(path: Path):
    """DCP's file reader, with the metadata read safely (:func:`_read_dcp_metadata`)."""
    import torch.distributed.checkpoint as dcp

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = _read_dcp_metadata(Path(self.path))
            md.storage_meta = md.storage_meta or dcp.metadata.StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return Reader(path)


def _planner(path: Path):
    """DCP's load planner, refusing the pickled objects (bytes entries) it would ``torch.load`` unsafely."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:  # DCP would torch.load(weights_only=False) them
            raise DistMnistError(f"checkpoint {path} stores a non-tensor in its shards; not loaded")

    return Planner()


def load_sharded(path: str | Path, templates: dict[str, Any]) -> dict[str, Any]:
    """Every rank: the sharded checkpoint `path` as one dict -- meta.pt's entries, with the shards loaded (and
    resharded to this job's processes) into the DTensors of `templates` (state dicts of the same keys)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    skeleton = read(path / META)
    shards: dict[str, torch.Tensor] = {}
    _split(templates, "", shards)
    dcp.load(shards, storage_reader=_reader(path), planner=_planner(path))
    try:
        return _join(skeleton, shards)
    except KeyError as err:
        raise DistMnistError(f"checkpoint {path} holds shard {err} that this model does not have") from None


def read_full(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict of whole tensors, in this process alone (no process group): a single file as
    :func:`read` gives it, a sharded folder with every shard joined into the full tensor -- what evaluating a
    mid-run checkpoint on any number of processes needs."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not path.is_dir():
        return read(path)
    read_sharded(path)  # complete, and nothing but tensors in the shards
    md = _read_dcp_metadata(path)
    full = {key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
            for key, item in md.state_dict_metadata.items()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(full, storage_reader=_reader(path), planner=_planner(path), no_dist=True)
    return _join(read(path / META), full)
