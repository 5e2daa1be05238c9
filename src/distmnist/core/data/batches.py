"""The batch iterators: one item per optimizer step, resident on the device (`data.loader=resident`) or through a
DataLoader (`data.loader=dataloader`), cut into micro-batches for gradient accumulation; and the evaluation
batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from distmnist.core import dist, parallel
from distmnist.core.config import Batching, Config, DataConfig, batching
from distmnist.core.data.order import EpochOrder, eval_indices
from distmnist.core.data.splits import load_split, to_float


class StepBatches:
    """What both training iterators share: one item per optimizer step (this rank's batch_size x accumulation
    samples) in the order of an :class:`EpochOrder` (``sampler``: Lightning calls ``sampler.set_epoch(epoch)`` on
    it, as on a DataLoader's)."""

    def __init__(self, sampler: EpochOrder, b: Batching) -> None:
        self.sampler, self.batch_size = sampler, b.step_batch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip(self, steps: int) -> None:
        """Start the next pass `steps` optimizer steps into the epoch (resume mid-epoch)."""
        self.sampler.skip_samples = steps * self.batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class ResidentBatches(StepBatches):
    """Training batches from a split kept on the device, in the sampler's order (gathered per batch on the CPU,
    per epoch on a GPU); ``micro_batches`` splits one into its micro-batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, b: Batching, sampler: EpochOrder,
                 device: torch.device) -> None:
        super().__init__(sampler, b)
        self.images = to_float(images).to(device)
        self.labels = labels.to(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, bs = self.sampler.indices().to(self.images.device), self.batch_size
        if self.images.device.type == "cpu":
            # per batch on the CPU: 938 gathers of 64 images take ~20 ms an epoch, one gather of the whole epoch
            # ~70 ms (a 188 MB copy through memory)
            for i in range(0, idx.shape[0], bs):
                b = idx[i : i + bs]
                yield self.images.index_select(0, b), self.labels.index_select(0, b)
            return
        # on a GPU one gather per epoch is one kernel; the batches are then slices (no launch per step)
        x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        for i in range(0, x.shape[0], bs):
            yield x[i : i + bs], y[i : i + bs]


def micro_batches(x: torch.Tensor, y: torch.Tensor, accumulate: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step's samples of a rank -> its `accumulate` micro-batches (contiguous slices; sizes as
    ``step_order`` lists them)."""
    if accumulate == 1:
        return [(x, y)]
    return list(zip(x.tensor_split(accumulate), y.tensor_split(accumulate), strict=True))


class MicroBatches:
    """The step batches as micro-batches, for a loop that accumulates itself (the Lightning Trainer's
    ``accumulate_grad_batches``); ``sampler`` and ``skip`` (in optimizer steps) are the step batches'."""

    def __init__(self, steps, accumulate: int) -> None:
        self.steps, self.accumulate = steps, accumulate
        self.sampler = steps.sampler

    def __len__(self) -> int:
        return len(self.steps) * self.accumulate

    def __iter__(self):
        for x, y in self.steps:
            yield from micro_batches(x, y, self.accumulate)


class ImageSet(Dataset):
    """Map-style dataset over uint8 images, returning what ToTensor gives (per sample, the classic way)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].unsqueeze(0).to(torch.float32).div(255), self.labels[i]


class LoaderBatches(StepBatches):
    """The classic path: DataLoader over the map-style set with the sampler's order (DistributedSampler's, see
    ``step_order``), ``set_epoch`` each epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, b: Batching, rank: int,
                 seed: int, device: torch.device) -> None:
        super().__init__(EpochOrder(len(labels), b, rank, seed), b)
        self.loader = DataLoader(
            ImageSet(images, labels), batch_size=b.step_batch, sampler=self.sampler, num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0, drop_last=False,
        )

    def __iter__(self):
        return iter(self.loader)


def train_batches(cfg: Config, env: dist.DistEnv, split: tuple[torch.Tensor, torch.Tensor] | None = None):
    """This rank's training batches, one item per optimizer step (``micro_batches`` splits one). The data follows
    the mesh: the shard is the data-parallel coordinate's among the data-parallel size (the ranks of one
    tensor-parallel group read the same batches)."""
    images, labels = split if split is not None else load_split(cfg.data, train=True)
    lay = parallel.layout(cfg, env.world_size)
    b, rank = batching(cfg, lay.dp), lay.dp_rank(env.rank)
    if cfg.data.loader == "resident":
        return ResidentBatches(images, labels, b, EpochOrder(len(labels), b, rank, cfg.seed), env.device)
    return LoaderBatches(images, labels, cfg.data, b, rank, cfg.seed, env.device)


class EvalBatches:
    """This rank's share of the test split in fixed batches, already on the device; iterate it every epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def eval_batches(cfg: Config, env: dist.DistEnv, split: tuple[torch.Tensor, torch.Tensor] | None = None):
    """This rank's share of the test set over all ranks (every layout evaluates a whole model per rank:
    ``parallel.gathered``), each image counted once."""
    images, labels = split if split is not None else load_split(cfg.data, train=False)
    idx = eval_indices(len(labels), env.world_size, env.rank)
    return EvalBatches(to_float(images[idx]).to(env.device), labels[idx].to(env.device), cfg.data.eval_batch_size)
