"""Where a run lives, whose it is, and which checkpoint resumes it.

    runs/<name>/config.yaml     resolved config + strategy (written when the run starts)
    runs/<name>/events.out.tfevents.*   TensorBoard events (tblog schema), in the run dir itself: `tensorboard
                                 --logdir runs` names the run `<name>` (a run begun with a tb/ folder keeps it)
    runs/<name>/checkpoints/    step=<global step>.ckpt, newest `checkpoint.keep` kept
    runs/<name>/model.pt        final NNModel state_dict (same format from all strategies)
    runs/<name>/metrics.json    final numbers + per-epoch history

What a run records in it (history, TensorBoard, metrics.json, console) is ``records.py``.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distmnist.core import checkpoint, config, dist, parallel
from distmnist.core.config import Config
from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError, alike_on_every_rank
from distmnist.core.model import hidden_from_state_dict, weights_in
from distmnist.core.state import TrainState


def run_strategy(config_file: str | Path) -> str | None:
    """The strategy a run's config.yaml names in its first line (None for any other file)."""
    try:
        with open(config_file, encoding="utf-8") as f:
            header = config.read_run_header(f.readline())
    except (OSError, UnicodeDecodeError):
        return None
    return header["strategy"] if header else None


def tblog_dir(run_dir: Path) -> Path:
    """Where a run's TensorBoard events go: the run dir itself (TensorBoard names a run by its event folder, so
    the run is called by its own name), or tb/ for a run begun by an older version with events there (resumed,
    it stays one TensorBoard run)."""
    legacy = run_dir / "tb"
    return legacy if legacy.is_dir() and any(legacy.glob("events.out.tfevents.*")) else run_dir


