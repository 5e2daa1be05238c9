"""Lightning Trainer with the DDP strategy and Lightning's mixed precision.

    torchrun --nproc_per_node=4 -m distmnist.trainer [-c CONFIG] [section.key=value ...]
    srun -n 4 python -m distmnist.trainer ...        # one SLURM task per process
    python -m distmnist.trainer ...                  # one process

What a Lightning user expects: a LightningModule (``training_step``, ``validation_step``,
``configure_optimizers``) around the shared NNModel, a LightningDataModule with the shared data order
(``use_distributed_sampler=False``: our sampler, not Lightning's), and callbacks for what the run records and for
its checkpoints (the same cadence, graceful stop and resume position as ``ddp.py`` and ``fabric.py``), all given
to ``Trainer(strategy=DDPStrategy, precision=...)``. Whatever reaches past Lightning's public API for speed or
correctness is in ``lightning/internals.py``, not here.
"""

from __future__ import annotations

import time
from datetime import timedelta

import lightning as L
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from distmnist.core import data, dist, parallel
from distmnist.core.args import strategy_main
from distmnist.core.config import Config
from distmnist.core.dist import DistEnv
from distmnist.core.errors import exit_process
from distmnist.core.metrics import EvalMetrics, TrainTally
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.precision import check_precision
from distmnist.core.records import Records
from distmnist.core.run import RunDir
from distmnist.core.state import TrainState
from distmnist.core.steps import capture_applies
from distmnist.core.stopping import CheckpointAndStopPolicy
from distmnist.lightning import adapters, dispatch, internals

NAME = "trainer"


class LitClassifier(L.LightningModule):
    """The shared NNModel, its loss and optimizer; the training tally and the exact evaluation metrics."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model.hidden, cfg.seed)
        self.val_metrics = EvalMetrics()

    def setup(self, stage: str) -> None:
        lay = parallel.layout(self.cfg, self.trainer.world_size)
        # running sums of the epoch's loss/accuracy, no host sync per step (a tensor-parallel group's samples once)
        self.tally = TrainTally(self.device, counted=lay.tp_rank(self.global_rank) == 0)
        self.val_metrics.keep_wrong = 32 if self.global_rank == 0 else 0  # misclassified images for TensorBoard

    def configure_model(self) -> None:
        """train.parallel=fsdp or train.tp_size > 1: ModelParallelStrategy hands over its device mesh; the layout of
        core.parallel (TP on the first two Linears, FSDP2 on each Linear, then the root). With DDP there is no mesh
        and nothing to do."""
        if self.device_mesh is not None:
            adapters.parallelize_fn(self.cfg.train.precision, self.cfg.train.parallel)(self.model, self.device_mesh)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.tally.update(logits, y, loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        # FSDP: weights gathered once, not per batch (batch counts differ); TP: a plain copy of the full weights
        # a tuple, not a module attribute: the model it holds must not join the checkpoint's state_dict
        gathered = parallel.gathered(self.model)
        self.evaluating = (gathered, gathered.__enter__())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_metrics.update(self.evaluating[1](x), y, x)

    def on_validation_epoch_end(self) -> None:
        self.evaluating[0].__exit__(None, None, None)
        del self.evaluating

    def configure_optimizers(self):
        optimizer = build_optimizer(self.cfg.optim, self.model.parameters())
        dp_size = parallel.layout(self.cfg, self.trainer.world_size).dp
        total = self.cfg.train.epochs * data.steps_per_epoch(self.cfg, dp_size)  # optimizer steps
        scheduler = build_scheduler(self.cfg.optim, optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MNISTData(L.LightningDataModule):
    """The shared batches: data-parallel rank r takes perm[r::D] of each epoch's global order (the ranks of a
    tensor-parallel group the same); exact, unpadded evaluation. The training batches go through `records.timed`:
    the seconds spent waiting for them, in each epoch's record."""

    def __init__(self, cfg: Config, env: DistEnv, records: Records) -> None:
        super().__init__()
        self.cfg, self.env, self.records = cfg, env, records

    def setup(self, stage: str) -> None:
        data.all_ensure_available(self.cfg.data, self.env)  # local rank 0 prepares (locked), the others wait
        self.split = data.load_split(self.cfg.data, train=True)
        self.train_batches = data.train_batches(self.cfg, self.env, self.split)
        self.eval_batches = data.eval_batches(self.cfg, self.env)

    def train_dataloader(self):
        # Lightning calls .sampler.set_epoch(epoch) on it each epoch; with accumulation it gets the micro-batches
        accumulate = self.trainer.accumulate_grad_batches
        batches = data.MicroBatches(self.train_batches, accumulate) if accumulate > 1 else self.train_batches
        return self.records.timed(batches)

    def val_dataloader(self):
        return self.eval_batches


