"""The two tutorial rows of ``distmnist bench`` (``tools/bench.py``), written as the tutorials write them:

* ``tutorial``: the PyTorch quickstart loop -- torchvision dataset + ``ToTensor`` + ``DataLoader`` (no workers),
  forward / loss / backward / step / zero_grad, ``loss.item()`` every 100 batches;
* ``tutorial-lightning``: the Lightning introduction -- a LightningModule with ``self.log`` of the loss every step,
  the same DataLoader, a default ``Trainer`` (progress bar, logger, checkpointing).

Each returns the seconds of each epoch after `warmup`, the samples of one epoch and the final val_acc.
"""

from __future__ import annotations

import tempfile
import time

import torch
import torch.nn.functional as F

from distmnist.core import data
from distmnist.core.config import Config
from distmnist.core.dist import pick_device
from distmnist.core.model import build_model, build_optimizer


def tutorial_dataset(cfg: Config, train: bool):
    """torchvision's dataset with ToTensor, as in the tutorials (synthetic data through the same per-sample path)."""
    from torchvision.transforms import ToTensor

    if cfg.data.name == "synthetic":
        return data.ImageSet(*data.load_split(cfg.data, train))
    ds = data.torchvision_class(cfg.data.name)(cfg.data.root, train=train, download=False, transform=ToTensor())
    limit = cfg.data.train_samples if train else cfg.data.test_samples
    return torch.utils.data.Subset(ds, range(limit)) if limit else ds


def run_tutorial(cfg: Config, epochs: int, warmup: int) -> dict:
    """The PyTorch quickstart loop, verbatim in structure (model: the package's NNModel, recipe: the config's)."""
    device = pick_device(cfg.train.accelerator)
    train_loader = torch.utils.data.DataLoader(tutorial_dataset(cfg, True), batch_size=cfg.data.batch_size)
    test_loader = torch.utils.data.DataLoader(tutorial_dataset(cfg, False), batch_size=cfg.data.batch_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.hidden, cfg.seed).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = build_optimizer(cfg.optim, model.parameters())
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "16-mixed")
    times = []
    for _ in range(warmup + epochs):
        model.train()
        started = time.perf_counter()
        for batch, (X, y) in enumerate(train_loader):
            X, y = X.to(device), y.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                pred = model(X)
                loss = loss_fn(pred, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if batch % 100 == 0:
                loss = loss.item()  # the tutorial prints it
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for X, y in test_loader:
            X, y = X.to(device), y.to(device)
            correct += (model(X).argmax(1) == y).type(torch.float).sum().item()
            total += len(y)
    return {"times": times[warmup:], "samples": len(train_loader.dataset), "val_acc": correct / total,
            "device": device.type}


def run_tutorial_lightning(cfg: Config, epochs: int, warmup: int) -> dict:
    """The Lightning introduction: LightningModule + self.log every step + default Trainer."""
    import lightning as L

    device = pick_device(cfg.train.accelerator)

    class LitModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model(cfg.model.hidden, cfg.seed)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return build_optimizer(cfg.optim, self.parameters())

    class EpochTimer(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, module):
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_epochs=warmup + epochs, accelerator=device.type, devices=1,
                            precision=cfg.train.precision, callbacks=[timer], default_root_dir=tmp,
                            num_sanity_val_steps=0, enable_model_summary=False)
        train_loader = torch.utils.data.DataLoader(tutorial_dataset(cfg, True), batch_size=cfg.data.batch_size)
        test_loader = torch.utils.data.DataLoader(tutorial_dataset(cfg, False), batch_size=cfg.data.batch_size)
        trainer.fit(LitModel(), train_loader, test_loader)
    return {"times": timer.times[warmup:], "samples": len(train_loader.dataset),
            "val_acc": float(trainer.callback_metrics["val_acc"]), "device": device.type}
