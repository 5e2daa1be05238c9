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

from distmnist.core.checkpoint.files import atomic_open, atomic_torch_save, atomic_write, read
from distmnist.core.checkpoint.sharded import (
    META,
    load_sharded,
    read_full,
    read_sharded,
    restore_sharded,
    save_sharded,
    sharded_state_dicts,
)
from distmnist.core.checkpoint.single import (
    FORMAT,
    FORMATS,
    NAME,
    SUFFIX,
    all_load_state,
    all_save_state,
    listing,
    newest_good,
    prune,
    read_any,
    step_of,
    step_path,
)

__all__ = [
    "FORMAT", "FORMATS", "META", "NAME", "SUFFIX", "all_load_state", "all_save_state", "atomic_open",
    "atomic_torch_save", "atomic_write", "listing", "load_sharded", "newest_good", "prune", "read", "read_any",
    "read_full", "read_sharded", "restore_sharded", "save_sharded", "sharded_state_dicts", "step_of", "step_path",
]
