"""The parallel axis, ``train.parallel``: replicate the model on every rank (``ddp``) or shard it (``fsdp``).

With ``fsdp`` the shard layout is written once, here, and used as is by the three strategies: raw PyTorch calls
:func:`shard` on its model, Fabric and the Trainer hand it to Lightning's ``ModelParallelStrategy`` as the
parallelize function (``distmnist.lightning.adapters.parallelize_fn``; Fabric: ``parallelize_fn``; Trainer:
``LightningModule.configure_model``). FSDP2 (``torch.distributed.fsdp.fully_shard``): each ``Linear`` of the
NNModel is one FSDP unit, then the root, on a 1-D device mesh over all processes; every parameter, its gradient and
its optimizer state is split along dim 0, each rank keeping its rows (``DTensor`` with a ``Shard(0)`` placement).
Forward and backward all-gather one layer's weights at a time; backward reduce-scatters the gradients (the mean
over ranks, as DDP's all-reduce).

Precision: ``32-true`` -- no policy. ``bf16-mixed`` -- FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)``: the sharded parameters the optimizer updates stay float32, layers compute with bfloat16
copies gathered in bfloat16, gradients are reduced in float32; the same autocast as DDP surrounds the forward (the
loss in float32). ``16-mixed`` (float16 + a gradient scaler over sharded gradients) is refused in the config.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as tdist
from torch import nn

from distmnist.core.dist import DistEnv


def mesh(env: DistEnv):
    """The 1-D device mesh over all processes (the data-parallel dimension). One process without a process group
    (``python -m distmnist.ddp``) gets a group of one: FSDP2 always works on a mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    if not tdist.is_initialized():  # world size 1: dist.process_group leaves it out; its exit destroys this one
        tdist.init_process_group(env.backend, store=tdist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(env.device.type, (tdist.get_world_size(),), mesh_dim_names=("data_parallel",))


def shard(model: nn.Module, device_mesh, precision: str) -> nn.Module:
    """FSDP2 on `model` in place: each Linear, then the root, over `device_mesh` (1-D). Returns `model`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()  # 32-true: parameters, compute and reduction in float32
    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=device_mesh, mp_policy=policy)
    fully_shard(model, mesh=device_mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def settle_buckets(root: nn.Module) -> None:
    """Every ``DistributedDataParallel`` in `root` (the wrapper itself, or a Lightning module that holds one) takes
    its final gradient-bucket layout now, before the first step, so that every step of every run -- fresh or
    resumed -- sums each gradient element at the same place of the same flat buffer.

    Why: DDP's Reducer lays the buckets out in definition order, then after the first backward rebuilds them once
    in the order the gradients became ready (reversed). With 3 or more processes the order in which gloo/NCCL sum an
    element depends on its offset in the buffer, so the first step after a resume (initial layout) differed from
    the uninterrupted run's step (rebuilt layout) by 1e-8..1e-7. This pushes every parameter as "rebuilt" and
    rebuilds at once, as torch's own ``_DDPJoinHook`` does for a rank that has joined: the layout is then fixed for
    the whole run, at torch's bucket sizes (one all-reduce per bucket, not per parameter). Private Reducer API
    (torch 2.14); ``tests/test_faults.py::test_ddp_buckets_are_laid_out_once_before_the_first_step`` breaks
    when it changes; without it, DDP keeps torch's behaviour (exact at 2 processes only)."""
    from torch.nn.parallel import DistributedDataParallel

    for module in root.modules():
        reducer = getattr(module, "reducer", None) if isinstance(module, DistributedDataParallel) else None
        api = ("_push_all_rebuilt_params", "_rebuild_buckets")
        if reducer is not None and all(hasattr(reducer, name) for name in api):
            reducer._push_all_rebuilt_params()
            reducer._rebuild_buckets()


def no_sync(net: nn.Module, enabled: bool = True) -> AbstractContextManager:
    """The context of an accumulating micro-step: no gradient all-reduce (DDP's ``no_sync``) or reduce-scatter
    (FSDP2's ``set_requires_gradient_sync(False)`` on every FSDP unit, as Fabric's ``no_backward_sync`` does); the
    step's last micro-batch, outside it (``enabled=False``), reduces the sum. One process without a wrapper:
    nothing to skip."""
    if not enabled:
        return nullcontext()
    if is_sharded(net):
        return _without_gradient_sync(net)
    return getattr(net, "no_sync", nullcontext)()  # DistributedDataParallel.no_sync, or the bare model


@contextmanager
def _without_gradient_sync(model: nn.Module):
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


@contextmanager
def gathered(model: nn.Module):
    """The whole model on every rank for an evaluation (FSDP: all-gathered once, kept until the end; DDP: nothing
    to do). Evaluation shards the test set exactly, so ranks may run different numbers of batches: a forward must
    then need no collective."""
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (a DTensor's shard, a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def param_bytes(model: nn.Module) -> int:
    """This rank's bytes of parameters (as sharded for training: call it outside :func:`gathered`)."""
    return sum(local(p).numel() * local(p).element_size() for p in model.parameters())


def state_mb(param_bytes: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What this rank holds of the training state, in MB (2**20 bytes): parameters, gradients (one per parameter,
    of the parameter's size and dtype, whether or not allocated right now) and the optimizer state. DDP's gradient
    buckets (a second copy of the gradients during a step) are not counted."""
    optim = sum(
        local(v).numel() * local(v).element_size()
        for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    mb = 2.0**20
    return {"param_mb": param_bytes / mb, "grad_mb": param_bytes / mb, "optim_mb": optim / mb,
            "state_mb": (2 * param_bytes + optim) / mb}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole NNModel state_dict on CPU in model.pt's format, on rank 0 (every rank calls it: FSDP gathers
    the shards; the other ranks get an empty dict)."""
    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_finite(model: nn.Module) -> bool:
    """Whether every weight is finite, the same answer on every rank (FSDP: each rank sees its shards only, so
    the ranks agree through a collective)."""
    finite = torch.stack([torch.isfinite(local(p)).all() for p in model.parameters()]).all()
    if not is_sharded(model):
        return bool(finite)
    flag = (~finite).to(torch.int32).reshape(1)
    if tdist.get_backend() == "nccl":
        flag = flag.cuda()
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return not bool(flag.item())
