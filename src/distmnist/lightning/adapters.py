"""The core plugged into Lightning (Fabric and the Trainer), through the places Lightning offers for it.

* :func:`checkpoint_io` -- the CheckpointIO plugin: the core's atomic writer and validated reader
  (``core.checkpoint``), so all three strategies share one checkpoint format.
* :func:`sharded_strategy` -- Lightning's ``ModelParallelStrategy`` (FSDP2) writing and reading the core's sharded
  checkpoints, and skipping FSDP2's reduce-scatter on accumulating micro-steps in the Trainer.
* :func:`cluster_environment` -- the ClusterEnvironment of the launcher ``core.dist`` found.
* :func:`parallelize_fn` -- ``ModelParallelStrategy``'s parallelize function: the core's layout (TP, FSDP2;
  ``core.parallel.parallelize``); :func:`model_parallel_sizes` -- its mesh sizes, or the layouts it cannot hold.

``sharded_strategy`` replaces methods that Lightning calls by name and relies on the checkpoint keys Lightning
writes and reads (written against Lightning 2.6, ``internals.LIGHTNING_VERSION``);
``tests/test_lightning_internals.py`` fails when an upgrade changes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from distmnist.core import parallel
from distmnist.core.checkpoint import (
    all_load_state,
    all_save_state,
    atomic_torch_save,
    load_sharded,
    read,
    restore_sharded,
    save_sharded,
    sharded_state_dicts,
)
from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError, alike_on_every_rank


class AtomicCheckpointIO(TorchCheckpointIO):
    """Fabric's / the Trainer's CheckpointIO with the atomic writer and the validated reader of core.checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read(path)


def checkpoint_io() -> AtomicCheckpointIO:
    """The CheckpointIO plugin of ``Fabric(plugins=...)`` and ``Trainer(plugins=...)`` (DDP and one process)."""
    return AtomicCheckpointIO()


# Lightning 2.6's Trainer hands ModelParallelStrategy.save_checkpoint its checkpoint dict with the model's sharded
# state dict under "state_dict" and one sharded state dict per optimizer in the list "optimizer_states"
# (save_distributed_checkpoint=True, the default); the dict load_checkpoint returns must hold "optimizer_states",
# and load_model_state_dict / load_optimizer_state_dict do nothing (load_checkpoint has restored both in place).
STATE_DICT, OPTIMIZER_STATES = "state_dict", "optimizer_states"


def sharded_strategy(strategy_class: type) -> type:
    """Lightning's ``ModelParallelStrategy`` (Fabric's or the Trainer's, `strategy_class`) writing and reading the
    sharded checkpoints of core.checkpoint. Its own (Lightning 2.6) writes into the final folder directly (a crash
    leaves half a checkpoint under the final name) and stores the optimizer's hyperparameters inside the DCP shards,
    which DCP reads back with ``torch.load(weights_only=False)``; it takes no CheckpointIO plugin, so the two
    methods are replaced, with the same signatures (Lightning calls them with keyword arguments)."""
    if issubclass(strategy_class, pl.strategies.Strategy):  # the Trainer's: a checkpoint dict in, a dict out

        class TrainerShardedStrategy(strategy_class):
            def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
                save_sharded(filepath, checkpoint)

            def load_checkpoint(self, checkpoint_path, weights_only=None):
                state = {STATE_DICT: self.model, **{f"optimizer_{i}": o for i, o in enumerate(self.optimizers)}}
                templates = sharded_state_dicts(state)
                templates = {STATE_DICT: templates[STATE_DICT],
                             OPTIMIZER_STATES: [templates[f"optimizer_{i}"] for i in range(len(self.optimizers))]}
                obj = load_sharded(checkpoint_path, templates)
                restore_sharded({STATE_DICT: obj[STATE_DICT], **{f"optimizer_{i}": s for i, s in
                                 enumerate(obj[OPTIMIZER_STATES])}}, state)
                return obj

            @contextmanager
            def block_backward_sync(self):
                """Accumulating micro-steps skip FSDP2's reduce-scatter, as in ddp.py and fabric.py (Lightning 2.6's
                ``ParallelStrategy.block_backward_sync``, which its training loop enters on those micro-steps,
                knows only DDP's ``no_sync``)."""
                with parallel.no_sync(self.model):
                    yield

        return TrainerShardedStrategy

    class FabricShardedStrategy(strategy_class):  # Fabric's: like fabric.save / fabric.load
        def save_checkpoint(self, path, state, storage_options=None, filter=None) -> None:
            all_save_state(path, state, self.is_global_zero)

        def load_checkpoint(self, path, state=None, strict=True, weights_only=None):
            return all_load_state(path, state)

    return FabricShardedStrategy


