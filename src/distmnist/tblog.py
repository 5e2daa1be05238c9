"""The one TensorBoard tag schema, written by rank 0 only, against the global optimizer step.

    train/loss            every train.log_every_n_steps steps
    lr                    with train/loss
    train/acc             once per epoch (at the step that ends the epoch)
    val/loss, val/acc     once per epoch
    perf/samples_per_sec  once per epoch (global samples / training seconds of that epoch)
    hparams               once, when the run starts; the HParams tab reads val/acc and val/loss

Raw DDP and Fabric give :class:`TBLog` a ``SummaryWriter`` on ``run.dir/tb``; the Lightning Trainer gives it the
``SummaryWriter`` of its ``TensorBoardLogger`` (same folder), so the three strategies write the same events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TAGS_STEP = ("train/loss", "lr")
TAGS_EPOCH = ("train/acc", "val/loss", "val/acc", "perf/samples_per_sec")
TAGS = TAGS_STEP + TAGS_EPOCH
HPARAM_METRICS = ("val/acc", "val/loss")


def open_writer(tb_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(tb_dir), flush_secs=30)


class TBLog:
    """Writes the schema through `writer` (a SummaryWriter), or does nothing when `writer` is None."""

    def __init__(self, writer=None) -> None:
        self.writer = writer

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("lr", lr, global_step)

    def epoch(self, global_step: int, record: dict[str, float]) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/acc", record["train_acc"], global_step)
        self.writer.add_scalar("val/loss", record["val_loss"], global_step)
        self.writer.add_scalar("val/acc", record["val_acc"], global_step)
        self.writer.add_scalar("perf/samples_per_sec", record["samples_per_sec"], global_step)
        self.writer.flush()

    def hparams(self, params: dict[str, Any]) -> None:
        """Record the hyperparameters once, in this writer's own event file (no extra run folder)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        exp, ssi, sei = hparams(clean, {m: 0.0 for m in HPARAM_METRICS})
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar events under `tb_dir`: {tag: [(step, value), ...]} in step order (for tests and compare)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(values) for tag, values in out.items()}
