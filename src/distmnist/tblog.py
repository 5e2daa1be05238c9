"""The one TensorBoard tag schema, written by rank 0 only, against the global optimizer step.

    train/loss            every train.log_every_n_steps steps
    lr                    with train/loss
    train/acc             once per epoch (at the step that ends the epoch)
    val/loss, val/acc     once per epoch
    perf/samples_per_sec  once per epoch (global samples / training seconds of that epoch)
    perf/peak_mem_mb      once per epoch, on CUDA: peak memory allocated on rank 0's GPU
    val/confusion_matrix  figure, once per epoch (true class x predicted class, all ranks' test samples)
    val/misclassified     figure, once per epoch: rank 0's first misclassified test images, predicted / true
    data/samples          figure, once when the run starts: training images with their labels
    hparams               once, when the run starts; the HParams tab reads val/acc and val/loss

Raw DDP and Fabric give :class:`TBLog` a ``SummaryWriter`` on ``run.dir/tb``; the Lightning Trainer gives it the
``SummaryWriter`` of its ``TensorBoardLogger`` (same folder), so the three strategies write the same events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

TAGS_STEP = ("train/loss", "lr")
TAGS_EPOCH = ("train/acc", "val/loss", "val/acc", "perf/samples_per_sec")
TAGS = TAGS_STEP + TAGS_EPOCH
TAG_PEAK_MEM = "perf/peak_mem_mb"  # CUDA only
FIGURES = ("data/samples", "val/confusion_matrix", "val/misclassified")
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

    def epoch(self, global_step: int, record: dict, names: list[str], wrong=None) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/acc", record["train_acc"], global_step)
        self.writer.add_scalar("val/loss", record["val_loss"], global_step)
        self.writer.add_scalar("val/acc", record["val_acc"], global_step)
        self.writer.add_scalar("perf/samples_per_sec", record["samples_per_sec"], global_step)
        if record.get("peak_mem_mb") is not None:
            self.writer.add_scalar(TAG_PEAK_MEM, record["peak_mem_mb"], global_step)
        if record.get("confusion") is not None:
            self.writer.add_image("val/confusion_matrix", confusion_figure(record["confusion"], names), global_step,
                                  dataformats="HWC")
        if wrong is not None and len(wrong[0]):
            images, predicted, true = wrong
            titles = [f"{names[p]} / {names[t]}" for p, t in zip(predicted.tolist(), true.tolist(), strict=True)]
            self.writer.add_image("val/misclassified", image_grid(images, titles, "predicted / true"), global_step,
                                  dataformats="HWC")
        self.writer.flush()

    def samples(self, images, labels, names: list[str]) -> None:
        """Once per run: a grid of training images with their labels."""
        if self.writer is not None:
            titles = [names[int(i)] for i in labels]
            self.writer.add_image("data/samples", image_grid(images, titles, "training images"), 0, dataformats="HWC")

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


def render(fig) -> np.ndarray:
    """A matplotlib Figure (object API, no pyplot state) as an RGB array for SummaryWriter.add_image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def image_grid(images, titles: list[str], title: str, columns: int = 8) -> np.ndarray:
    """28x28 images (uint8 or float [0, 1]) tiled into one picture -- one imshow, so it renders in ~0.1 s --
    with each image's title above it."""
    from matplotlib.figure import Figure

    n = len(titles)
    rows = max(1, -(-n // columns))
    cell, pad, top = 28, 2, 9  # pixels: image, gap, room for a title
    h, w = cell + pad + top, cell + pad
    canvas = np.ones((rows * h, columns * w), dtype=np.float32)
    pixels = images.reshape(-1, 28, 28).float().cpu().numpy() / (255.0 if images.dtype == torch.uint8 else 1.0)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * h + top : r * h + top + cell, c * w : c * w + cell] = pixels[i]
    fig = Figure(figsize=(columns * 1.25, rows * 1.6 + 0.4), dpi=80)
    ax = fig.add_axes((0, 0, 1, 0.95 if rows > 1 else 0.88))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    for i, text in enumerate(titles):
        r, c = divmod(i, columns)
        ax.text(c * w + cell / 2, r * h + top - 1.5, text, ha="center", va="bottom", fontsize=7, color="black",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    fig.suptitle(title, fontsize=9)
    return render(fig)


def confusion_figure(matrix: list[list[int]], names: list[str]) -> np.ndarray:
    """Counts of true (rows) x predicted (columns) classes, with the per-class recall in the row labels."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    recall = m.diagonal() / np.maximum(m.sum(axis=1), 1)
    fig = Figure(figsize=(6.4, 5.6), dpi=80)
    ax = fig.add_subplot()
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(m), strict=True):
        ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                color="white" if m[i, j] > 0.5 * m[i].sum() else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), [f"{n} ({r:.0%})" for n, r in zip(names, recall, strict=True)], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall)")
    ax.set_title(f"test set: {int(m.trace())}/{int(m.sum())} correct")
    fig.tight_layout()
    return render(fig)


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
