"""Lightning Trainer with the DDP strategy and Lightning's mixed precision.

    torchrun --nproc_per_node=4 -m distmnist.trainer [-c CONFIG] [section.key=value ...]
    srun -n 4 python -m distmnist.trainer ...        # one SLURM task per process
    python -m distmnist.trainer ...                  # one process

What is specific to Lightning: a LightningModule around the shared NNModel, ``Trainer(strategy=DDPStrategy,
precision=...)`` with devices and nodes read from the launcher's environment, ``ModelCheckpoint`` and resume
through ``ckpt_path``, and the ``TensorBoardLogger`` whose writer receives the shared tag schema. The data order
(``use_distributed_sampler=False``: our sampler, not Lightning's), the metrics, and the records are the shared
ones, called from the module's hooks.
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from distmnist import checkpoint, config, data, dist
from distmnist.config import Config
from distmnist.metrics import EvalMetrics, TrainTally
from distmnist.model import build_model, build_optimizer, build_scheduler
from distmnist.precision import check_precision
from distmnist.rundir import RunDir

NAME = "trainer"

# Lightning 2.6 advertises a cloud logger on every start and trips a torch deprecation in its own pytree code:
# neither says anything about this run, so keep them out of the log.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Its hint about srun is moot: the cluster environment is chosen explicitly (dist.lightning_environment).
warnings.filterwarnings("ignore", message=r"The `srun` command is available")


class NNModule(L.LightningModule):
    """The shared NNModel (``self.model``) trained and evaluated with the shared metrics and records."""

    def __init__(self, cfg: Config, run: RunDir) -> None:
        super().__init__()
        self.cfg, self.run = cfg, run
        self.model = build_model(cfg.model.hidden, cfg.seed)
        self.val_metrics = EvalMetrics()
        self.tally: TrainTally | None = None
        self._lr = cfg.optim.lr
        self._started = 0.0
        self._train_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---------------------------------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        env = replace(self.run.env, rank=self.global_rank, world_size=self.trainer.world_size, device=self.device)
        self.run.env = env
        data.ensure_available(self.cfg.data, env)
        self.train_batches = data.train_batches(self.cfg, env)
        self.eval_batches = data.eval_batches(self.cfg, env)
        self.tally = TrainTally(self.device)

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

    def on_train_epoch_start(self) -> None:
        self._started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.tally.update(logits, y, loss)
        self._lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the lr of this step (a float, no sync)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        if step % self.cfg.train.log_every_n_steps == 0:
            value = self.run.log_step(step, outputs["loss"], self._lr)
            self.log("loss", value, prog_bar=True, logger=False, rank_zero_only=True)

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
        self.val_metrics.update(self.model(x), y)

    def on_validation_epoch_end(self) -> None:
        val = self.val_metrics.compute()  # synced over ranks by torchmetrics
        if self.fitting():
            train = self.tally.compute()
            self.run.end_epoch(self.current_epoch, self.trainer.global_step, train, val, self._train_s)

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["distmnist"] = self.run.meta(epoch=self.current_epoch, global_step=self.trainer.global_step)

    def on_load_checkpoint(self, ckpt: dict) -> None:
        self.run.restore(ckpt["distmnist"])


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)
    check_precision(cfg.train.precision, env.device)
    run = RunDir(cfg, NAME, env)
    run.prepare()
    found = run.newest_checkpoint()
    logger = TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False)
    strategy = DDPStrategy(timeout=timedelta(seconds=cfg.dist.timeout_s)) if env.world_size > 1 else "auto"
    trainer = L.Trainer(
        accelerator=env.device.type,
        devices=env.local_world_size,
        num_nodes=env.num_nodes,
        strategy=strategy,
        precision=cfg.train.precision,
        max_epochs=cfg.train.epochs,
        logger=logger,
        callbacks=[
            ModelCheckpoint(
                dirpath=run.ckpt_dir,
                filename="step={step:08d}",
                auto_insert_metric_name=False,
                monitor="step",
                mode="max",
                save_top_k=cfg.checkpoint.keep,
                every_n_epochs=1,
            )
        ],
        plugins=[checkpoint.checkpoint_io(), dist.lightning_environment(env)],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=cfg.train.progress,
        enable_model_summary=False,
        log_every_n_steps=cfg.train.log_every_n_steps,
        default_root_dir=str(run.path),
    )
    module = NNModule(cfg, run)
    if trainer.is_global_zero:
        run.open_tb(logger.experiment)
        if found is None:
            run.tb.hparams({**config.flat_dict(cfg), "strategy": NAME, "world_size": env.world_size})
    ckpt_path = str(found[0]) if found else None
    if ckpt_path and trainer.is_global_zero:
        print(f"[{NAME}] resuming from {ckpt_path}", flush=True)
    try:
        trainer.fit(module, ckpt_path=ckpt_path)
        summary = run.finish(module.model, trainer.global_step)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    from distmnist.cli import run_strategy

    return run_strategy(NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
