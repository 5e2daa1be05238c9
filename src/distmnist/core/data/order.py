"""The order of samples, the same in every strategy and loader: a training permutation per epoch split across
ranks (DistributedSampler's arithmetic, or whole global batches with data.global_batch_size so that optimizer
step k takes P[kG:(k+1)G] at any world size), and evaluation shards that count every test sample once."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from distmnist.core.config import Batching


# ------------------------------------------------------------------------------------------------ order
def shard_indices(n: int, world_size: int, rank: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The indices `DistributedSampler(shuffle, seed, drop_last=False)` gives `rank` at `epoch`."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    if total > n:  # pad by repeating the start, as DistributedSampler does
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
    return order[rank:total:world_size]


def eval_indices(n: int, world_size: int, rank: int) -> torch.Tensor:
    """Rank r's test samples: r, r+W, ... -- no padding, so the union over ranks is each sample once."""
    return torch.arange(rank, n, world_size)


def rank_samples(n: int, b: Batching) -> int:
    """Samples one rank takes in an epoch of `n`, padding included."""
    if b.fixed:  # padded to whole global batches
        return math.ceil(n / b.global_batch) * b.step_batch
    return math.ceil(n / b.world_size)  # padded to a multiple of the world size, as DistributedSampler


def step_order(n: int, b: Batching, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """Rank `rank`'s indices of an epoch, in the order its micro-batches take them.

    The epoch's permutation P (seed + epoch) is padded by repeating its start: to a multiple of the world size W
    (DistributedSampler's padding) or, with data.global_batch_size G, to whole global batches (every step then
    has G samples whatever W is). Rank r takes P[r::W]; its share of optimizer step k is the next
    batch_size x accumulation (A) of those, i.e. P[kG + r :: W] within P[kG:(k+1)G], and micro-batch m of the
    step takes every A-th of them from the m-th (listed micro-batch by micro-batch, so a micro-batch is a
    contiguous slice). So micro-batch m of rank r takes P[kG:(k+1)G][m*W + r :: W*A]: the same samples as rank
    m*W + r of a job of W*A processes without accumulation, and step k consumes P[kG:(k+1)G] for any W and A.
    With A = 1 and no global batch this is ``shard_indices``, DistributedSampler's order."""
    if b.fixed:
        total = rank_samples(n, b) * b.world_size
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        idx = order[rank:total:b.world_size]
    else:
        idx = shard_indices(n, b.world_size, rank, seed, epoch)
    a, step = b.accumulate, b.step_batch
    if a == 1:
        return idx
    full = idx.shape[0] // step * step  # whole steps: [k, i, m] -> [k, m, i]
    head = idx[:full].view(-1, b.batch_size, a).transpose(1, 2).reshape(-1)
    tail = idx[full:]  # a short last step (no global batch): micro-batch sizes differ by at most one
    return torch.cat([head, *(tail[m::a] for m in range(a))])


class EpochOrder:
    """Sampler-like: the rank's indices for the current epoch (``set_epoch`` as with DistributedSampler), in the
    order of its micro-batches (``step_order``); ``skip_samples`` starts the next pass part-way (resume)."""

    def __init__(self, n: int, b: Batching, rank: int, seed: int) -> None:
        self.n, self.b, self.rank, self.seed = n, b, rank, seed
        self.epoch = 0
        self.skip_samples = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        skip, self.skip_samples = self.skip_samples, 0
        return step_order(self.n, self.b, self.rank, self.seed, self.epoch)[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return rank_samples(self.n, self.b)
