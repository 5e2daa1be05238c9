"""A split as tensors: the real files through torchvision's classes, or the synthetic set; its size and the
steps of an epoch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distmnist.core.config import Config, DataConfig, batching
from distmnist.core.data.format import SPLIT_SIZE, SYNTHETIC_SIZE
from distmnist.core.data.order import rank_samples
from distmnist.core.data.preparation import torchvision_split


# ---------------------------------------------------------------------------------------- synthetic set
def synthetic_split(train: bool, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, learnable 10-class set of 28x28 uint8 images: a smooth prototype per class plus noise.

    The same bytes on every machine and rank (CPU generator with a fixed seed).
    """
    n = n or SYNTHETIC_SIZE[train]
    g = torch.Generator().manual_seed(20240601)
    smooth = F.interpolate(torch.rand(10, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")[:, 0]
    prototypes = 0.5 + 0.8 * (smooth - 0.5)
    g.manual_seed(1 if train else 2)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randn(n, 28, 28, generator=g) * 0.5
    images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def split_size(cfg: DataConfig, train: bool) -> int:
    """Number of samples of a split, known without loading it."""
    full = (SYNTHETIC_SIZE if cfg.name == "synthetic" else SPLIT_SIZE)[train]
    limit = cfg.train_samples if train else cfg.test_samples
    return min(full, limit) if limit is not None and cfg.name != "synthetic" else (limit or full)


def steps_per_epoch(cfg: Config, world_size: int) -> int:
    """Optimizer steps in one epoch: ceil(ceil(N / world_size) / (batch_size x accumulation)), as
    DistributedSampler pads; with data.global_batch_size, ceil(N / global batch) whatever the world size."""
    b = batching(cfg, world_size)
    return math.ceil(rank_samples(split_size(cfg.data, True), b) / b.step_batch)


def load_split(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of one split, cut to data.train/test_samples if set."""
    limit = cfg.train_samples if train else cfg.test_samples
    if cfg.name == "synthetic":
        return synthetic_split(train, limit)
    images, labels = torchvision_split(cfg, train)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], bit for bit what ToTensor gives."""
    return images.unsqueeze(1).to(torch.float32).div(255)