class RunRecords(Callback):
    """Console lines, TensorBoard, history and metrics.json in the shared schema (core/records.py)."""

    def __init__(self, records: Records, state: TrainState, fresh: bool) -> None:
        self.records, self.state, self.fresh = records, state, fresh
        self.lr, self.train_s = 0.0, 0.0
        self.shown: dict[str, float] = {}  # the last logged loss and samples/s

    def setup(self, trainer, pl_module, stage) -> None:
        writer = trainer.logger.experiment if trainer.is_global_zero else None  # the TensorBoardLogger's writer
        self.records.start(trainer.datamodule.split, writer, fresh=self.fresh)

    def on_train_start(self, trainer, pl_module) -> None:
        self.records.watch(pl_module.model, trainer.optimizers[0])  # per-rank memory of the training state
        self.records.begin_training(self.state)
        self.records.begin_epoch(self.state)  # a mid-epoch resume continues the epoch's clock

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.records.begin_epoch(self.state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # this step's (the scheduler steps before batch end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.state.global_step:  # a micro-batch that accumulates: no optimizer step yet
            return
        self.state.advance()
        loss = outputs["loss"]  # divided by accumulate_grad_batches: Records.log_step multiplies it back when logging
        # every log_every_n_steps steps (rank 0): TensorBoard, and the loss and samples/s for RunProgressBar
        self.shown.update(self.records.log_step(self.state.global_step, loss, self.lr, trainer.accumulate_grad_batches))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.train_s = self.records.epoch_seconds(sync=True)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        val = pl_module.val_metrics.compute()  # synced over ranks by torchmetrics
        self.records.end_epoch(self.state, pl_module.tally.all_compute(), val, self.train_s)


class RunProgressBar(TQDMProgressBar):
    """Lightning's bar, redrawn at most every 0.5 s (as raw DDP's tqdm bar) and at the epoch's last step, showing
    RunRecords' last loss and samples/s. (Through ``get_metrics``, not ``self.log(..., prog_bar=True)``: Lightning
    gathers every logged value again after every step, logged or not, and each ``self.log`` call costs far more
    than the step's Python.)"""

    REDRAW_S = 0.5

    def __init__(self, run_records: RunRecords) -> None:
        super().__init__(refresh_rate=20)  # the steps at which a redraw is considered
        self.run_records = run_records
        self.drawn = 0.0  # time.monotonic() of the last redraw

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning redraws twice (the count, then the metrics) every refresh_rate steps: ~2% of a CPU step
        n = batch_idx + 1
        if n % self.refresh_rate == 0 and time.monotonic() - self.drawn >= self.REDRAW_S or (
                n == self.train_progress_bar.total):
            self.drawn = time.monotonic()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        shown = {key: f"{value:.4f}" if key == "loss" else f"{value:,.0f}"
                 for key, value in self.run_records.shown.items()}
        return {**super().get_metrics(trainer, pl_module), **shown}


class RunCheckpoints(Callback):
    """The shared checkpoint policy: end of epoch, every checkpoint.every_n_steps steps, and at the step the
    ranks agree on after a SIGTERM/SIGUSR1/SIGINT (then exit 75 / 130). Each checkpoint carries the TrainState; resuming
    positions the data mid-epoch where the checkpoint left it."""

    def __init__(self, run: RunDir, records: Records, state: TrainState, policy: CheckpointAndStopPolicy) -> None:
        self.run, self.records, self.state, self.policy = run, records, state, policy
        self.stepped = 0  # trainer.global_step at the last batch end seen (accumulating batches do not step)

    def all_save(self, trainer: L.Trainer):
        path = self.run.checkpoint_path(trainer.global_step)
        trainer.save_checkpoint(path, weights_only=False)
        self.run.prune(trainer.global_step)
        return path

    def on_train_start(self, trainer, pl_module) -> None:
        self.stepped = trainer.global_step
        # DDP's gradient buckets in their final layout before the first step: every step sums alike (exact resume)
        parallel.settle_buckets(trainer.strategy.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.stepped:  # accumulating
            return
        self.stepped = trainer.global_step
        if self.policy.all_checkpoint_due(self.state, len(trainer.datamodule.train_batches), pl_module.tally):
            path = self.all_save(trainer)
            self.policy.stop_if_signalled(self.state, path)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.state.next_epoch()
        self.all_save(trainer)

    def on_save_checkpoint(self, trainer, pl_module, ckpt: dict) -> None:
        self.state.tally = pl_module.tally.all_state()  # a collective: save_checkpoint runs on every rank
        self.policy.all_check_finite(self.state, pl_module.model)  # diverged: stop (exit 3) before writing it
        ckpt["distmnist"] = self.records.checkpoint_meta(self.state)

    def on_load_checkpoint(self, trainer, pl_module, ckpt: dict) -> None:
        """Before Lightning makes the epoch's iterator: the loader starts where the checkpoint left the epoch."""
        record = ckpt["distmnist"]  # whose run, position, history
        self.state.load_checkpoint(record)
        self.records.continue_from(record, self.state)
        # Lightning counts micro-batches: a run resumed with another accumulation continues at the same step
        internals.recount_batches(ckpt, record.get("accumulate_grad_batches", 1), trainer.accumulate_grad_batches)
        trainer.datamodule.train_batches.set_epoch(self.state.epoch)
        trainer.datamodule.train_batches.skip(self.state.step_in_epoch)
        pl_module.tally.restore(self.state.tally, trainer.is_global_zero)


def train(cfg: Config) -> dict:
    env = dist.read_env(cfg.train.accelerator)
    check_precision(cfg.train.precision, env.device)
    internals.silence_lightning_noise(cfg.train.quiet)
    run = RunDir(cfg, NAME, env)
    resume_from = run.checkpoint_to_resume()  # refuses a run dir not ours (every rank, nothing written)
    # the process group up before fit (Lightning's DDPStrategy uses one that exists), so that every rank resumes
    # from rank 0's choice of checkpoint, as in ddp.py and fabric.py -- a node-local run dir may differ
    with dist.process_group(env, cfg.dist.timeout_s, cfg.dist.startup_timeout_s):
        resume_from = run.all_agree(resume_from)
        records, state = Records(run), TrainState()
        policy = CheckpointAndStopPolicy(cfg, env.device, records)
        strategy = "auto"
        if env.world_size > 1:  # its gradient buckets laid out once before the first step: RunCheckpoints
            strategy = DDPStrategy(timeout=timedelta(seconds=cfg.dist.timeout_s))
        if run.layout.on_mesh:  # FSDP2 / TP: ModelParallelStrategy + LitClassifier.configure_model (core.parallel)
            dp_size, tp_size = adapters.model_parallel_sizes(run.layout)  # or one line: hsdp, ddp x tp
            strategy = adapters.sharded_strategy(ModelParallelStrategy)(
                data_parallel_size=dp_size, tensor_parallel_size=tp_size, timeout=timedelta(seconds=cfg.dist.timeout_s)
            )
        trainer = L.Trainer(
            accelerator=env.device.type,
            devices=env.local_world_size,
            num_nodes=env.num_nodes,
            strategy=strategy,
            precision=cfg.train.precision,
            max_epochs=cfg.train.epochs,
            accumulate_grad_batches=run.batching.accumulate,  # Lightning's no_sync on the accumulating micro-batches
            logger=internals.RunLogger(save_dir=str(run.tb_dir), name="", version="", default_hp_metric=False),
            callbacks=[
                run_records := RunRecords(records, state, fresh=resume_from is None),
                RunCheckpoints(run, records, state, policy),
                *([RunProgressBar(run_records)] if records.show_progress else []),
            ],
            enable_checkpointing=False,  # RunCheckpoints writes them
            plugins=[adapters.checkpoint_io(), adapters.cluster_environment(env)],
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            enable_progress_bar=records.show_progress,
            enable_model_summary=False,
            log_every_n_steps=cfg.train.log_every_n_steps,
            profiler=internals.NoProfiler(),  # Lightning's default, without a context manager made per hook
            default_root_dir=str(run.path),
        )
        internals.leave_sigterm_to_distmnist(trainer)
        internals.check_step_signature_once(trainer)
        internals.loss_undivided_without_accumulation(trainer)
        dispatch.skip_hooks_that_do_nothing(trainer)
        dispatch.compare_trainer_states_by_identity()
        # LitClassifier with the speed-ups of lightning/internals.py (on one GPU at 32-true: the CUDA-graph step)
        graph_step = capture_applies(cfg, env) and cfg.train.precision == "32-true"
        module = internals.with_fast_hooks(LitClassifier, graph_step)(cfg)
        if resume_from:
            records.say(f"resuming from {resume_from}", always=True)
        policy.install()  # SIGTERM/SIGUSR1/SIGINT -> checkpoint, exit 75 / 130 (Lightning's own handler is left out)
        with run.removed_if_refused():
            trainer.fit(module, datamodule=MNISTData(cfg, env, records), ckpt_path=resume_from)
        policy.uninstall()  # not if training stopped: a late SIGTERM must not kill the exit
        summary = records.all_finish(module.model, state)
        dist.barrier()
        return summary




main = strategy_main(NAME, train)

if __name__ == "__main__":
    exit_process(main())  # os._exit once all is written: the interpreter's teardown can abort (core/errors.py)
