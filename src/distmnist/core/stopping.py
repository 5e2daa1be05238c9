"""Graceful stop: SIGTERM or SIGUSR1 (what SLURM and torchrun send before preemption, a time limit or a restart)
makes every rank write one checkpoint at the same step boundary and exit with :data:`STOPPED_EXIT` (75); Ctrl-C
(SIGINT) does the same and exits with :data:`INTERRUPTED_EXIT` (130, core/errors.py says why). A second Ctrl-C
finds SIGINT's default action back and ends the process at once, so a user can always get out.

The signal handler only records the signal. Every ``checkpoint.stop_check_every_n_steps`` steps the ranks agree
with one small all-reduce (MAX) whether any of them was signalled, so they all stop after the same step and no
rank is left waiting in a collective.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import torch

from distmnist.core import dist, parallel
from distmnist.core.config import Config
from distmnist.core.errors import Diverged, Stopped
from distmnist.core.metrics import TrainTally
from distmnist.core.records import Records
from distmnist.core.state import TallySums, TrainState

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Take over the stop signals (again, if someone replaced the handler); uninstall() restores the handlers
        found at the first install."""
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._record)
            self._previous.setdefault(sig, previous)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if signum == signal.SIGINT:  # the next Ctrl-C is not asked: it ends the process (no traceback either)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def all_agree(self, device: torch.device, flag: torch.Tensor | None = None) -> tuple[int, int]:
        """(the signal any rank received or 0, the largest `flag` of any rank or 0): a collective with several
        processes, every rank must call it at the same step. `flag` (an int tensor on `device`) rides on the same
        all-reduce; with one process reading it is a host sync."""
        if not dist.is_distributed():
            return self.signum, int(flag.item()) if flag is not None else 0
        both = torch.zeros(2, dtype=torch.int32, device=device if dist.backend_needs_device() else "cpu")
        both[0] = self.signum
        if flag is not None:
            both[1:].copy_(flag.reshape(1))
        dist.all_reduce_max(both)
        signum, flagged = both.tolist()
        return signum, flagged


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class CheckpointAndStopPolicy:
    """After each optimizer step: whether to write a mid-epoch checkpoint, and whether to stop.

    * Checkpoint every ``checkpoint.every_n_steps`` steps (the end-of-epoch checkpoint is not its business: it
      follows the evaluation).
    * Stop, all ranks after the same step and a checkpoint, after a SIGTERM/SIGUSR1/SIGINT on any rank (exit 75,
      or 130 after Ctrl-C; a rerun resumes): every ``checkpoint.stop_check_every_n_steps`` steps one small
      all-reduce tells every rank whether any was signalled (:meth:`all_checkpoint_due`).
    * Stop a run that diverged (exit 3) before anything non-finite is written: that all-reduce carries a
      non-finite-loss flag too (one process: read at the log steps, where the logged loss syncs anyway), and
      :meth:`all_check_finite` looks at the loss and the weights before every checkpoint."""

    def __init__(self, cfg: Config, device: torch.device, records: Records) -> None:
        self.every, self.stop_every = cfg.checkpoint.every_n_steps, cfg.checkpoint.stop_check_every_n_steps
        self.log_every = cfg.train.log_every_n_steps
        self.device, self.records = device, records
        self.request = StopRequest()
        self.signum = 0

    def install(self) -> CheckpointAndStopPolicy:
        self.request.install()
        return self

    def uninstall(self) -> None:
        self.request.uninstall()

    def all_checkpoint_due(self, state: TrainState, steps_in_epoch: int, tally: TrainTally) -> bool:
        """After an optimizer step, on every rank (the stop check is a collective every stop_every steps)."""
        if state.step_in_epoch >= steps_in_epoch:
            return False
        step = state.global_step
        self.signum = 0
        if step % self.stop_every == 0:
            read_loss = dist.is_distributed() or step % self.log_every == 0
            self.signum, bad = self.request.all_agree(self.device, tally.nonfinite() if read_loss else None)
            if bad:
                self.diverged(state, tally.all_state(), "the training loss")
        return bool(self.signum) or bool(self.every and step % self.every == 0)

    def stop_if_signalled(self, state: TrainState, path: Path) -> None:
        """After the checkpoint that :meth:`all_checkpoint_due` asked for: raise Stopped if it was a stop."""
        if self.signum:
            raise Stopped(
                f"stopped by {signal_name(self.signum)} at step {state.global_step} (epoch {state.epoch + 1}); "
                f"checkpoint {path}; run the same command again to resume", self.signum
            )

    def all_check_finite(self, state: TrainState, model: torch.nn.Module) -> None:
        """Before a checkpoint is written, on every rank (`state.tally`: the epoch's sums reduced over the ranks;
        the weights are the same on every rank): stop if either is not finite."""
        if not parallel.all_finite(model):
            self.diverged(state, state.tally, "the weights")
        if state.tally and not state.tally.finite():
            self.diverged(state, state.tally, "the training loss")

    def diverged(self, state: TrainState, sums: TallySums | None, what: str) -> None:
        loss = sums.mean_loss if sums else math.nan
        line = (f"training diverged: {what} became non-finite by step {state.global_step} (epoch {state.epoch + 1}; "
                f"mean training loss of the epoch so far {loss}); stopped before writing it: no model.pt, any "
                f"checkpoint in run.dir is from before -- lower optim.lr")
        self.records.diverged(state, line)
        raise Diverged(line)
