"""Lightning Trainer with the DDP strategy and Lightning's mixed precision.

    torchrun --nproc_per_node=4 -m distmnist.trainer [-c CONFIG] [section.key=value ...]
    srun -n 4 python -m distmnist.trainer ...        # one SLURM task per process
    python -m distmnist.trainer ...                  # one process

What is specific to Lightning: a LightningModule around the shared NNModel, ``Trainer(strategy=DDPStrategy,
precision=...)`` with devices and nodes read from the launcher's environment, Lightning checkpoints written by
``trainer.save_checkpoint`` (the ``RunCheckpoints`` callback: the same cadence and graceful stop as the other two)
and resumed through ``ckpt_path``, and the ``TensorBoardLogger`` whose writer receives the shared tag schema. The data order
(``use_distributed_sampler=False``: our sampler, not Lightning's), the metrics, and the records are the shared
ones, called from the module's hooks. On one GPU at 32-true, training_step runs the step raw DDP and Fabric
replay from a CUDA graph (``captured_step``); everywhere else it is Lightning's automatic optimization as written.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import replace
from datetime import timedelta

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from distmnist.core import checkpoint, data, dist
from distmnist.core.args import strategy_main
from distmnist.core.config import Config
from distmnist.core.errors import Stopped
from distmnist.core.metrics import EvalMetrics, TrainTally
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.precision import check_precision
from distmnist.core.run import RunDir
from distmnist.core.steps import StepRunner
from distmnist.core.stopping import StopRequest, signal_name

NAME = "trainer"

# Lightning 2.6 advertises a cloud logger on every start and trips a torch deprecation in its own pytree code:
# neither says anything about this run, so keep them out of the log.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Its hint about srun is moot: the cluster environment is chosen explicitly (dist.lightning_environment).
warnings.filterwarnings("ignore", message=r"The `srun` command is available")
# Mid-epoch resume is handled (NNModule.on_load_checkpoint positions the loader), unlike what it fears.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, except that a run stopped before it started (missing data, say) leaves no
    event file behind: finalize() does not create the writer just to flush it."""

    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            super().finalize(status)