class RunDir:
    def __init__(self, cfg: Config, strategy: str, env: DistEnv) -> None:
        self.cfg, self.strategy, self.env = cfg, strategy, env
        # the mesh degrees (train.tp_size, train.replicate_size) fit the processes, and batch x data-parallel size
        # x accumulation = data.global_batch_size, or one line saying what to change (before anything is written)
        with alike_on_every_rank():  # said once per node (local rank 0): every process computes it alike
            self.layout = parallel.layout(cfg, env.world_size)
            self.batching = config.batching(cfg, self.layout.dp)
        self.path = cfg.run_dir(strategy)
        self.config_yaml = self.path / "config.yaml"
        self.tb_dir = tblog_dir(self.path)
        self.ckpt_dir = self.path / "checkpoints"
        self.model_pt = self.path / "model.pt"
        self.metrics_json = self.path / "metrics.json"

    # -------------------------------------------------------------------------------------- ownership
    def check_owner(self) -> None:
        """Refuse a run dir that another strategy wrote (its checkpoints would not load here)."""
        if self.path.exists() and not self.path.is_dir():
            raise DistMnistError(f"run.dir {self.path} is a file; give a folder")
        try:
            first = self.config_yaml.read_text().splitlines()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            return
        header = config.read_run_header(first)
        if header and header["strategy"] != self.strategy:
            theirs = header["strategy"]
            raise DistMnistError(
                f"run.dir {self.path} belongs to a {theirs} run: continue it with `python -m distmnist.{theirs}` "
                f"(`distmnist train --strategy {theirs}`), or train {self.strategy} in another run.dir"
            )

    def checkpoint_to_resume(self) -> Path | None:
        """Check the run dir can be ours and find the checkpoint to resume from (every rank, before any process
        group). Nothing is written: a refused run leaves the run dir exactly as it was. Every rank reads the
        newest checkpoint here (a few hundred kB) so that every rank reaches the same refusal on its own: a
        rank-0-only check would leave the others waiting in a collective until the timeout. A refusal is the same
        on every process of a node (the same files): local rank 0 alone says it."""
        with alike_on_every_rank():
            self.check_owner()
            found = checkpoint.newest_good(self.ckpt_dir, self.check_checkpoint, quiet=not self.env.is_zero)
        return found[0] if found else None

    @staticmethod
    def all_agree(resume_from: Path | None) -> Path | None:
        """Rank 0's choice of checkpoint, on every rank (a collective once the process group is up)."""
        path = dist.broadcast_object(str(resume_from) if resume_from else None)
        return Path(path) if path else None

    def write_config(self) -> None:
        """config.yaml with the owner line (rank 0): `-c runs/<name>/config.yaml` runs it again."""
        if self.env.is_zero:
            text = config.run_config_text(self.cfg, self.strategy, self.env.world_size, str(self.env.device),
                                          self.config_yaml)
            checkpoint.atomic_write(self.config_yaml, text.encode())

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

    # ------------------------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, global_step: int) -> Path:
        return checkpoint.step_path(self.ckpt_dir, global_step)

    def prune(self, global_step: int) -> None:
        """After the save of `global_step`: keep the newest `checkpoint.keep` checkpoints (rank 0)."""
        if self.env.is_zero:
            checkpoint.prune(self.ckpt_dir, self.cfg.checkpoint.keep, newest_step=global_step)

    def meta(self, state: TrainState, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint's ``"distmnist"`` record, beside the model/optimizer state: whose run it is, its layout and
        batching, the training position (``"train_state"``, a TrainState) and the per-epoch history."""
        return {
            "format": checkpoint.FORMAT,
            "strategy": self.strategy,
            "parallel": self.cfg.train.parallel,
            "world_size": self.env.world_size,
            "data_parallel_size": self.layout.dp,
            "tp_size": self.layout.tp,
            "replicate_size": self.cfg.train.replicate_size,
            "batch_size": self.batching.batch_size,
            "accumulate_grad_batches": self.batching.accumulate,
            "trajectory": config.trajectory(self.cfg),
            "global_batch": self.batching.global_batch,
            "train_state": state.state_dict(),
            "history": list(history),
        }

    def check_checkpoint(self, obj: dict[str, Any], path: Path) -> None:
        meta = obj.get("distmnist")
        if not isinstance(meta, dict) or meta.get("format") not in checkpoint.FORMATS:
            raise DistMnistError(f"{path} is not a distmnist checkpoint; move it out of {self.ckpt_dir}")
        if meta.get("strategy") != self.strategy:
            raise DistMnistError(
                f"{path} was written by the {meta.get('strategy')} strategy; use another run.dir for "
                f"{self.strategy}"
            )
        theirs_parallel = meta.get("parallel", "ddp")  # checkpoints from before train.parallel are DDP's
        if theirs_parallel != self.cfg.train.parallel:
            raise DistMnistError(
                f"run.dir {self.path} holds train.parallel={theirs_parallel} checkpoints ({path.name}) and this run "
                f"has train.parallel={self.cfg.train.parallel}; resume it with train.parallel={theirs_parallel} or "
                f"choose a new run.dir"
            )
        theirs_layout = {"train.tp_size": meta.get("tp_size", 1), "train.replicate_size": meta.get("replicate_size")}
        mine_layout = {"train.tp_size": self.cfg.train.tp_size, "train.replicate_size": self.cfg.train.replicate_size}
        if theirs_layout != mine_layout:
            was = " ".join(f"{k}={v}" for k, v in theirs_layout.items() if v is not None)
            raise DistMnistError(
                f"run.dir {self.path} holds checkpoints of another layout ({path.name}: {was}) and this run has "
                f"{' '.join(f'{k}={v}' for k, v in mine_layout.items() if v is not None)}; resume it with {was} "
                f"(another number of processes is fine) or choose a new run.dir"
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
        self.check_batching(meta)

    def check_batching(self, meta: dict[str, Any]) -> None:
        """The same global batch, and another number of processes only where the order does not depend on it
        (data.global_batch_size set: every step takes P[kG:(k+1)G] of the padded epoch). On every rank: all of
        them stop with the same line."""
        theirs_w = meta.get("data_parallel_size", meta.get("world_size"))  # before TP: all processes were data-parallel
        theirs_g = meta.get("global_batch")  # checkpoints from before it was recorded: batch x processes
        if theirs_g is None and isinstance(theirs_w, int):
            theirs_g = meta.get("trajectory", {}).get("data.batch_size", 0) * theirs_w
        mine = self.batching
        procs = "processes" if self.layout.tp == 1 else "data-parallel processes"
        if theirs_w != self.layout.dp and not mine.fixed:
            raise DistMnistError(
                f"run.dir {self.path} was written by {theirs_w} {procs} and this job has "
                f"{self.layout.dp}: "
                f"the run was started without data.global_batch_size, so its order of samples depends on the number "
                f"of processes; resume it with {theirs_w}, or start a new run.dir with data.global_batch_size set"
            )
        if theirs_g != mine.global_batch:
            fix = (f"data.global_batch_size={theirs_g}" if mine.fixed else
                   f"{theirs_w} processes x data.batch_size x train.accumulate_grad_batches = {theirs_g}")
            raise DistMnistError(
                f"run.dir {self.path} holds a run with another config (global batch: {theirs_g} -> "
                f"{mine.global_batch} with {self.layout.dp} {procs} x "
                f"data.batch_size={mine.batch_size} x train.accumulate_grad_batches={mine.accumulate}); resume it with "
                f"{fix}, or choose a new run.dir"
            )

    def check_model_state(self, obj: dict[str, Any], path: Path) -> None:
        """The weights in the checkpoint must be an NNModel of this config's shape (raw DDP/Fabric keep them under
        'model', Lightning under 'state_dict' with a 'model.' prefix)."""
        hidden = hidden_from_state_dict(weights_in(obj), source=f"checkpoint {path}")
        if hidden != list(self.cfg.model.hidden):
            raise DistMnistError(
                f"checkpoint {path} holds a model with hidden sizes {hidden}, this config has {self.cfg.model.hidden}; "
                f"use another run.dir"
            )
