"""Metrics, the same arithmetic under every strategy, reduced across ranks, exact.

* :class:`EvalMetrics` -- torchmetrics accuracy (multiclass, 10 classes), mean loss and confusion matrix.
  Ranks see disjoint shards with no padding (``data.eval_indices``), torchmetrics sums the states of all
  ranks at ``compute()``: every test image is counted once for any world size.
* :class:`TrainTally` -- running sums on the device (loss, correct, count) updated every step without any
  host synchronisation; reduced once per epoch. It counts what the ranks trained on, including the few
  samples DistributedSampler repeats to pad the last shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from distmnist.core import dist, parallel
from distmnist.core.model import NUM_CLASSES
from distmnist.core.state import TallySums


class EvalMetrics(nn.Module):
    """Accuracy, mean loss, sample count and confusion matrix of the test set, synced over ranks at compute();
    plus, on this rank, the first `keep_wrong` misclassified images (for the TensorBoard grid)."""

    def __init__(self, keep_wrong: int = 0) -> None:
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro", validate_args=False)
        self.loss = MeanMetric(nan_strategy="disable")
        self.count = SumMetric(nan_strategy="disable")
        self.confusion = MulticlassConfusionMatrix(num_classes=NUM_CLASSES, validate_args=False)
        self.keep_wrong = keep_wrong
        self.wrong: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (images, predicted, true)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor | None = None) -> None:
        logits = logits.float()
        self.acc.update(logits, target)
        self.loss.update(F.cross_entropy(logits, target, reduction="none"))
        self.count.update(torch.tensor(float(target.numel()), device=target.device))
        self.confusion.update(logits, target)
        have = sum(len(w[0]) for w in self.wrong)
        if images is not None and have < self.keep_wrong:  # a host sync, but only for the first few batches
            predicted = logits.argmax(dim=1)
            miss = (predicted != target).nonzero().flatten()[: self.keep_wrong - have].cpu()
            self.wrong.append((images[miss].cpu(), predicted[miss].cpu(), target[miss].cpu()))

    def compute(self) -> dict:
        """Synced over all ranks (a collective: every rank must call it)."""
        out = {
            "val_acc": float(self.acc.compute()),
            "val_loss": float(self.loss.compute()),
            "val_samples": int(self.count.compute()),
            "confusion": self.confusion.compute().long().tolist(),  # rows: true class, columns: predicted
        }
        if self.keep_wrong:
            out["wrong"] = tuple(torch.cat(parts) for parts in zip(*self.wrong, strict=True)) if self.wrong else None
        self.reset()
        return out

    def reset(self) -> None:
        for m in (self.acc, self.loss, self.count, self.confusion):
            m.reset()
        self.wrong = []


@torch.no_grad()
def all_evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    metrics: EvalMetrics,
    autocast: Callable[[], AbstractContextManager],
    device: torch.device,
) -> dict[str, float]:
    """The test set through `model` (the plain NNModel, not its DDP wrapper: no collectives per batch)."""
    was_training = model.training
    model.eval()
    # FSDP: the weights gathered once, not per batch (ranks' batch counts differ); TP: a plain copy of them
    with parallel.gathered(model) as full_model:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = full_model(x)
            metrics.update(logits, y, x)
    model.train(was_training)
    return metrics.compute()


class TrainTally:
    """Sums of loss, correct predictions and samples of one epoch, kept on the device. `counted`: whether this
    rank's samples count -- with tensor parallelism the ranks of one TP group train on the same samples (and
    compute the same logits), so only the first of each group (TP coordinate 0; rank 0 among them) adds them.

    Each step's loss, logits and targets are kept and added up every ``COUNT_EVERY`` steps and whenever the sums
    are read: the losses one by one in step order (float sums depend on their order: a resumed epoch adds them as
    the uninterrupted one did), the correct predictions with one argmax over all the kept steps (an integer count
    is the same whatever the grouping). On a CPU, adding up per step took ~4% of a step; on a GPU it was five
    kernel launches a step."""

    COUNT_EVERY = 64

    def __init__(self, device: torch.device, counted: bool = True) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.loss_sum, self.correct, self.count = self.sums.unbind()  # views: updated in place, no indexing
        self.counted = counted
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (logits, target, loss) not yet added

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, defer: bool = True) -> None:
        """Every step, no host sync: the step kept for the next :meth:`add_kept`. ``defer=False`` adds it at once
        (a CUDA graph replays the step: its logits buffer is rewritten every replay)."""
        if not self.counted:
            return
        self.kept.append((logits.detach(), target, loss.detach()))
        if not defer or len(self.kept) >= self.COUNT_EVERY:
            self.add_kept()

    def add_kept(self) -> None:
        """The kept steps into the sums, on the device."""
        if not self.kept:
            return
        logits, targets, losses = zip(*self.kept, strict=True)
        self.kept = []
        for loss, target in zip(losses, targets, strict=True):
            self.loss_sum.add_(loss, alpha=target.shape[0])
        target = torch.cat(targets)
        self.correct.add_((torch.cat(logits).argmax(dim=1) == target).sum())
        self.count.add_(target.shape[0])

    def nonfinite(self) -> torch.Tensor:
        """1 (on the device, no host sync) if a non-finite loss went into this epoch's sums, else 0."""
        self.add_kept()
        return (~torch.isfinite(self.loss_sum)).to(torch.int32)

    def all_state(self) -> TallySums:
        """The epoch's sums so far, reduced over all ranks (a collective): what a mid-epoch checkpoint keeps."""
        self.add_kept()
        return TallySums(*dist.all_reduce_sum(self.sums.clone()).tolist())

    def restore(self, sums: TallySums | None, is_zero: bool) -> None:
        """Continue an epoch from a checkpoint: rank 0 carries the reduced sums, the others start at zero."""
        self.sums.zero_()
        self.kept = []
        if sums and is_zero:
            self.sums.copy_(torch.tensor([sums.loss_sum, sums.correct, sums.count], dtype=torch.float64))

    def all_compute(self) -> dict[str, float]:
        """Reduced over all ranks (a collective), then reset."""
        self.add_kept()
        sums = dist.all_reduce_sum(self.sums.clone()).tolist()
        self.sums.zero_()
        loss_sum, correct, count = sums
        return {
            "train_loss": loss_sum / count if count else float("nan"),
            "train_acc": correct / count if count else float("nan"),
            "train_samples": int(count),
        }
