"""The parallel axis: how the model is held over a device mesh -- ``train.parallel`` (the data-parallel flavour:
``ddp`` replicate, ``fsdp`` shard, ``hsdp`` replicate over groups and shard within each) and ``train.tp_size``
(tensor parallelism: how many ranks split each of the first two Linear layers).

The layout is written once, here, and used as is by the three strategies: raw PyTorch builds :func:`mesh` and
calls :func:`parallelize` on its model; Fabric and the Trainer hand it to Lightning's ``ModelParallelStrategy`` as
the parallelize function (``distmnist.lightning.adapters.parallelize_fn``).

Mesh degrees (:class:`Layout`): world size = data-parallel size x ``train.tp_size``; the data-parallel size is
``train.replicate_size`` x the shard size. The mesh is ``(dp_replicate, dp_shard, tp)``, row-major, so rank
``r`` has data-parallel coordinate ``r // tp`` and tensor-parallel coordinate ``r % tp``: the ranks of one TP group
are neighbours (on a GPU node, the fast links), read the same micro-batch, and the data-parallel coordinate picks
the shard of the global order (core.data).

FSDP2 (``torch.distributed.fsdp.fully_shard``): each ``Linear`` of the NNModel is one FSDP unit, then the root,
over the data-parallel dimension; every parameter, its gradient and its optimizer state is split along dim 0, each
rank keeping its rows (``DTensor`` with a ``Shard(0)`` placement). Forward and backward all-gather one layer's
weights at a time; backward reduce-scatters the gradients (the mean over ranks, as DDP's all-reduce). HSDP is the
same over the 2-D (dp_replicate, dp_shard) mesh: sharded within a group, the gradients also all-reduced across the
groups.

Precision: ``32-true`` -- no policy. ``bf16-mixed`` -- FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)``: the sharded parameters the optimizer updates stay float32, layers compute with bfloat16
copies gathered in bfloat16, gradients are reduced in float32; the same autocast as DDP surrounds the forward (the
loss in float32). ``16-mixed`` (float16 + a gradient scaler over sharded gradients) is refused in the config.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError, count

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")

# Gathering a weight sharded over two mesh dimensions (FSDP x TP, HSDP x TP: for each evaluation and for model.pt)
# takes torch 2.14 two all-gathers in a row, and it warns on every rank that they "may give inconsistent results
# between ranks due to different reduction orders". An all-gather reduces nothing (the pieces are concatenated):
# that one warning is dropped, every other line of the logger passes (tests/test_tp.py fails if it shows again).
logging.getLogger("torch.distributed.tensor._redistribute").addFilter(
    lambda record: "sequential all_gather" not in record.getMessage())
TP_DIMS = ("tp", "tensor_parallel")  # the tensor-parallel dimension in this mesh and in Lightning's


@dataclass(frozen=True)
class Layout:
    """The mesh degrees of a run: ``replicate x shard x tp = world_size``."""

    parallel: str  # ddp | fsdp | hsdp
    world_size: int
    tp: int = 1
    replicate: int = 1  # data-parallel groups that each hold a whole (ddp) or sharded (hsdp) copy

    @property
    def dp(self) -> int:
        """The data-parallel size: how many different micro-batches one step reads."""
        return self.world_size // self.tp

    @property
    def shard(self) -> int:
        return self.dp // self.replicate

    @property
    def on_mesh(self) -> bool:
        """Whether the model is held as DTensors on a device mesh (anything but plain DDP)."""
        return self.parallel != "ddp" or self.tp > 1

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def describe(self) -> str:
        """e.g. ``fsdp 2 x tp 2``, ``hsdp 2x2``, ``ddp 4``."""
        dp = f"hsdp {self.replicate}x{self.shard}" if self.parallel == "hsdp" else f"{self.parallel} {self.dp}"
        return dp + (f" x tp {self.tp}" if self.tp > 1 else "")


def _fitting(world: int, width: int) -> str:
    return ", ".join(str(t) for t in range(1, world + 1) if world % t == 0 and width % t == 0)


def layout(cfg, world_size: int) -> Layout:
    """The layout of `cfg` (train.parallel, train.tp_size, train.replicate_size) over `world_size` processes, or
    one line naming sizes that fit (the config alone has checked what does not depend on the processes)."""
    tp, kind = cfg.train.tp_size, cfg.train.parallel
    if world_size % tp:
        raise DistMnistError(
            f"train.tp_size={tp} does not divide the {count(world_size, 'process', 'processes')}: use train.tp_size="
            f"{_fitting(world_size, cfg.model.hidden[0])} (sizes that divide {world_size} and model.hidden[0]), "
            f"or run a multiple of {tp} processes"
        )
    dp = world_size // tp
    if kind == "hsdp":
        replicate = cfg.train.replicate_size
        if dp % replicate:
            fits = ", ".join(str(r) for r in range(1, dp + 1) if dp % r == 0)
            raise DistMnistError(
                f"train.replicate_size={replicate} does not divide the data-parallel size {dp} ({world_size} "
                f"processes / train.tp_size={tp}): use train.replicate_size={fits}"
            )
        return Layout(kind, world_size, tp, replicate)
    return Layout(kind, world_size, tp, dp if kind == "ddp" else 1)


def mesh(env: DistEnv, lay: Layout):
    """The named device mesh ``(dp_replicate, dp_shard, tp)`` of `lay` over all processes. One process without a
    process group (``python -m distmnist.ddp``) gets a group of one: FSDP2 always works on a mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    if not tdist.is_initialized():  # world size 1: dist.process_group leaves it out; its exit destroys this one
        tdist.init_process_group(env.backend, store=tdist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(env.device.type, (lay.replicate, lay.shard, lay.tp), mesh_dim_names=MESH_DIMS)


def submeshes(device_mesh, lay: Layout) -> tuple:
    """(tensor-parallel mesh or None, data-parallel mesh or None) of this package's mesh for `lay`.

    ``ddp`` with ``tp_size > 1`` replicates over the data-parallel ranks with FSDP2 on the 2-D (dp_replicate,
    dp_shard) mesh whose shard groups are one rank each (HSDP with shard size 1): every rank keeps its whole
    TP-local weights, the gradients are all-reduced (the mean over data-parallel ranks: DDP's arithmetic).
    ``DistributedDataParallel`` itself composes with TP only through torch's private
    ``tensor.parallel.ddp._pre_dp_module_transform``, which turns the DTensor parameters into local tensors
    between forwards -- then neither the full state_dict of model.pt nor the DCP checkpoint sees DTensors."""
    tp = device_mesh["tp"] if lay.tp > 1 else None
    if lay.parallel == "fsdp":
        return tp, device_mesh["dp_shard"]
    if lay.parallel == "hsdp" or lay.dp > 1:
        return tp, device_mesh["dp_replicate", "dp_shard"]
    return tp, None  # pure TP: one data-parallel rank, nothing to average


def tp_plan(model: nn.Module) -> dict:
    """Megatron's plan for the MLP: the first Linear column-parallel (each TP rank computes its slice of the
    hidden units: its rows of the weight, its part of the bias), ReLU on the slice, the second Linear row-parallel
    (its columns of the weight; the partial outputs summed by one all-reduce, the bias added once). The forward
    has one all-reduce (activations of batch x hidden[1]); the backward none (the images need no gradient).

    The rest, the 128 -> 10 output layer included, stays replicated: its input is already whole after the
    all-reduce, so every TP rank computes the same logits and the loss, the tally and the metrics need nothing.
    Column-parallel there would split 10 classes (not even over 4 ranks) and need an all-gather of the logits
    (or ``loss_parallel``) for 1290 parameters, 1% of the model."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {names[0]: ColwiseParallel(), names[1]: RowwiseParallel()}


def parallelize(model: nn.Module, tp_mesh, dp_mesh, precision: str) -> nn.Module:
    """The layout in place: tensor parallelism over `tp_mesh` (None: none), then FSDP2 over `dp_mesh` (1-D:
    shard; 2-D: replicate x shard; None: no data-parallel wrapper). Returns `model`."""
    if tp_mesh is not None:
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, tp_mesh, tp_plan(model))
    if dp_mesh is not None:
        shard(model, dp_mesh, precision)
    return model


def shard(model: nn.Module, device_mesh, precision: str) -> nn.Module:
    """FSDP2 on `model` in place: each Linear, then the root, over `device_mesh` (1-D: FSDP; 2-D: HSDP).
    Returns `model`."""
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


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether `model`'s forward needs the collectives of tensor parallelism (a DTensor on a TP mesh dimension)."""
    from torch.distributed.tensor import DTensor

    return any(
        isinstance(p, DTensor) and any(d in TP_DIMS for d in p.device_mesh.mesh_dim_names or ())
        for p in model.parameters()
    )


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
    """The whole model on every rank for an evaluation, to forward through inside the context (FSDP: all-gathered
    once, kept until the end; DDP: nothing to do; tensor parallelism: a plain NNModel copy of the full weights,
    since a TP forward needs collectives). Evaluation shards the test set exactly over all ranks, so ranks may run
    different numbers of batches: a forward must then need no collective."""
    if is_tensor_parallel(model):
        yield _plain_copy(model)
        return
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


def _plain_copy(model: nn.Module) -> nn.Module:
    """A plain NNModel with `model`'s full weights on every rank (a collective: each DTensor gathered in turn)."""
    from distmnist.core.model import NNModel

    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    copy = NNModel(model.hidden).to(next(iter(full.values())).device)
    copy.load_state_dict(full)
    return copy.train(model.training)


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
