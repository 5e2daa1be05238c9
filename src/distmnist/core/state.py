"""The typed training position: where training is, and what a checkpoint must hold to continue it exactly.

The position is the job's, not a rank's: optimizer steps of the epoch's global order, so a run stopped with W
processes continues with W' (same global batch) at the same sample (step k of an epoch takes P[kG:(k+1)G] of
its order: core/data/order.py). Like torchtitan's ``TrainState``: one small object with ``state_dict()`` /
``load_state_dict()``, saved by all three strategies as the ``"train_state"`` entry of the checkpoint's
``"distmnist"`` record (core/run.py writes the record: whose run it is, its layout and history).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class TallySums:
    """The epoch's training sums so far, reduced over the ranks (core/metrics.py's TrainTally keeps them on the
    device): what a mid-epoch checkpoint carries so that the resumed epoch reports the same train_loss/acc."""

    loss_sum: float = 0.0  # the sum over samples of the training loss
    correct: float = 0.0  # samples predicted right
    count: float = 0.0  # samples

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.count if self.count else math.nan

    def finite(self) -> bool:
        return math.isfinite(self.loss_sum)


@dataclass
class TrainState:
    # the epoch in progress (the next one at an epoch boundary), counted from 0
    epoch: int = 0
    # optimizer steps done in `epoch` (0 at an epoch boundary), by the whole job
    step_in_epoch: int = 0
    # optimizer steps done in the whole run
    global_step: int = 0
    # training seconds of `epoch` so far (a mid-epoch checkpoint continues the clock)
    epoch_train_s: float = 0.0
    # of them, seconds rank 0 waited for its training batches
    epoch_wait_s: float = 0.0
    # wall seconds of the run so far, over all its restarts
    elapsed_s: float = 0.0
    # the epoch's training sums so far (a mid-epoch checkpoint); None at an epoch boundary
    tally: TallySums | None = None

    def advance(self) -> None:
        """One optimizer step done."""
        self.step_in_epoch += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        """`epoch` finished: the position is the start of the next one."""
        self.epoch += 1
        self.step_in_epoch, self.tally = 0, None
        self.epoch_train_s = self.epoch_wait_s = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # the tally a dict of its three sums

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, f.default))
        tally = state.get("tally")
        if isinstance(tally, (list, tuple)):  # written before TallySums: (loss_sum, correct, count)
            tally = dict(zip(("loss_sum", "correct", "count"), tally, strict=True))
        self.tally = TallySums(**tally) if tally else None

    def load_checkpoint(self, record: dict[str, Any]) -> TrainState:
        """The position in a checkpoint's ``"distmnist"`` record: its ``"train_state"`` entry, or, in a checkpoint
        written before that entry existed, the same fields at the record's top level (such checkpoints resume)."""
        self.load_state_dict(record.get("train_state", record))
        return self

    @classmethod
    def from_checkpoint(cls, record: dict[str, Any]) -> TrainState:
        return cls().load_checkpoint(record)
