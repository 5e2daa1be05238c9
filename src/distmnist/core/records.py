"""What a run records, in one format for every strategy (rank 0 writes): the console lines and progress bar,
TensorBoard (the ``tblog`` schema), the per-epoch history with its throughput figures (``throughput``: FLOP/s, MFU,
data wait), and at the end ``model.pt`` and ``metrics.json``; with ``train.profile`` a trace per rank (``profiler``).

Where these files live is ``run.py``; every file is written atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from distmnist.core import checkpoint, config, parallel, tblog
from distmnist.core.data import CLASS_NAMES
from distmnist.core.errors import count
from distmnist.core.run import RunDir
from distmnist.core.state import TrainState
from distmnist.core.throughput import DataWait, Throughput, WaitedBatches


class Records:
    def __init__(self, run: RunDir) -> None:
        self.run, self.cfg, self.env, self.strategy = run, run.cfg, run.env, run.strategy
        self.batching = run.batching
        self.tb = tblog.TBLog(None)
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0  # seconds of earlier runs of this run dir (resume)
        self.started = time.perf_counter()
        self.epoch_started = self.started
        self._last_log = (self.started, 0)
        self.bar: tqdm | None = None
        self.watched: tuple[int, torch.optim.Optimizer] | None = None
        # the FLOPs of one optimizer step, counted once now (meta tensors), and the peak for MFU
        self.throughput = Throughput(self.cfg.model.hidden, self.batching.batch_size, self.batching.global_batch,
                                     self.env.world_size, self.env.device, self.cfg.train.precision,
                                     self.cfg.train.peak_flops)
        self.wait = DataWait()  # seconds of this epoch spent waiting for the training batches
        self.profiler = None  # train.profile: the StepProfiler, until its window is over

    def start(self, samples: tuple[torch.Tensor, torch.Tensor], writer=None, fresh: bool = True) -> None:
        """Once the data is there: rank 0 writes config.yaml and opens TensorBoard (through `writer` if given,
        Lightning's; else its own), recording the hyperparameters and a grid of `samples` (training images,
        labels) when the run starts from scratch."""
        if not self.env.is_zero:
            return
        if fresh:
            self.say(f"training in {self.run.path} (the same command again resumes it)")
        self.run.write_config()
        self.tb = tblog.TBLog(writer if writer is not None else tblog.open_writer(self.run.tb_dir))
        if fresh:
            flat = config.flat_dict(self.cfg)
            run_keys = {"strategy": self.strategy, "world_size": self.env.world_size,
                        "global_batch": self.batching.global_batch}
            self.tb.hparams({**{k: flat[k] for k in tblog.HPARAM_KEYS}, **run_keys})
            self.tb.samples(samples[0][:32], samples[1][:32], CLASS_NAMES[self.cfg.data.name])

    def continue_from(self, record: dict[str, Any], state: TrainState) -> None:
        """A resumed run: the history and the clock go on from the checkpoint's ``"distmnist"`` record, whose
        position (TrainState.from_checkpoint) is `state`."""
        self.history = list(record.get("history", []))
        self.elapsed_before = state.elapsed_s

    def checkpoint_meta(self, state: TrainState) -> dict[str, Any]:
        """The ``"distmnist"`` entry of a checkpoint at `state` (the clocks read now)."""
        state.elapsed_s = self.elapsed()
        state.epoch_train_s = self.epoch_seconds() if state.step_in_epoch else 0.0
        state.epoch_wait_s = self.wait.seconds if state.step_in_epoch else 0.0
        return self.run.meta(state, self.history)

    def watch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The model and optimizer whose per-rank memory (parameters + gradients + optimizer state) each epoch's
        record reports (core.parallel.state_mb): what FSDP saves over DDP. The parameters are counted now, while
        sharded (an evaluation gathers them)."""
        self.watched = (parallel.param_bytes(model), optimizer)

    # ------------------------------------------------------------------------------------------ clock
    def begin_training(self, state: TrainState) -> None:
        """Just before the first training step: wall_s (records, time to accuracy) counts from here, not from
        the process start (imports, data loading, process group and Lightning setup are left out)."""
        self.started = time.perf_counter()
        self._last_log = (self.started, state.global_step)  # the progress bar's samples/s counts from here too
        if self.cfg.train.profile:  # every rank its own trace
            from distmnist.core.profiler import StepProfiler

            self.profiler = StepProfiler(self.run.path / "profile", self.env.rank, self.env.device,
                                         self.cfg.train.profile_wait, self.cfg.train.profile_steps)
        if state.epoch >= self.cfg.train.epochs:
            if self.cfg.optim.schedule == "constant":  # the schedule does not depend on the length: it continues
                more = f"train.epochs={state.epoch + 1} or more continues it"
            else:  # the schedule spans train.epochs: a longer run is another run (its own default run dir)
                more = (f"its {self.cfg.optim.schedule} schedule ends at epoch {state.epoch}, so a longer run is a new "
                        f"run: train.epochs={state.epoch + 1} or more starts one in a run dir of its own")
            self.say(f"{self.run.path} already holds {count(state.epoch, 'epoch')}; {more}", always=True)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def begin_epoch(self, state: TrainState) -> None:
        """The epoch's training clock and data-wait clock (continued from a mid-epoch checkpoint)."""
        self.epoch_started = time.perf_counter() - state.epoch_train_s
        self.wait.seconds = state.epoch_wait_s

    def epoch_seconds(self, sync: bool = False) -> float:
        """Training seconds of this epoch so far (`sync`: after the device has finished its queued work)."""
        if sync and self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return time.perf_counter() - self.epoch_started

    # ---------------------------------------------------------------------------------------- console
    def say(self, message: str, always: bool = False) -> None:
        """One line on rank 0 (not with train.quiet, unless `always`)."""
        if self.env.is_zero and (always or not self.cfg.train.quiet):
            print(f"[{self.strategy}] {message}", flush=True)

    @property
    def show_progress(self) -> bool:
        return self.env.is_zero and self.cfg.train.progress and not self.cfg.train.quiet

    def timed(self, batches) -> WaitedBatches:
        """`batches` with the time spent waiting for each one counted (the Trainer's loop iterates them)."""
        return WaitedBatches(batches, self.wait)

    def progress(self, batches: Iterable, state: TrainState) -> Iterator:
        """`batches` with a progress bar on rank 0 and the wait for each one counted (raw DDP and Fabric; the
        Trainer has Lightning's bar and :meth:`timed`)."""
        desc = f"epoch {state.epoch + 1}/{self.cfg.train.epochs}"
        self.bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=desc,
                        disable=not self.show_progress, unit="step", mininterval=0.5, leave=False, dynamic_ncols=True)
        try:
            for batch in self.wait.timed(batches):
                yield batch
                self.bar.update()
        finally:
            self.bar.close()

    def log_step(self, global_step: int, loss: torch.Tensor, lr: float, scale: int = 1) -> dict[str, float]:
        """After every optimizer step, on every rank: the profiler's step (train.profile, within its window); every
        train.log_every_n_steps steps (else nothing more): train/loss (`loss` x `scale`) and lr to TensorBoard, the
        one host sync of the step path (rank 0 only). Returns the loss and the samples/s since the previous call."""
        if self.profiler is not None and not self.profiler.step():
            self.profiler = None
        if global_step % self.cfg.train.log_every_n_steps or not self.env.is_zero:
            return {}
        value = float(loss.detach() * scale if scale != 1 else loss.detach())  # the product in the loss's dtype
        self.tb.step(global_step, value, lr)
        now = time.perf_counter()
        last_time, last_step = self._last_log
        self._last_log = (now, global_step)
        rate = (global_step - last_step) * self.batching.global_batch / max(now - last_time, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(step=global_step, loss=f"{value:.4f}", **{"samples/s": f"{rate:,.0f}"}, refresh=False)
        return {"loss": value, "samples/s": rate}

    # --------------------------------------------------------------------------------------- per epoch
    def end_epoch(self, state: TrainState, train: dict, val: dict, train_s: float) -> dict:
        """One epoch's record: printed as one line on rank 0, logged to TensorBoard, kept for metrics.json."""
        val = dict(val)
        wrong = val.pop("wrong", None)  # rank 0's misclassified test images: for TensorBoard, not the record
        record = {
            "epoch": state.epoch + 1,
            "global_step": state.global_step,
            **train,
            **val,
            "epoch_s": train_s,
            "samples_per_sec": train["train_samples"] / train_s if train_s > 0 else float("nan"),
            **self.throughput.epoch(train["train_samples"], train_s, self.wait.seconds),  # rank 0's data wait
            "wall_s": self.elapsed(),
        }
        if self.watched is not None:
            record.update(parallel.state_mb(*self.watched))  # this rank's (rank 0's in the record)
        if self.env.device.type == "cuda":
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**20
        self.history.append(record)
        if self.env.is_zero:
            self.tb.epoch(state.global_step, record, CLASS_NAMES[self.cfg.data.name], wrong)
            self.say(
                f"epoch {state.epoch + 1}/{self.cfg.train.epochs} step {state.global_step} "
                f"train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:.4f} "
                f"val_loss {record['val_loss']:.4f} val_acc {record['val_acc']:.4f} "
                f"({record['val_samples']} test samples) {record['samples_per_sec']:.0f} samples/s "
                f"{train_s:.2f} s {record['flops_per_sec'] / 1e9:.2f} GFLOP/s"
                + (f" MFU {record['mfu']:.2%}" if "mfu" in record else "")
                + f" data wait {record['data_wait_share']:.0%}"
                + (f" state {record['state_mb']:.2f} MB/rank" if "state_mb" in record else "")
                + (f" peak {record['peak_mem_mb']:.0f} MB" if "peak_mem_mb" in record else "")
            )
        return record

    # ---------------------------------------------------------------------------------------- the end
    def summary(self, global_step: int) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        train_s = sum(r["epoch_s"] for r in self.history)
        samples = sum(r["train_samples"] for r in self.history)
        return {
            "strategy": self.strategy,
            "world_size": self.env.world_size,
            "num_nodes": self.env.num_nodes,
            "device": self.env.device.type,
            "precision": self.cfg.train.precision,
            "parallel": self.cfg.train.parallel,
            "tp_size": self.run.layout.tp,
            "data_parallel_size": self.run.layout.dp,
            "layout": self.run.layout.describe(),
            "dataset": self.cfg.data.name,
            "loader": self.cfg.data.loader,
            "batch_size": self.cfg.data.batch_size,
            "accumulate_grad_batches": self.batching.accumulate,
            "global_batch_size": self.batching.global_batch,
            "epochs": len(self.history),
            "global_step": global_step,
            "val_acc": last.get("val_acc"),
            "val_loss": last.get("val_loss"),
            "val_samples": last.get("val_samples"),
            "train_loss": last.get("train_loss"),
            "train_acc": last.get("train_acc"),
            "train_samples_per_sec": samples / train_s if train_s > 0 else None,
            **self.throughput.summary(samples, train_s, sum(r.get("data_wait_s", 0.0) for r in self.history)),
            **{k: last[k] for k in ("param_mb", "grad_mb", "optim_mb", "state_mb", "peak_mem_mb") if k in last},
            "wall_s": self.elapsed(),
            "status": "done",
            "history": self.history,
        }

    def diverged(self, state: TrainState, line: str) -> None:
        """metrics.json says the run diverged, and where (rank 0); no model.pt is written."""
        if self.env.is_zero:
            summary = {**self.summary(state.global_step), "status": "diverged", "diverged": line}
            checkpoint.atomic_write(self.run.metrics_json, (json.dumps(summary, indent=2) + "\n").encode())
        self.tb.close()

    def all_finish(self, model: torch.nn.Module, state: TrainState) -> dict[str, Any]:
        """model.pt and metrics.json, written by rank 0 (and the profiler stopped, if its window is still open)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        summary = self.summary(state.global_step)
        weights = parallel.full_state_dict(model)  # FSDP: gathered once, here (a collective), onto rank 0
        if self.env.is_zero:
            checkpoint.atomic_torch_save(weights, self.run.model_pt)
            checkpoint.atomic_write(self.run.metrics_json, (json.dumps(summary, indent=2) + "\n").encode())
            self.say(
                f"done: val_acc {summary['val_acc']:.4f} after {count(summary['epochs'], 'epoch')}; "
                f"wrote {self.run.model_pt} and {self.run.metrics_json}",
                always=True,
            )
        self.tb.close()
        return summary
