"""The typed resume position: where training is, and what a checkpoint must hold to continue it exactly.

The position is the job's, not a rank's: optimizer steps and samples of the epoch's global order, so a run
stopped with W processes continues with W' (same global batch) at the same sample.
Like torchtitan's ``TrainState``: one small object with ``state_dict()`` / ``load_state_dict()``, saved next to
the model and optimizer state by all three strategies (under the checkpoint's ``"distmnist"`` entry).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (the next one at an epoch boundary), counted from 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch` (0 at an epoch boundary), by the whole job
    global_step: int = 0  # optimizer steps done in the whole run
    # samples of one optimizer step over all processes (core/data/order.py: step k takes P[kG:(k+1)G])
    global_batch: int = 0
    samples_in_epoch: int = 0  # samples of the epoch's padded permutation consumed: step_in_epoch x global_batch
    epoch_train_s: float = 0.0  # training seconds of `epoch` so far (a mid-epoch checkpoint continues the clock)
    epoch_wait_s: float = 0.0  # of them, seconds rank 0 waited for its training batches
    elapsed_s: float = 0.0  # wall seconds of the run so far, over all its restarts
    tally: list[float] | None = None  # the epoch's training sums so far (loss, correct, count), reduced over ranks

    def advance(self) -> None:
        """One optimizer step done."""
        self.step_in_epoch += 1
        self.global_step += 1
        self.samples_in_epoch += self.global_batch

    def next_epoch(self) -> None:
        """`epoch` finished: the position is the start of the next one."""
        self.epoch += 1
        self.step_in_epoch, self.samples_in_epoch, self.tally = 0, 0, None
        self.epoch_train_s = self.epoch_wait_s = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, f.default))
