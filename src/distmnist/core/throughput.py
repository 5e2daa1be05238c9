"""Where a step's time goes, at next to no cost per step: the FLOPs of one optimizer step counted once, the
achieved FLOP/s and MFU of each epoch, and the share of its training time the loop spent waiting for batches.

* FLOPs are counted, not estimated: one forward and backward of the model on the meta device (no memory, no
  arithmetic) under ``torch.utils.flop_counter.FlopCounterMode``, once when the run's records are made (~10 ms
  in a training process; the first count in a bare interpreter also imports torch._dynamo, ~1.5 s). For this MLP the
  common 6·N·B estimate is ~40% off (the first layer's input gradient is never computed): 32.5 MFLOP per step of
  64 samples counted, 45.4 estimated.
* MFU = achieved FLOP/s over the peak of all the job's devices: ``train.peak_flops`` (per device) when set, else
  the datasheet peak of a known GPU for the run's precision (:data:`CUDA_PEAKS`), else none.
* Data wait: ``perf_counter`` around each ``next()`` of the training batches (:class:`DataWait`), two clock
  reads a step; the share is of the epoch's training seconds, on rank 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from distmnist.core.model import NNModel

# Dense peak FLOP/s per GPU from NVIDIA's datasheets (SXM parts; no sparsity): fp32, tf32 (when torch lets fp32
# matmuls use it), 16-bit (bf16 and fp16). Matched against torch.cuda.get_device_name(); a name not here (or
# another form factor such as NVL) has no known peak: set train.peak_flops.
CUDA_PEAKS = {
    "H100 PCIe": {"fp32": 51.2e12, "tf32": 378e12, "16": 756e12},
    "H100": {"fp32": 66.9e12, "tf32": 494.7e12, "16": 989.4e12},
    "H200": {"fp32": 66.9e12, "tf32": 494.7e12, "16": 989.4e12},
}


def count_step_flops(hidden: Sequence[int], batch_size: int) -> int:
    """FLOPs of one forward + backward of the NNModel on `batch_size` samples, counted (meta tensors: instant)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = NNModel(hidden)
        x = torch.empty(batch_size, 1, 28, 28)
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def known_peak(device: torch.device, precision: str) -> float | None:
    """The datasheet peak FLOP/s of `device` for `precision`, or None where it is not known (any CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "NVL" in name:
        return None
    for model, peaks in CUDA_PEAKS.items():
        if model in name:
            if precision != "32-true":
                return peaks["16"]
            tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
            return peaks["tf32" if tf32 else "fp32"]
    return None


class DataWait:
    """Seconds spent inside the training batches' ``next()`` (this rank), accumulated over an epoch."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        clock = time.perf_counter
        while True:
            started = clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += clock() - started
            yield batch


class WaitedBatches:
    """Training batches whose ``next()`` is timed into `wait`, for a loop that iterates them itself (the
    Lightning Trainer); ``sampler`` (Lightning calls ``set_epoch`` on it) and ``len`` are the batches' own."""

    def __init__(self, batches, wait: DataWait) -> None:
        self.batches, self.wait = batches, wait
        self.sampler = batches.sampler

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        return self.wait.timed(self.batches)


class Throughput:
    """The FLOPs of the job's optimizer step (counted once) and the device peak, turned into each epoch's figures."""

    def __init__(self, hidden: Sequence[int], batch_size: int, global_batch: int, world_size: int,
                 device: torch.device, precision: str, peak_flops: float | None) -> None:
        self.flops_per_sample = count_step_flops(hidden, batch_size) / batch_size
        self.flops_per_step = self.flops_per_sample * global_batch  # every process's micro-batches together
        peak = peak_flops if peak_flops is not None else known_peak(device, precision)
        self.peak = None if peak is None else peak * world_size  # the job's devices together

    def epoch(self, train_samples: int, train_s: float, wait_s: float) -> dict[str, float]:
        """flops_per_sec, mfu (when a peak is known), data_wait_s and data_wait_share of one epoch."""
        rate = self.flops_per_sample * train_samples / train_s if train_s > 0 else float("nan")
        out = {"flops_per_sec": rate}
        if self.peak is not None:
            out["mfu"] = rate / self.peak
        out["data_wait_s"] = wait_s
        out["data_wait_share"] = wait_s / train_s if train_s > 0 else float("nan")
        return out

    def summary(self, train_samples: int, train_s: float, wait_s: float) -> dict[str, float]:
        """The run's figures (metrics.json): flops_per_step (the job's optimizer step), flops_per_sample, peak_flops
        (when known), and over all its epochs train_flops_per_sec, train_mfu, data_wait_share."""
        out = {"flops_per_step": self.flops_per_step, "flops_per_sample": self.flops_per_sample}
        if self.peak is not None:
            out["peak_flops"] = self.peak
        rate = self.flops_per_sample * train_samples / train_s if train_s > 0 else None
        out["train_flops_per_sec"] = rate
        if self.peak is not None:
            out["train_mfu"] = None if rate is None else rate / self.peak
        out["data_wait_share"] = wait_s / train_s if train_s > 0 else None
        return out
