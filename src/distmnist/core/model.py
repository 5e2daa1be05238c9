"""The one model: the MLP of the classic PyTorch/Lightning MNIST introduction."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from distmnist.core.errors import DistMnistError

IMAGE_SIZE = 28 * 28
NUM_CLASSES = 10


class NNModel(nn.Module):
    """Flatten -> Linear 784->h1 -> ReLU -> ... -> Linear h_k->10 (default hidden=(128, 128))."""

    def __init__(self, hidden: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        self.hidden = list(hidden)
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = IMAGE_SIZE
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.linear_relu_stack = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


def build_model(hidden: Sequence[int], seed: int) -> NNModel:
    """The same initial weights on every rank and under every strategy: built from `seed`, on the CPU.

    The global RNG is left as it was, so whatever ran before cannot change the weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NNModel(hidden)


def hidden_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state_dict") -> list[int]:
    """Hidden sizes of the NNModel that `state` belongs to; DistMnistError when it is not one."""
    if not isinstance(state, Mapping) or not state:
        raise DistMnistError(f"{source} is not the state_dict of distmnist's MLP (expected a mapping of tensors)")
    weights = []
    i = 0
    while f"linear_relu_stack.{i}.weight" in state:
        weights.append(state[f"linear_relu_stack.{i}.weight"])
        i += 2
    expected = {f"linear_relu_stack.{j}.{p}" for j in range(0, i, 2) for p in ("weight", "bias")}
    if not weights or set(state) != expected or not all(isinstance(w, torch.Tensor) for w in state.values()):
        raise DistMnistError(
            f"{source} is not the state_dict of distmnist's MLP (keys {sorted(state)[:4]}...); give the model.pt of a "
            f"distmnist run"
        )
    shapes_ok = weights[0].dim() == 2 and weights[0].shape[1] == IMAGE_SIZE and weights[-1].shape[0] == NUM_CLASSES
    for a, b in zip(weights, weights[1:], strict=False):
        shapes_ok = shapes_ok and b.dim() == 2 and b.shape[1] == a.shape[0]
    if not shapes_ok:
        raise DistMnistError(f"{source} has the MLP's keys but the layer shapes do not chain 784 -> ... -> 10")
    return [int(w.shape[0]) for w in weights[:-1]]


def weights_in(obj: Mapping) -> Mapping | None:
    """The NNModel state_dict a checkpoint holds: raw DDP and Fabric keep it under 'model', the Lightning Trainer
    under 'state_dict' with the LightningModule's 'model.' prefix; None if neither."""
    if isinstance(obj.get("model"), Mapping):
        return obj["model"]
    if isinstance(obj.get("state_dict"), Mapping):
        return {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    return None


def load_model(path: str | Path, state: Mapping | None = None) -> NNModel:
    """An NNModel from a model.pt (or from `state`, read from `path` already: a checkpoint's weights);
    DistMnistError if it is not an NNModel state_dict."""
    path = Path(path)
    if state is None:
        if not path.is_file():
            raise DistMnistError(f"--model {path} does not exist; give a run dir, its model.pt or a checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle, zip and EOF errors
            first = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
            raise DistMnistError(f"--model {path} is not a distmnist model.pt ({first})") from None
    model = NNModel(hidden_from_state_dict(state, source=f"--model {path}"))
    model.load_state_dict(state)
    return model


def build_optimizer(optim, params) -> torch.optim.Optimizer:
    """The optimizer of `optim` (config.OptimConfig) over `params`."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    raise DistMnistError(f"unknown optimizer {optim.name!r}")


def build_scheduler(optim, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: `constant`, or `cosine` from optim.lr down to 0 at the last step."""
    if optim.schedule == "cosine":
        total = max(1, total_steps)

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    else:

        def factor(step: int) -> float:
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
