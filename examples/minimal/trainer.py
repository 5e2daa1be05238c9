"""The distmnist MLP trained with the Lightning Trainer (strategy="ddp"): the pattern and nothing else.

    torchrun --standalone --nproc_per_node=2 examples/minimal/trainer.py --data-root data --dataset fashion-mnist

The model, the recipe and the data order of ``python -m distmnist.trainer -c fashion``: SGD with momentum 0.9,
lr 0.05 decayed to 0 by a per-step cosine, batch 64 per process, seed 0, pixels as ToTensor gives them.
docs/copying.md says what the full version adds and why.
"""

import argparse
import math
import os
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.classification import MulticlassAccuracy
from torchvision import datasets, transforms

DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="holds MNIST/raw or FashionMNIST/raw (torchvision's)")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=None, help="train on the first N samples only")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    args = parser.parse_args()
    raw = Path(args.data_root) / DATASETS[args.dataset].__name__ / "raw"
    if not raw.is_dir():
        parser.error(f"{raw} does not exist; put the four IDX files there, e.g. with `distmnist data prepare "
                     f"--name {args.dataset} --from DIR --root {args.data_root}`")
    return args


def loaders(args: argparse.Namespace, rank: int, world_size: int):
    # uint8 / 255 as float32, no normalisation (as distmnist)
    train = DATASETS[args.dataset](args.data_root, train=True, transform=transforms.ToTensor())
    test = DATASETS[args.dataset](args.data_root, train=False, transform=transforms.ToTensor())
    if args.train_samples:
        train = Subset(train, range(args.train_samples))
    # rank r takes samples r, r+W, ... of a permutation seeded with seed + epoch (set_epoch), the epoch padded
    # to a multiple of W by repeating its start
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                              persistent_workers=args.workers > 0)
    # the test set unpadded (a DistributedSampler would repeat samples): rank r takes r, r+W, ..., each once
    test_loader = DataLoader(Subset(test, range(rank, len(test), world_size)), batch_size=1000)
    return sampler, train_loader, test_loader


def build_model(seed: int) -> nn.Module:
    # the same initial weights on every rank
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # lr x (1 + cos(pi t / T)) / 2 at step t: from lr down to 0 at the last step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))


class MNISTModule(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.model = build_model(args.seed)
        # correct / seen, both summed over the ranks by compute(): exact over the whole test set
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self.model(x), y)

    def on_validation_epoch_end(self) -> None:
        val_acc = self.val_acc.compute().item()
        self.val_acc.reset()
        self.print(f"epoch {self.current_epoch + 1}/{self.args.epochs} val_acc={val_acc:.4f}", flush=True)
        self.last_val_acc = val_acc

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.args.lr, momentum=self.args.momentum)
        scheduler = cosine(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    args = parse_args()
    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the Trainer picks the device
    # (cuda:LOCAL_RANK or the CPU) and the backend (nccl or gloo)
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    num_nodes = int(os.environ.get("WORLD_SIZE", 1)) // devices
    # use_distributed_sampler=False: our samplers (Lightning's would split and pad the test set again);
    # Lightning still calls the training sampler's set_epoch. No logger, no checkpoints: the run writes nothing.
    # A rank that dies or stalls fails the others after 5 minutes instead of hanging them.
    trainer = L.Trainer(accelerator="auto", devices=devices, num_nodes=num_nodes,
                        strategy=DDPStrategy(timeout=timedelta(minutes=5)), max_epochs=args.epochs,
                        use_distributed_sampler=False, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    _, train_loader, test_loader = loaders(args, trainer.global_rank, trainer.world_size)
    module = MNISTModule(args)
    trainer.fit(module, train_loader, test_loader)
    # after Lightning's own last words
    if trainer.is_global_zero:
        print(f"done: val_acc={module.last_val_acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
