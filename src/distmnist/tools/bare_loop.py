"""The bench's two bare baselines: distmnist's model and recipe in the loop the tutorials write, over resident
tensors, with nothing of distmnist (only torch) -- no metrics, no logging, no checkpoints, no stop checks.

    python bare_loop.py --data split.pt --out times.json                            # `floor`: one process, no DDP
    torchrun --nproc_per_node=3 bare_loop.py --data split.pt --out times.json       # `stock-ddp`

* ``floor``: one process, the plain model: forward, loss, backward, optimizer step, schedule step. What this machine
  can do with the model and recipe, the bench's yardstick.
* ``stock-ddp`` (under torchrun): the same loop with the model in ``DistributedDataParallel`` as the tutorials
  write it -- torch's default buckets (25 MiB: the whole MLP is one bucket), no DistributedSampler: each epoch a
  permutation seeded with seed + epoch, padded to a multiple of W with its start (as DistributedSampler pads:
  every rank takes as many steps), rank r takes positions r, r+W, ... of it, batch by batch.

``--data`` is a file of ``{"train": (images, labels), "test": (images, labels)}`` (uint8 [N, 28, 28], int64 [N]),
what ``distmnist bench`` writes from the config's data; pixels as ToTensor gives them. The initial weights are
distmnist's (``torch.manual_seed(seed)`` then the layers in order). Rank 0 writes the epoch times, the job's
training samples per epoch and the test accuracy after the last epoch to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a .pt file of {'train': (images, labels), 'test': (...)}")
    p.add_argument("--out", required=True, help="JSON file for the epoch times (rank 0)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--hidden", default="128,128")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default="32-true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class NeuralNetwork(nn.Module):
    """The PyTorch quickstart's model, as distmnist's NNModel is (the same modules, names and calls)."""

    def __init__(self, hidden: list[int]) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers, width = [], 28 * 28
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.linear_relu_stack = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


def build_model(hidden: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return NeuralNetwork(hidden)


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank() if world_size > 1 else 0

    split = torch.load(args.data, weights_only=True)
    images, labels = split["train"]
    x = images.unsqueeze(1).to(torch.float32).div(255).to(device)
    y = labels.to(device)
    model = build_model([int(h) for h in args.hidden.split(",")], args.seed).to(device)
    net = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_rank = math.ceil(len(y) / world_size)
    steps = math.ceil(per_rank / args.batch_size)
    total = max(1, args.epochs * steps)
    factor = (lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))) if args.schedule == "cosine" else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor or (lambda t: 1.0))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")

    times = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = torch.cat([order, order[: per_rank * world_size - len(y)]])
        mine = order[rank::world_size].to(device)
        for i in range(0, len(mine), args.batch_size):
            b = mine[i : i + args.batch_size]
            xb, yb = x.index_select(0, b), y.index_select(0, b)  # (on a CPU x[b] takes twice as long)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)

    if rank == 0:
        test_images, test_labels = split["test"]
        model.eval()
        with torch.no_grad():
            logits = model(test_images.unsqueeze(1).to(torch.float32).div(255).to(device))
        val_acc = (logits.argmax(1).cpu() == test_labels).float().mean().item()
        result = {"times": times, "samples": per_rank * world_size, "val_acc": val_acc, "device": device.type}
        with open(args.out, "w") as f:
            json.dump(result, f)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
