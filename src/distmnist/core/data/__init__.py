"""Data: MNIST / Fashion-MNIST (torchvision's dataset classes) or a synthetic set, sharded per rank.

Every strategy and both loaders see the same samples in the same order:

* training order: a permutation seeded with ``seed + epoch``, padded and split across ranks exactly as
  :class:`torch.utils.data.DistributedSampler` does (``shard_indices``) -- or, with ``data.global_batch_size`` G,
  padded to whole global batches so that optimizer step k takes ``P[kG:(k+1)G]`` at any world size
  (``step_order``, which also places the micro-batches of gradient accumulation);
* evaluation: rank r takes test samples r, r+W, r+2W, ... with no padding, so every test image is counted
  exactly once for any world size W.

``data.loader=resident`` keeps a whole split as one float tensor on the training device: an epoch is one
gather of the rank's shard, a batch is a slice (no per-sample Python, no host-device copy per step).
``data.loader=dataloader`` is the classic ``DataLoader`` path with a sampler (+ ``set_epoch``) in that order.
Pixel values are ``uint8 / 255`` as float32 in both (what ``ToTensor`` gives); shapes are (B, 1, 28, 28).
"""

from __future__ import annotations

from distmnist.core.data.batches import (
    EvalBatches,
    ImageSet,
    LoaderBatches,
    MicroBatches,
    ResidentBatches,
    eval_batches,
    micro_batches,
    train_batches,
)
from distmnist.core.data.format import (
    CLASS_NAMES,
    RAW_FILES,
    SPLIT_FILES,
    SPLIT_SIZE,
    TORCHVISION_CLASS,
    check_split,
    parse_idx,
    raw_folder,
    read_idx,
)
from distmnist.core.data.order import EpochOrder, eval_indices, rank_samples, shard_indices, step_order
from distmnist.core.data.preparation import (
    PREPARE_LOCK,
    PrepareLock,
    all_ensure_available,
    header_check,
    lock_path,
    offline_fixes,
    prepare,
    torchvision_class,
)
from distmnist.core.data.splits import load_split, split_size, steps_per_epoch, synthetic_split, to_float

__all__ = [
    "CLASS_NAMES", "PREPARE_LOCK", "RAW_FILES", "SPLIT_FILES", "SPLIT_SIZE", "TORCHVISION_CLASS", "EpochOrder",
    "EvalBatches", "ImageSet", "LoaderBatches", "MicroBatches", "PrepareLock", "ResidentBatches", "check_split",
    "all_ensure_available", "eval_batches", "eval_indices", "header_check", "load_split", "lock_path", "micro_batches",
    "offline_fixes", "parse_idx", "prepare", "rank_samples", "raw_folder", "read_idx", "shard_indices",
    "split_size", "step_order", "steps_per_epoch", "synthetic_split", "to_float", "torchvision_class", "train_batches",
]
