"""Graceful stop: SIGTERM or SIGUSR1 (what SLURM and torchrun send before preemption, a time limit or a restart)
makes every rank write one checkpoint at the same step boundary and exit with :data:`STOPPED_EXIT`.

The signal handler only records the signal. Every ``checkpoint.stop_check_every_n_steps`` steps the ranks agree
with one small all-reduce (MAX) whether any of them was signalled, so they all stop after the same step and no
rank is left waiting in a collective.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from distmnist.core import dist
from distmnist.core.config import Config
from distmnist.core.errors import Stopped
from distmnist.core.state import TrainState

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none): a collective, every rank must call it at the same step."""
        if not dist.is_distributed():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device if dist.backend_needs_device() else "cpu")
        dist.all_reduce_max(flag)
        return int(flag.item())


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class CheckpointCadence:
    """When the training loop writes a mid-epoch checkpoint: every ``checkpoint.every_n_steps`` steps, and at the
    step the ranks agree on after a SIGTERM/SIGUSR1 -- after which training stops (exit 75; a rerun resumes).
    The end-of-epoch checkpoint is not its business: it follows the evaluation."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.every, self.stop_every = cfg.checkpoint.every_n_steps, cfg.checkpoint.stop_check_every_n_steps
        self.device = device
        self.request = StopRequest()
        self.signum = 0

    def install(self) -> CheckpointCadence:
        self.request.install()
        return self

    def uninstall(self) -> None:
        self.request.uninstall()

    def due(self, state: TrainState, steps_in_epoch: int) -> bool:
        """After an optimizer step, on every rank (the stop check is a collective every stop_every steps)."""
        if state.step_in_epoch >= steps_in_epoch:
            return False
        step = state.global_step
        self.signum = self.request.agreed(self.device) if step % self.stop_every == 0 else 0
        return bool(self.signum) or bool(self.every and step % self.every == 0)

    def stop_if_signalled(self, state: TrainState, path: Path) -> None:
        """After the checkpoint that `due` asked for: raise Stopped if it was a stop."""
        if self.signum:
            raise Stopped(
                f"stopped by {signal_name(self.signum)} at step {state.global_step} (epoch {state.epoch + 1}); "
                f"checkpoint {path}; run the same command again to resume"
            )
