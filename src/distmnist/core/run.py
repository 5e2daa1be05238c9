"""The run directory and what every strategy records in it, in one format.

    runs/<name>/config.yaml     resolved config + strategy (written when the run starts)
    runs/<name>/tb/             TensorBoard events (tblog schema)
    runs/<name>/checkpoints/    step=<global step>.ckpt, newest `checkpoint.keep` kept
    runs/<name>/model.pt        final NNModel state_dict (same format from all strategies)
    runs/<name>/metrics.json    final numbers + per-epoch history

Only rank 0 writes; every file is written atomically.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distmnist.core import checkpoint, config, tblog
from distmnist.core.config import Config
from distmnist.core.data import CLASS_NAMES
from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError
from distmnist.core.model import hidden_from_state_dict

OWNER = re.compile(r"^# distmnist run: strategy=(\w+)")


class RunDir:
    def __init__(self, cfg: Config, strategy: str, env: DistEnv) -> None:
        self.cfg, self.strategy, self.env = cfg, strategy, env
        self.path = cfg.run_dir(strategy)
        self.config_yaml = self.path / "config.yaml"
        self.tb_dir = self.path / "tb"
        self.ckpt_dir = self.path / "checkpoints"
        self.model_pt = self.path / "model.pt"
        self.metrics_json = self.path / "metrics.json"
        self.tb = tblog.TBLog(None)
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0  # seconds of earlier runs of this run dir (resume)
        self.started = time.perf_counter()
        self._last_log = (self.started, 0)

    # -------------------------------------------------------------------------------------- ownership
    def check_owner(self) -> None:
        """Refuse a run dir that another strategy wrote (its checkpoints would not load here)."""
        if self.path.exists() and not self.path.is_dir():
            raise DistMnistError(f"run.dir {self.path} is a file; give a folder")
        try:
            first = self.config_yaml.read_text().splitlines()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            return
        owner = OWNER.search(first)
        if owner and owner.group(1) != self.strategy:
            raise DistMnistError(
                f"run.dir {self.path} belongs to a {owner.group(1)} run; use another run.dir for {self.strategy} "
                f"(e.g. run.dir=runs/{self.strategy})"
            )

    def prepare(self) -> tuple[Path, dict[str, Any]] | None:
        """Check the run dir can be ours and find the checkpoint to resume from (every rank, before any process
        group). Nothing is written: a refused run leaves the run dir exactly as it was. Every rank reads the
        newest checkpoint here (a few hundred kB) so that every rank reaches the same refusal on its own: a
        rank-0-only check would leave the others waiting in a collective until the timeout."""
        self.check_owner()
        return self.newest_checkpoint()

    @contextmanager
    def removed_if_refused(self):
        """A run that stops on a DistMnistError before its first checkpoint leaves no new run dir behind (the
        Lightning Trainer creates its TensorBoard writer before the data is checked)."""
        existed = self.path.exists()
        try:
            yield
        except DistMnistError:
            if not existed and self.env.is_zero and not checkpoint.listing(self.ckpt_dir):
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def start(self, samples: tuple[torch.Tensor, torch.Tensor], writer=None, fresh: bool = True) -> None:
        """Once the data is there: rank 0 writes config.yaml and opens TensorBoard (through `writer` if given,
        Lightning's; else its own), recording the hyperparameters and a grid of `samples` (training images,
        labels) when the run starts from scratch."""
        if not self.env.is_zero:
            return
        header = (
            f"# distmnist run: strategy={self.strategy} world_size={self.env.world_size} "
            f"device={self.env.device}\n# the resolved config: `-c {self.config_yaml}` runs it again\n"
        )
        checkpoint.atomic_write(self.config_yaml, (header + config.to_yaml(self.cfg)).encode())
        self.tb = tblog.TBLog(writer if writer is not None else tblog.open_writer(self.tb_dir))
        if fresh:
            self.tb.hparams({**config.flat_dict(self.cfg), "strategy": self.strategy, "world_size": self.env.world_size})
            self.tb.samples(samples[0][:32], samples[1][:32], CLASS_NAMES[self.cfg.data.name])

    # ------------------------------------------------------------------------------------ checkpoints
    def meta(self, **position: Any) -> dict[str, Any]:
        """What a checkpoint records about the run besides the model/optimizer state."""
        return {
            "format": checkpoint.FORMAT,
            "strategy": self.strategy,
            "world_size": self.env.world_size,
            "trajectory": config.trajectory(self.cfg),
            "history": list(self.history),
            "elapsed_s": self.elapsed(),
            **position,
        }

    def check_checkpoint(self, obj: dict[str, Any], path: Path) -> None:
        meta = obj.get("distmnist")
        if not isinstance(meta, dict) or meta.get("format") != checkpoint.FORMAT:
            raise DistMnistError(f"{path} is not a distmnist checkpoint; move it out of {self.ckpt_dir}")
        if meta.get("strategy") != self.strategy:
            raise DistMnistError(
                f"{path} was written by the {meta.get('strategy')} strategy; use another run.dir for "
                f"{self.strategy}"
            )
        mine = config.trajectory(self.cfg)
        theirs = meta.get("trajectory", {})
        changed = [f"{k}: {theirs.get(k)!r} -> {mine[k]!r}" for k in mine if theirs.get(k) != mine[k]]
        if changed:
            raise DistMnistError(
                f"run.dir {self.path} holds a run with another config ({'; '.join(changed)}); resume it with "
                f"its own config ({self.config_yaml}) or choose a new run.dir"
            )
        self.check_model_state(obj, path)
        if meta.get("world_size") != self.env.world_size and self.env.is_zero:
            warnings.warn(
                f"resuming a run written with {meta.get('world_size')} processes on {self.env.world_size}: "
                f"the global batch and data order change from here on",
                stacklevel=2,
            )

    def check_model_state(self, obj: dict[str, Any], path: Path) -> None:
        """The weights in the checkpoint must be an NNModel of this config's shape (raw DDP/Fabric keep them under
        'model', Lightning under 'state_dict' with a 'model.' prefix)."""
        state = obj.get("model")
        if state is None and isinstance(obj.get("state_dict"), dict):
            state = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        hidden = hidden_from_state_dict(state, source=f"checkpoint {path}")
        if hidden != list(self.cfg.model.hidden):
            raise DistMnistError(
                f"checkpoint {path} holds a model with hidden sizes {hidden}, this config has {self.cfg.model.hidden}; "
                f"use another run.dir"
            )

    def newest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        return checkpoint.newest_good(self.ckpt_dir, self.check_checkpoint, quiet=not self.env.is_zero)

    def restore(self, meta: dict[str, Any]) -> None:
        self.history = list(meta.get("history", []))
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))

    # --------------------------------------------------------------------------------------- records
    def begin_training(self, global_step: int) -> None:
        """Just before the first training step: wall_s (records, time to accuracy) counts from here, not from
        the process start (imports, data loading, process group and Lightning setup are left out)."""
        self.started = time.perf_counter()
        self._last_log = (self.started, global_step)  # the progress bar's samples/s counts from here too

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def say(self, message: str, always: bool = False) -> None:
        """One line on rank 0 (not with train.quiet, unless `always`)."""
        if self.env.is_zero and (always or not self.cfg.train.quiet):
            print(f"[{self.strategy}] {message}", flush=True)

    @property
    def progress(self) -> bool:
        return self.env.is_zero and self.cfg.train.progress and not self.cfg.train.quiet

    def log_step(self, global_step: int, loss: torch.Tensor, lr: float) -> dict[str, float]:
        """Every train.log_every_n_steps steps: the one host sync of the step path (rank 0 only). Returns the
        loss and the samples/s since the previous call, for the progress bar."""
        if not self.env.is_zero:
            return {}
        value = float(loss.detach())
        self.tb.step(global_step, value, lr)
        now = time.perf_counter()
        last_time, last_step = self._last_log
        self._last_log = (now, global_step)
        rate = (global_step - last_step) * self.cfg.data.batch_size * self.env.world_size / max(now - last_time, 1e-9)
        return {"loss": value, "samples/s": rate}

    def end_epoch(self, epoch: int, global_step: int, train: dict, val: dict, train_s: float) -> dict:
        """One epoch's record: printed as one line on rank 0, logged to TensorBoard, kept for metrics.json."""
        val = dict(val)
        wrong = val.pop("wrong", None)  # rank 0's misclassified test images: for TensorBoard, not the record
        record = {
            "epoch": epoch + 1,
            "global_step": global_step,
            **train,
            **val,
            "epoch_s": train_s,
            "samples_per_sec": train["train_samples"] / train_s if train_s > 0 else float("nan"),
            "wall_s": self.elapsed(),
        }
        if self.env.device.type == "cuda":
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**20
        self.history.append(record)
        if self.env.is_zero:
            self.tb.epoch(global_step, record, CLASS_NAMES[self.cfg.data.name], wrong)
            self.say(
                f"epoch {epoch + 1}/{self.cfg.train.epochs} step {global_step} "
                f"train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:.4f} "
                f"val_loss {record['val_loss']:.4f} val_acc {record['val_acc']:.4f} "
                f"({record['val_samples']} test samples) {record['samples_per_sec']:.0f} samples/s "
                f"{train_s:.2f} s"
            )
        return record

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
            "dataset": self.cfg.data.name,
            "loader": self.cfg.data.loader,
            "batch_size": self.cfg.data.batch_size,
            "global_batch_size": self.cfg.data.batch_size * self.env.world_size,
            "epochs": len(self.history),
            "global_step": global_step,
            "val_acc": last.get("val_acc"),
            "val_loss": last.get("val_loss"),
            "val_samples": last.get("val_samples"),
            "train_loss": last.get("train_loss"),
            "train_acc": last.get("train_acc"),
            "train_samples_per_sec": samples / train_s if train_s > 0 else None,
            "wall_s": self.elapsed(),
            "history": self.history,
        }

    def finish(self, model: torch.nn.Module, global_step: int) -> dict[str, Any]:
        """model.pt and metrics.json, written by rank 0."""
        summary = self.summary(global_step)
        if self.env.is_zero:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            checkpoint.atomic_torch_save(state, self.model_pt)
            checkpoint.atomic_write(self.metrics_json, (json.dumps(summary, indent=2) + "\n").encode())
            self.say(
                f"done: val_acc {summary['val_acc']:.4f} after {summary['epochs']} epochs; "
                f"wrote {self.model_pt} and {self.metrics_json}",
                always=True,
            )
        self.tb.close()
        return summary
