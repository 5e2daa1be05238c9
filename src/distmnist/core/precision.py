"""Lightning's precision vocabulary for the raw PyTorch loop: `32-true`, `16-mixed`, `bf16-mixed`.

The same mapping as Lightning's ``MixedPrecision`` plugin: ``torch.autocast`` with float16 (+ ``GradScaler``)
or bfloat16; `32-true` is plain float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from distmnist.core.errors import DistMnistError

AUTOCAST_DTYPE = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def check_precision(precision: str, device: torch.device) -> None:
    """16-mixed is float16 autocast with a GradScaler: CUDA only (Lightning would quietly switch to bf16)."""
    if precision == "16-mixed" and device.type != "cuda":
        raise DistMnistError("train.precision=16-mixed needs CUDA; on CPU use train.precision=bf16-mixed")


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    check_precision(precision, device)
    dtype = AUTOCAST_DTYPE.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active for 16-mixed only (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
