"""Raw PyTorch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=4 -m distmnist.ddp [-c CONFIG] [section.key=value ...]
    python -m distmnist.ddp ...            # one process, no process group

What is specific to raw DDP: the process group (``dist.py``), wrapping the model in
``DistributedDataParallel``, ``torch.autocast`` + ``GradScaler`` for mixed precision, and saving checkpoints
from rank 0. The loop, data, metrics and logging are the shared ones (``loop.py``).
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distmnist import loop
from distmnist.core import checkpoint, data, dist
from distmnist.core.args import strategy_main
from distmnist.core.config import Config
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.precision import autocast_factory, grad_scaler
from distmnist.core.run import RunDir

NAME = "ddp"


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)
    autocast = autocast_factory(cfg.train.precision, env.device)
    with dist.process_group(env, cfg.dist.timeout_s):
        model = build_model(cfg.model.hidden, cfg.seed).to(env.device)
        optimizer = build_optimizer(cfg.optim, model.parameters())
        total_steps = cfg.train.epochs * data.steps_per_epoch(cfg.data, env.world_size)
        scheduler = build_scheduler(cfg.optim, optimizer, total_steps)
        scaler = grad_scaler(cfg.train.precision, env.device)
        # one process needs no DDP wrapper: same arithmetic (averaging over 1 rank), no bucket overhead
        net = model
        if env.world_size > 1:
            net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

        def forward_backward(x, y):
            with autocast():
                logits = net(x)
                loss = F.cross_entropy(logits, y)
            scaler.scale(loss).backward()
            return logits, loss

        def optimizer_step():
            scaler.step(optimizer)
            scaler.update()

        def save(path, state):
            if env.is_zero:
                checkpoint.save_state(path, state)
            dist.barrier()

        strategy = loop.Strategy(
            name=NAME,
            env=env,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            forward_backward=forward_backward,
            optimizer_step=optimizer_step,
            autocast=autocast,
            state={"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
            save=save,
            load=lambda path, state: checkpoint.load_state(checkpoint.read(path), state),
        )
        return loop.fit(cfg, RunDir(cfg, NAME, env), strategy)


main = strategy_main(NAME, train)


if __name__ == "__main__":
    sys.exit(main())
