"""Lightning Fabric: our own loop, Fabric takes care of devices, DDP, precision and launching.

    torchrun --nproc_per_node=4 -m distmnist.fabric [-c CONFIG] [section.key=value ...]
    python -m distmnist.fabric ...          # one process

What is specific to Fabric: ``Fabric(accelerator, strategy, devices, num_nodes, precision)`` with devices and
nodes read from the launcher's environment, ``fabric.launch()``, ``fabric.setup(model, optimizer)``,
``fabric.autocast()`` + ``fabric.backward(loss)``, and ``fabric.save`` / ``fabric.load`` for checkpoints. The
loop, data, metrics and records are the shared ones (``loop.py``), the same as raw DDP's.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import timedelta

import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy

from distmnist import loop
from distmnist.core import checkpoint, data, dist
from distmnist.core.args import strategy_main
from distmnist.core.config import Config
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.precision import check_precision
from distmnist.core.run import RunDir

NAME = "fabric"


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)
    check_precision(cfg.train.precision, env.device)
    fabric = Fabric(
        accelerator=env.device.type,
        devices=env.local_world_size,
        num_nodes=env.num_nodes,
        strategy=DDPStrategy(timeout=timedelta(seconds=cfg.dist.timeout_s)) if env.world_size > 1 else "auto",
        precision=cfg.train.precision,
        plugins=[checkpoint.checkpoint_io(), dist.lightning_environment(env)],
    )
    fabric.launch()
    env = replace(env, rank=fabric.global_rank, world_size=fabric.world_size, device=fabric.device)
    try:
        model = build_model(cfg.model.hidden, cfg.seed)
        optimizer = build_optimizer(cfg.optim, model.parameters())
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.epochs * data.steps_per_epoch(cfg.data, env.world_size))
        net, optimizer = fabric.setup(model, optimizer)  # moves `model` to the device, wraps it in DDP

        def forward_backward(x, y):
            with fabric.autocast():
                logits = net(x)
                loss = F.cross_entropy(logits, y)
            fabric.backward(loss)
            return logits, loss

        state = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
        scaler = getattr(fabric.strategy.precision, "scaler", None)  # 16-mixed: the plugin's GradScaler
        if scaler is not None:
            state["scaler"] = scaler
        strategy = loop.Strategy(
            name=NAME,
            env=env,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            forward_backward=forward_backward,
            optimizer_step=optimizer.step,
            autocast=fabric.autocast,
            state=state,
            save=fabric.save,
            load=fabric.load,
        )
        return loop.fit(cfg, RunDir(cfg, NAME, env), strategy)
    finally:
        dist.destroy_process_group()


main = strategy_main(NAME, train)


if __name__ == "__main__":
    sys.exit(main())
