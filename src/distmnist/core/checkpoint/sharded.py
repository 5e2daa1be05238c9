"""Sharded checkpoints (DCP folders): every rank its shards, rank 0 meta.pt, one rename to commit; safe reads."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from distmnist.core.checkpoint.files import atomic_torch_save, fsync_dir, read
from distmnist.core.errors import DistMnistError

META = "meta.pt"  # rank 0's part of a sharded checkpoint: all but the sharded tensors
SHARD = "distmnist-shard:"  # in meta.pt, where a sharded tensor goes (the rest of the string is its DCP key)


def state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") and callable(obj.state_dict) else obj


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
            out[key] = state_of(obj)
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
        fsync_dir(final.parent)
    dist.barrier()


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
