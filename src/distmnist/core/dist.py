"""Who am I in the job: rank, world size, local rank, device and backend, from torchrun's or SLURM's env.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/GROUP_RANK and MASTER_ADDR/MASTER_PORT.
Under ``srun`` without torchrun (one task per process) the same facts come from SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID/SLURM_NODEID; MASTER_ADDR/MASTER_PORT must then be exported by the batch script.
No launcher at all means one process (world size 1).

Also here: joining the process group (after the start-up check of ``core/startup.py``) and the collectives the
package calls by name (``barrier``, ``all_reduce_sum``, ``all_reduce_max``, ``broadcast_object``).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distmnist.core import network, peers
from distmnist.core.errors import DistMnistError
from distmnist.core.startup import agreed_store

# for callers without a config; dist.startup_timeout_s's default (core/config/schema.py says why)
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm | env (RANK and WORLD_SIZE alone: one process per node)
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
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" not in os.environ:
        # the plain env:// contract (Kubeflow's PyTorchJob, MPI wrappers, a hand-written script): one process per
        # pod or host, RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and nothing else -- each process its own node
        place = dict(rank=_int("RANK", 0), world_size=_int("WORLD_SIZE", 1), local_rank=0,
                     local_world_size=1, node_rank=_int("RANK", 0), launcher="env")
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
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


def init_process_group(env: DistEnv, timeout_s: float, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Join the job's process group (only when there is more than one process).

    Every process first checks in through the launcher's store (``core/startup.agreed_store``): all of them within
    ``startup_timeout_s``, or each one that came says which are missing (``StartupIncomplete``, exit 69);
    the group's keys then live under a prefix of this start alone, so a restarted group never reads the keys of
    the one before (torchrun's store outlives its workers). ``timeout_s`` bounds every collective afterwards.
    """
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size == 1 or dist.is_initialized():
        return
    # several nodes: the interface that routes to MASTER_ADDR (said once per node), or one line why the network
    # cannot work (exit 69) -- before the store and the backend, which bind and connect by these variables
    choice = network.choose_interface(env.num_nodes, env.backend)
    if choice is not None and env.local_rank == 0:
        print(choice.line(), file=sys.stderr, flush=True)
    store, master_elsewhere = agreed_store(env, startup_timeout_s)
    # the rendezvous node itself, when its own /etc/hosts sends MASTER_ADDR to loopback and the others do not
    if choice is None and env.num_nodes > 1 and master_elsewhere:
        choice = network.choose_on_the_master_node(master_elsewhere, env.backend)
        if choice is not None and env.local_rank == 0:
            print(choice.line(), file=sys.stderr, flush=True)
    store.set_timeout(timedelta(seconds=timeout_s))
    peers.attach(store, env.rank)  # where a rank that stops leaves its line for the others (core/peers.py)
    kwargs = {}
    if env.device.type == "cuda":
        kwargs["device_id"] = env.device
    dist.init_process_group(
        backend=env.backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


def destroy_process_group() -> None:
    peers.detach()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(env: DistEnv, timeout_s: float, startup_timeout_s: float = STARTUP_TIMEOUT_S):
    init_process_group(env, timeout_s, startup_timeout_s)
    try:
        yield env
    except BaseException as err:  # told to the peers before the connections close (core/peers.py)
        peers.raise_told(err)
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
