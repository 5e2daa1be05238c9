"""Who am I in the job: rank, world size, local rank, device and backend, from torchrun's or SLURM's env.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/GROUP_RANK and MASTER_ADDR/MASTER_PORT.
Under ``srun`` without torchrun (one task per process) the same facts come from SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID/SLURM_NODEID; MASTER_ADDR/MASTER_PORT must then be exported by the batch script.
No launcher at all means one process (world size 1).
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distmnist.core.errors import DistMnistError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm
    device: torch.device = torch.device("cpu")

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def _int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistMnistError(f"environment variable {name}={value!r} is not an integer") from None


def read_env(accelerator: str = "auto") -> DistEnv:
    """The process's place in the job and its device; no process group is created here."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = _int("WORLD_SIZE", 1)
        local_world = _int("LOCAL_WORLD_SIZE", world)
        place = dict(
            rank=_int("RANK", 0),
            world_size=world,
            local_rank=_int("LOCAL_RANK", 0),
            local_world_size=local_world,
            node_rank=_int("GROUP_RANK", _int("NODE_RANK", 0)),
            launcher="torchrun",
        )
    elif (_int("SLURM_NTASKS", 1) or 1) > 1 and "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ:
        world = _int("SLURM_NTASKS", 1)
        nodes = _int("SLURM_JOB_NUM_NODES", _int("SLURM_NNODES", 1))
        place = dict(
            rank=_int("SLURM_PROCID", 0),
            world_size=world,
            local_rank=_int("SLURM_LOCALID", 0),
            local_world_size=max(1, world // max(1, nodes)),
            node_rank=_int("SLURM_NODEID", 0),
            launcher="slurm",
        )
    else:
        place = dict(launcher="single")
    if not 0 <= place.get("rank", 0) < place.get("world_size", 1):
        raise DistMnistError(f"rank {place['rank']} is outside world size {place['world_size']}")
    return DistEnv(**place, device=pick_device(accelerator, place.get("local_rank", 0)))


def pick_device(accelerator: str, local_rank: int = 0) -> torch.device:
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistMnistError("train.accelerator=cuda but no CUDA device is visible; use train.accelerator=cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistMnistError(
            f"local rank {local_rank} has no GPU: only {count} visible on this node; start at most {count} "
            f"processes per node (torchrun --nproc_per_node={count}) or use train.accelerator=cpu"
        )
    return torch.device("cuda", local_rank)


def init_process_group(env: DistEnv, timeout_s: float) -> None:
    """Join the job's process group (only when there is more than one process)."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size == 1 or dist.is_initialized():
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DistMnistError(
                f"{var} is not set: launch with torchrun (it sets it) or export {var} in the batch script"
            )
    kwargs = {}
    if env.device.type == "cuda":
        kwargs["device_id"] = env.device
    dist.init_process_group(
        backend=env.backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(env: DistEnv, timeout_s: float):
    init_process_group(env, timeout_s)
    try:
        yield env
    finally:
        destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def backend_needs_device() -> bool:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    return is_distributed() and dist.get_backend() == "nccl"


def broadcast_object(obj, src: int = 0):
    """rank `src`'s Python object on every rank (a no-op in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def ddp_kwargs(world_size: int) -> dict:
    """The keyword arguments of ``DistributedDataParallel``, one place for the three strategies (``ddp.py`` passes
    them to the wrapper, Fabric and the Trainer to ``DDPStrategy(**kwargs)``, which hands them on).

    With 3 or more processes, one gradient bucket per parameter, from the first step on: the order in which an
    element's sum is taken depends on where it sits in the flat bucket, and DDP's Reducer first puts all
    parameters in one bucket in definition order, then after the first step rebuilds it once in gradient-ready
    order (reversed). The first step after a resume used the initial layout where the uninterrupted run used the
    rebuilt one, 1e-8..1e-7 off. A bucket per parameter has the same content before and after the rebuild, so every
    step of every run sums the same way. Its price is one all-reduce per parameter instead of one per bucket, so
    2 processes keep torch's buckets: a sum of two is the same in any order. (torch 2.14: ``bucket_cap_mb_list``
    sets the caps of both the initial and the rebuilt buckets, where ``bucket_cap_mb`` sets only the rebuilt ones;
    a cap of 0 closes each bucket after one parameter. Without that argument: torch's buckets, exact at 2
    processes only; ``test_faults.py::test_ddp_buckets_hold_one_parameter_each_before_and_after_the_rebuild``
    breaks when this changes.)
    """
    from torch.nn.parallel import DistributedDataParallel

    if world_size <= 2 or "bucket_cap_mb_list" not in inspect.signature(DistributedDataParallel).parameters:
        return {}
    return {"bucket_cap_mb_list": [0]}


def lightning_environment(env: DistEnv):
    """The Lightning ClusterEnvironment of this launcher, named explicitly so Lightning never guesses otherwise.

    (Lightning would otherwise pick SLURMEnvironment whenever SLURM_NTASKS is set, e.g. in a batch script that
    runs torchrun, and print a hint about srun on machines that merely have it installed.)
    """
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if env.launcher == "torchrun":
        return TorchElasticEnvironment()
    if env.launcher == "slurm":
        return SLURMEnvironment(auto_requeue=False)  # preemption is handled by distmnist for all strategies
    return LightningEnvironment()
