"""Graceful stop: SIGTERM or SIGUSR1 (what SLURM and torchrun send before preemption, a time limit or a restart)
makes every rank write one checkpoint at the same step boundary and exit with :data:`STOPPED_EXIT`.

The signal handler only records the signal. Every ``checkpoint.stop_check_every_n_steps`` steps the ranks agree
with one small all-reduce (MAX) whether any of them was signalled, so they all stop after the same step and no
rank is left waiting in a collective.
"""

from __future__ import annotations

import signal

import torch

from distmnist.core import dist

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