class NNModule(L.LightningModule):
    """The shared NNModel (``self.model``) trained and evaluated with the shared metrics and records."""

    def __init__(self, cfg: Config, run: RunDir, fresh: bool = True) -> None:
        super().__init__()
        self.cfg, self.run, self._fresh = cfg, run, fresh
        self.model = build_model(cfg.model.hidden, cfg.seed)
        self.val_metrics = EvalMetrics()
        self.tally: TrainTally | None = None
        self.graph_step: StepRunner | None = None  # set at the start of training where the step is captured
        self._step = {"lr": cfg.optim.lr}  # a plain dict: no nn.Module.__setattr__ on every step
        self._started = 0.0
        self._train_s = 0.0
        self._resumed: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def __setattr__(self, name: str, value) -> None:
        # Lightning records the running hook's name before and after every hook call (~50 times a step);
        # nn.Module.__setattr__'s checks for parameters/modules/buffers cost ~1.5 us each time for this string
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ---------------------------------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        env = replace(self.run.env, rank=self.global_rank, world_size=self.trainer.world_size, device=self.device)
        self.run.env = env
        data.ensure_available(self.cfg.data, env)
        split = data.load_split(self.cfg.data, train=True)
        self.train_batches = data.train_batches(self.cfg, env, split)
        self.eval_batches = data.eval_batches(self.cfg, env)
        self.tally = TrainTally(self.device)
        self.val_metrics.keep_wrong = 32 if env.is_zero else 0
        self.run.start(split, self.logger.experiment if env.is_zero else None, fresh=self._fresh)

    def train_dataloader(self):
        return self.train_batches  # Lightning calls .sampler.set_epoch(epoch) on it each epoch

    def val_dataloader(self):
        return self.eval_batches

    # -------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        optimizer = build_optimizer(self.cfg.optim, self.model.parameters())
        total = self.cfg.train.epochs * data.steps_per_epoch(self.cfg.data, self.trainer.world_size)
        scheduler = build_scheduler(self.cfg.optim, optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self.graph_step = self.captured_step()  # the model is on its device and the optimizer holds its parameters
        self.run.begin_training(self.trainer.global_step)
        # resuming mid-epoch, Lightning skips on_train_epoch_start: count the epoch's earlier training time
        self._started = time.perf_counter() - self._resumed.get("epoch_train_s", 0.0)

    def on_train_epoch_start(self) -> None:
        self._started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self._step["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]  # this step's lr (a float, no sync)
        if self.graph_step is not None:
            return self.graph_step(x, y)  # forward, loss, backward and tally in one graph replay
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.tally.update(logits, y, loss)
        return loss

    # ------------------------------------------------------------------------------- captured step
    def captured_step(self) -> StepRunner | None:
        """On one CUDA device at 32-true (``train.cuda_graphs``): the step raw DDP and Fabric replay from a CUDA
        graph (``steps.StepRunner``: forward, loss, backward and the tally captured once), run inside
        training_step. Lightning's own backward and zero_grad then have nothing left to do (the hooks below), and
        its optimizer step reads the gradients the graph wrote: the arithmetic of the eager step. Other
        precisions keep Lightning's backward (16-mixed: its GradScaler scales the loss there)."""
        train = self.cfg.train
        if train.cuda_graphs and self.device.type == "cuda" and self.trainer.world_size == 1 \
                and train.precision == "32-true":
            return self.step_runner(capture=True)
        return None

    def step_runner(self, capture: bool) -> StepRunner:
        def forward_backward(x, y):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            return logits, loss

        # the optimizer step is Lightning's, after training_step returns
        params = [p for group in self.trainer.optimizers[0].param_groups for p in group["params"]]
        return StepRunner(forward_backward, lambda: None, params, self.tally, capture)

    def backward(self, loss, *args, **kwargs) -> None:
        if self.graph_step is None:  # the captured step has back-propagated already
            super().backward(loss, *args, **kwargs)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        x, y = batch
        if x.device == device:  # resident batches are there already
            return batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        if self.graph_step is not None:
            return  # the captured step zeroes before its backward (in place: the graph owns the gradient buffers)
        for group in optimizer.param_groups:  # optimizer.zero_grad() without its per-call profiler scope
            for p in group["params"]:
                p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        if step % self.cfg.train.log_every_n_steps == 0:
            shown = self.run.log_step(step, outputs["loss"], self._step["lr"])
            for key, value in shown.items():  # rank 0: the progress bar's loss and samples/s
                self.log(key, value, prog_bar=True, logger=False, rank_zero_only=True)

    # ------------------------------------------------------------------------------------ evaluation
    def fitting(self) -> bool:
        return self.trainer.state.fn == "fit"  # validation inside fit (trainer.training is False there)

    def on_validation_epoch_start(self) -> None:
        if self.fitting():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._train_s = time.perf_counter() - self._started

    def validation_step(self, batch, batch_idx) -> None:
        x, y = batch
        self.val_metrics.update(self.model(x), y, x)

    def on_validation_epoch_end(self) -> None:
        val = self.val_metrics.compute()  # synced over ranks by torchmetrics
        if self.fitting():
            train = self.tally.compute()
            self.run.end_epoch(self.current_epoch, self.trainer.global_step, train, val, self._train_s)

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, ckpt: dict) -> None:
        """Runs on every rank inside trainer.save_checkpoint (so the tally reduction is a proper collective)."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        in_epoch = progress.processed if progress.processed < len(self.train_batches) else 0
        ckpt["distmnist"] = self.run.meta(
            epoch=self.current_epoch + (0 if in_epoch else 1),
            step_in_epoch=in_epoch,
            global_step=self.trainer.global_step,
            epoch_train_s=time.perf_counter() - self._started if in_epoch else 0.0,
            tally=self.tally.state(),
        )

    def on_load_checkpoint(self, ckpt: dict) -> None:
        """Lightning prefetches a batch, so the loader cannot know how far training got: the checkpoint says."""
        meta = ckpt["distmnist"]
        self.run.restore(meta)
        self._resumed = meta
        if meta.get("step_in_epoch"):
            # before Lightning creates the epoch's iterator (FitLoop.setup_data), so both loaders start right there
            self.train_batches.set_epoch(meta["epoch"])
            self.train_batches.skip(meta["step_in_epoch"])
            self.tally.restore(meta.get("tally"), self.global_rank == 0)


class RunCheckpoints(Callback):
    """One checkpoint policy for the three strategies: end of epoch, every checkpoint.every_n_steps steps, and at
    the step boundary the ranks agree on after a SIGTERM/SIGUSR1; `checkpoint.keep` newest kept."""

    def __init__(self, run: RunDir) -> None:
        self.run, self.cfg = run, run.cfg
        self.stop = StopRequest()

    def save(self, trainer: L.Trainer) -> str:
        path = checkpoint.step_path(self.run.ckpt_dir, trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            checkpoint.prune(self.run.ckpt_dir, self.cfg.checkpoint.keep)
        return str(path)

    def on_train_start(self, trainer, pl_module) -> None:
        # again after Lightning registered its own SIGTERM handler (which would raise at the next step without a
        # checkpoint); installed before fit too, so that Lightning's teardown restores ours, not the default
        self.stop.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if batch_idx + 1 == len(pl_module.train_batches):
            return  # the end-of-epoch checkpoint follows the evaluation
        signum = self.stop.agreed(pl_module.device) if step % self.cfg.checkpoint.stop_check_every_n_steps == 0 else 0
        every = self.cfg.checkpoint.every_n_steps
        if signum or (every and step % every == 0):
            path = self.save(trainer)
            if signum:  # every rank raises at this same step; Lightning tears down and re-raises
                raise Stopped(
                    f"stopped by {signal_name(signum)} at step {step} (epoch {trainer.current_epoch + 1}); "
                    f"checkpoint {path}; run the same command again to resume"
                )

    def on_validation_end(self, trainer, pl_module) -> None:
        if pl_module.fitting():
            self.save(trainer)



def skip_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Lightning 2.6, with several processes, broadcasts rank 0's SIGTERM flag and reads it back (`.item()`, a
    host sync and a collective) before every training step. RunCheckpoints replaces Lightning's SIGTERM handler
    with StopRequest (checked every checkpoint.stop_check_every_n_steps steps, checkpoint first), so that flag
    stays 0: the per-step round trip is skipped. (Guarded: a Lightning without the method is left alone.)"""
    loop = trainer.fit_loop.epoch_loop
    if callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
        loop._broadcast_sigterm_tensor = lambda: None


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)
    check_precision(cfg.train.precision, env.device)
    if cfg.train.quiet:  # Lightning's banner lines ("GPU available: ...") too
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    run = RunDir(cfg, NAME, env)
    found = run.prepare()
    logger = RunLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False)
    checkpoints = RunCheckpoints(run)
    strategy = DDPStrategy(timeout=timedelta(seconds=cfg.dist.timeout_s)) if env.world_size > 1 else "auto"
    trainer = L.Trainer(
        accelerator=env.device.type,
        devices=env.local_world_size,
        num_nodes=env.num_nodes,
        strategy=strategy,
        precision=cfg.train.precision,
        max_epochs=cfg.train.epochs,
        logger=logger,
        # a bar redrawn every 20 steps, not every step: the per-step Python cost of the default shows on a GPU
        callbacks=[checkpoints, *([TQDMProgressBar(refresh_rate=20)] if run.progress else [])],
        enable_checkpointing=False,  # RunCheckpoints writes them
        plugins=[checkpoint.checkpoint_io(), dist.lightning_environment(env)],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=run.progress,
        enable_model_summary=False,
        log_every_n_steps=cfg.train.log_every_n_steps,
        default_root_dir=str(run.path),
    )
    skip_sigterm_broadcast(trainer)
    module = NNModule(cfg, run, fresh=found is None)
    ckpt_path = str(found[0]) if found else None
    if ckpt_path:
        run.say(f"resuming from {ckpt_path}", always=True)
    checkpoints.stop.install()
    try:
        with run.removed_if_refused():
            trainer.fit(module, ckpt_path=ckpt_path)
        checkpoints.stop.uninstall()  # left in place if training stops: a late SIGTERM must not kill the exit
        summary = run.finish(module.model, trainer.global_step)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return summary


main = strategy_main(NAME, train)


if __name__ == "__main__":
    sys.exit(main())
