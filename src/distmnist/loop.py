"""The training loop shared by raw DDP and Fabric: epochs, steps, evaluation, logging, checkpoints, resume.

A strategy file builds a :class:`Strategy` -- its forward/backward and optimizer step (composed by
``steps.StepRunner``, eagerly or from a CUDA graph), how to save and load its state -- and calls :func:`fit`. Everything else (data order, metrics, TensorBoard, checkpoints, outputs) is
the same code for both, so their arithmetic is the same; the Lightning Trainer reuses the same pieces
through its hooks (``trainer.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from distmnist.core import checkpoint, data, dist
from distmnist.core.config import Config
from distmnist.core.errors import Stopped
from distmnist.core.metrics import EvalMetrics, TrainTally, evaluate
from distmnist.core.run import RunDir
from distmnist.core.steps import StepRunner
from distmnist.core.stopping import StopRequest, signal_name


@dataclass
class Strategy:
    name: str
    env: dist.DistEnv
    model: nn.Module  # the plain NNModel: evaluated and saved as model.pt
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped after every optimizer step
    forward_backward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # -> logits, loss
    optimizer_step: Callable[[], None]
    autocast: Callable[[], AbstractContextManager]
    state: dict[str, Any]  # the stateful objects a checkpoint holds (model, optimizer, scheduler, scaler)
    save: Callable[[Path, dict[str, Any]], None]  # called on every rank; writes on rank 0
    load: Callable[[Path, dict[str, Any]], dict[str, Any]]  # restores `state` in place, returns the rest


def progress_bar(run: RunDir, total: int, initial: int, epoch: int):
    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch + 1}/{run.cfg.train.epochs}",
        disable=not run.progress,
        unit="step",
        mininterval=0.5,
        leave=False,
        dynamic_ncols=True,
    )


def resume_point(run: RunDir, s: Strategy, found: tuple[Path, dict] | None) -> dict[str, Any]:
    """Restore the checkpoint `run.prepare()` found (rank 0's choice, loaded by all)."""
    path = dist.broadcast_object(str(found[0]) if found else None)
    if path is None:
        return {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    rest = s.load(Path(path), s.state)
    meta = rest["distmnist"]
    run.restore(meta)
    run.say(f"resuming from {path} (epoch {meta['epoch'] + 1}, step {meta['global_step']})", always=True)
    return meta


def save_checkpoint(run: RunDir, s: Strategy, tally: TrainTally, position: dict[str, Any]) -> Path:
    """Every rank calls this at the same step (the tally reduction and the strategy's save are collectives)."""
    path = checkpoint.step_path(run.ckpt_dir, position["global_step"])
    meta = run.meta(**position, tally=tally.state())
    s.save(path, {**s.state, "distmnist": meta})
    if run.env.is_zero:
        checkpoint.prune(run.ckpt_dir, run.cfg.checkpoint.keep)
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(cfg: Config, run: RunDir, s: Strategy) -> dict[str, Any]:
    env = s.env
    found = run.prepare()
    data.ensure_available(cfg.data, env)
    split = data.load_split(cfg.data, train=True)
    train_batches = data.train_batches(cfg, env, split)
    eval_batches = data.eval_batches(cfg, env)
    metrics = EvalMetrics(keep_wrong=32 if env.is_zero else 0).to(env.device)
    tally = TrainTally(env.device)
    capture = cfg.train.cuda_graphs and env.device.type == "cuda" and env.world_size == 1
    params = [p for group in s.optimizer.param_groups for p in group["params"]]
    train_step = StepRunner(s.forward_backward, s.optimizer_step, params, tally, capture)

    pos = resume_point(run, s, found)
    global_step, skip = pos["global_step"], pos["step_in_epoch"]
    tally.restore(pos.get("tally") if skip else None, env.is_zero)
    run.start(split, fresh=found is None)

    log_every, ckpt_every = cfg.train.log_every_n_steps, cfg.checkpoint.every_n_steps
    stop_every = cfg.checkpoint.stop_check_every_n_steps
    stop = StopRequest().install()  # left in place if training stops: a late SIGTERM must not kill the exit
    run.begin_training(global_step)
    for epoch in range(pos["epoch"], cfg.train.epochs):
        train_batches.set_epoch(epoch)
        train_batches.skip(skip)
        bar = progress_bar(run, len(train_batches), skip, epoch)
        started = time.perf_counter() - (pos.get("epoch_train_s", 0.0) if skip else 0.0)
        for step_in_epoch, (x, y) in enumerate(train_batches, start=skip + 1):
            if x.device != env.device:  # the DataLoader path; resident batches are there already
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            loss = train_step(x, y)
            global_step += 1
            if global_step % log_every == 0:
                shown = run.log_step(global_step, loss, s.optimizer.param_groups[0]["lr"])
                if shown:
                    bar.set_postfix(step=global_step, loss=f"{shown['loss']:.4f}",
                                    **{"samples/s": f"{shown['samples/s']:,.0f}"}, refresh=False)
            s.scheduler.step()
            bar.update()
            if step_in_epoch == len(train_batches):
                break  # the end-of-epoch checkpoint follows the evaluation
            signum = stop.agreed(env.device) if global_step % stop_every == 0 else 0
            if signum or (ckpt_every and global_step % ckpt_every == 0):
                position = dict(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                                epoch_train_s=time.perf_counter() - started)
                path = save_checkpoint(run, s, tally, position)
                if signum:
                    bar.close()
                    raise Stopped(
                        f"stopped by {signal_name(signum)} at step {global_step} (epoch {epoch + 1}); "
                        f"checkpoint {path}; run the same command again to resume"
                    )
        synchronize(env.device)
        train_s = time.perf_counter() - started
        bar.close()
        skip = 0
        train_stats = tally.compute()
        val_stats = evaluate(s.model, eval_batches, metrics, s.autocast, env.device)
        run.end_epoch(epoch, global_step, train_stats, val_stats, train_s)
        save_checkpoint(run, s, tally, dict(epoch=epoch + 1, step_in_epoch=0, global_step=global_step))
    stop.uninstall()

    if pos["epoch"] >= cfg.train.epochs:
        run.say(f"{run.path} already holds {pos['epoch']} epochs; raise train.epochs to train more", always=True)
    summary = run.finish(s.model, global_step)
    dist.barrier()
    return summary