class OneProcessPerNode(TorchElasticEnvironment):
    """The plain env:// contract (one process per pod or host, no LOCAL_RANK): TorchElasticEnvironment, with the
    local rank (0) and node rank (= RANK) that core.dist.read_env gives such a process instead of the variables
    that only torchrun sets."""

    def __init__(self, env: DistEnv) -> None:
        super().__init__()
        self.env = env

    def local_rank(self) -> int:
        return self.env.local_rank

    def node_rank(self) -> int:
        return self.env.node_rank


def cluster_environment(env: DistEnv):
    """The Lightning ClusterEnvironment of this launcher, named explicitly so Lightning never guesses otherwise.

    (Lightning would otherwise pick SLURMEnvironment whenever SLURM_NTASKS is set, e.g. in a batch script that
    runs torchrun, and print a hint about srun on machines that merely have it installed.)
    """
    if env.launcher == "torchrun":
        return TorchElasticEnvironment()
    if env.launcher == "env":  # RANK, WORLD_SIZE, MASTER_ADDR/PORT only: torchrun's contract less LOCAL_RANK
        return OneProcessPerNode(env)
    if env.launcher == "slurm":
        return SLURMEnvironment(auto_requeue=False)  # preemption is handled by distmnist for all strategies
    return LightningEnvironment()


def model_parallel_sizes(lay: parallel.Layout) -> tuple[int, int]:
    """``(data_parallel_size, tensor_parallel_size)`` of Lightning's ``ModelParallelStrategy`` for `lay`, or one
    line where it cannot hold the layout. Its device mesh is 2-D, ``data_parallel x tensor_parallel``, and the
    data-parallel dimension is one dimension that FSDP2 shards over (Lightning 2.6): HSDP's replicate x shard, and
    DDP's replication over several data-parallel ranks next to TP, have no dimension there."""
    with alike_on_every_rank():
        if lay.parallel == "hsdp" or (lay.parallel == "ddp" and lay.dp > 1):
            what = "train.parallel=hsdp" if lay.parallel == "hsdp" else "train.parallel=ddp with train.tp_size > 1"
            raise DistMnistError(
                f"{what} ({lay.describe()}) cannot be expressed in Lightning's ModelParallelStrategy: its mesh is "
                f"data_parallel x tensor_parallel, with one (sharded) data-parallel dimension; use train.parallel="
                f"fsdp with train.tp_size={lay.tp}, ddp with train.tp_size={lay.world_size} (pure TP), or "
                f"distmnist.ddp for this layout"
            )
    return lay.dp, lay.tp


def parallelize_fn(precision: str, kind: str = "fsdp"):
    """The parallelize function of Lightning's ``ModelParallelStrategy`` (``fn(module, device_mesh)``; Fabric:
    ``parallelize_fn=``, the Trainer: called in ``configure_model``): its mesh is 2-D (data_parallel x
    tensor_parallel); core.parallel's layout puts TP on tensor_parallel (when larger than 1) and, for `kind`
    ``fsdp``, the FSDP2 shards on data_parallel (``ddp``: pure TP, one data-parallel rank, no wrapper)."""

    def parallelize(module: nn.Module, device_mesh) -> nn.Module:
        tp = device_mesh["tensor_parallel"] if device_mesh["tensor_parallel"].size() > 1 else None
        dp = device_mesh["data_parallel"] if kind == "fsdp" else None
        return parallel.parallelize(module, tp, dp, precision)

    return parallelize
