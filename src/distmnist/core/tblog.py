"""The one TensorBoard tag schema, written by rank 0 only, against the global optimizer step.

    train/loss            every train.log_every_n_steps steps
    lr                    with train/loss
    train/acc             once per epoch (at the step that ends the epoch)
    val/loss, val/acc     once per epoch
    perf/samples_per_sec  once per epoch (global samples / training seconds of that epoch)
    perf/flops_per_sec    once per epoch: FLOPs of the epoch's steps (counted once, core/throughput.py) / seconds
    perf/mfu              once per epoch, where a peak is known (train.peak_flops, or a known GPU): FLOP/s / peak
    perf/data_wait_share  once per epoch: rank 0's seconds waiting for training batches / training seconds
    perf/peak_mem_mb      once per epoch, on CUDA: peak memory allocated on rank 0's GPU
    val/confusion_matrix  picture, once per epoch (true class x predicted class, all ranks' test samples)
    val/misclassified     picture, once per epoch: rank 0's first misclassified test images, predicted / true
    data/samples          picture, once when the run starts: training images with their labels
    hparams               once, when the run starts; the HParams tab reads val/acc and val/loss

Raw DDP and Fabric give :class:`TBLog` a ``SummaryWriter`` on the run dir itself (``run.tblog_dir``: ``tensorboard
--logdir runs`` then names each run by its run dir); the Lightning Trainer gives it the ``SummaryWriter`` of its
``TensorBoardLogger`` (same folder), so the three strategies write the same events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np  # torch only where a picture needs it: `distmnist compare` reads events here without it

TAG_LOSS, TAG_LR = "train/loss", "lr"
TAG_TRAIN_ACC, TAG_VAL_LOSS, TAG_VAL_ACC, TAG_SPEED = "train/acc", "val/loss", "val/acc", "perf/samples_per_sec"
TAG_FLOPS, TAG_DATA_WAIT = "perf/flops_per_sec", "perf/data_wait_share"
TAG_PEAK_MEM = "perf/peak_mem_mb"  # CUDA only
TAG_MFU = "perf/mfu"  # where a peak is known
TAGS_STEP = (TAG_LOSS, TAG_LR)
TAGS_EPOCH = (TAG_TRAIN_ACC, TAG_VAL_LOSS, TAG_VAL_ACC, TAG_SPEED, TAG_FLOPS, TAG_DATA_WAIT)
TAGS = TAGS_STEP + TAGS_EPOCH
FIG_SAMPLES, FIG_CONFUSION, FIG_WRONG = "data/samples", "val/confusion_matrix", "val/misclassified"
FIGURES = (FIG_SAMPLES, FIG_CONFUSION, FIG_WRONG)
HPARAM_METRICS = (TAG_VAL_ACC, TAG_VAL_LOSS)
# What the HParams tab shows, of the config and the run (records.py adds world_size, global_batch, strategy): what
# people compare across runs. TensorBoard orders the columns by name (hparams differing between runs first), so a
# short list is what keeps optim.lr and the metrics on screen; the whole config is the run's config.yaml.
HPARAM_KEYS = ("optim.name", "optim.lr", "optim.schedule", "data.name", "data.batch_size", "train.epochs",
               "train.precision", "train.parallel", "train.accumulate_grad_batches")


def open_writer(tb_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(tb_dir), flush_secs=30)


class TBLog:
    """Writes the schema through `writer` (a SummaryWriter), or does nothing when `writer` is None."""

    def __init__(self, writer=None) -> None:
        self.writer = writer

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(TAG_LOSS, loss, global_step)
            self.writer.add_scalar(TAG_LR, lr, global_step)

    def epoch(self, global_step: int, record: dict, names: list[str], wrong=None) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar(TAG_TRAIN_ACC, record["train_acc"], global_step)
        self.writer.add_scalar(TAG_VAL_LOSS, record["val_loss"], global_step)
        self.writer.add_scalar(TAG_VAL_ACC, record["val_acc"], global_step)
        self.writer.add_scalar(TAG_SPEED, record["samples_per_sec"], global_step)
        self.writer.add_scalar(TAG_FLOPS, record["flops_per_sec"], global_step)
        self.writer.add_scalar(TAG_DATA_WAIT, record["data_wait_share"], global_step)
        if record.get("mfu") is not None:
            self.writer.add_scalar(TAG_MFU, record["mfu"], global_step)
        if record.get("peak_mem_mb") is not None:
            self.writer.add_scalar(TAG_PEAK_MEM, record["peak_mem_mb"], global_step)
        if record.get("confusion") is not None:
            self.writer.add_image(FIG_CONFUSION, confusion_figure(record["confusion"], names), global_step,
                                  dataformats="HWC")
        if wrong is not None and len(wrong[0]):
            images, predicted, true = wrong
            titles = [f"{names[p]} / {names[t]}" for p, t in zip(predicted.tolist(), true.tolist(), strict=True)]
            self.writer.add_image(FIG_WRONG, image_grid(images, titles, "predicted / true"), global_step,
                                  dataformats="HWC")
        self.writer.flush()

    def samples(self, images, labels, names: list[str]) -> None:
        """Once per run: a grid of training images with their labels."""
        if self.writer is not None:
            titles = [names[int(i)] for i in labels]
            self.writer.add_image(FIG_SAMPLES, image_grid(images, titles, "training images"), 0, dataformats="HWC")

    def hparams(self, params: dict[str, Any]) -> None:
        """Record the hyperparameters once, in this writer's own event file (no extra run folder)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        # torch writes a bool as a number (1.0000 in the table: bool is an int to its isinstance): true/false here
        clean = {k: str(v).lower() if isinstance(v, bool) else v if isinstance(v, (int, float, str)) else str(v)
                 for k, v in params.items() if v is not None}
        exp, ssi, sei = hparams(clean, {m: 0.0 for m in HPARAM_METRICS})
        # torch 2.14 documents no call for the own file (add_hparams makes a sub-folder); it too uses .file_writer
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


# ------------------------------------------------------------------------------------------ pictures
# Drawn with Pillow, not matplotlib: both pictures of an epoch take a few milliseconds instead of ~0.25 s, which
# rank 0 would spend while the other ranks wait for the next epoch (and matplotlib's import is not paid at start).
BLUES = ((247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))  # white -> dark blue


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _blue(fraction: float) -> tuple[int, int, int]:
    """A colour of the Blues scale for a fraction in [0, 1] (piecewise linear between its anchors)."""
    x = min(max(fraction, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(x), len(BLUES) - 2)
    t = x - i
    return tuple(round(a + (b - a) * t) for a, b in zip(BLUES[i], BLUES[i + 1], strict=True))


# Tiled here, not with torchvision's make_grid: its one padding on every side leaves no room sized for the titles.
def image_grid(images, titles: list[str], title: str, columns: int = 8, scale: int = 3) -> np.ndarray:
    """28x28 images (uint8 or float [0, 1]) enlarged `scale` times and tiled, each with its title above it;
    an RGB array for SummaryWriter.add_image."""
    import torch
    from PIL import Image, ImageDraw

    font, head = _font(11), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    side = 28 * scale
    cell_w = max([side, *(_text_size(probe, t, font)[0] for t in titles)]) + 8
    line = _text_size(probe, "Ag/", font)[1] + 6
    top = _text_size(probe, title, head)[1] + 12
    n = len(titles)
    rows = max(1, -(-n // columns))
    cols = min(columns, max(n, 1))
    cell_h = line + side + 6
    picture = Image.new("RGB", (cols * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((picture.width // 2, 4), title, fill="black", font=head, anchor="mt")
    pixels = images.reshape(-1, 28, 28).float().cpu()
    pixels = (pixels if images.dtype == torch.uint8 else pixels * 255.0).clamp(0, 255).to(torch.uint8).numpy()
    for i, text in enumerate(titles):
        r, c = divmod(i, columns)
        x, y = c * cell_w, top + r * cell_h
        draw.text((x + cell_w // 2, y + 2), text, fill="black", font=font, anchor="mt")
        tile = Image.fromarray(pixels[i]).resize((side, side), Image.NEAREST)
        picture.paste(tile, (x + (cell_w - side) // 2, y + line))
    return np.asarray(picture)


def confusion_figure(matrix: list[list[int]], names: list[str]) -> np.ndarray:
    """Counts of true (rows) x predicted (columns) classes, each row shaded by its fraction of the row, with the
    per-class recall in the row labels; an RGB array for SummaryWriter.add_image."""
    from PIL import Image, ImageDraw

    m = np.asarray(matrix, dtype=np.int64)
    k = len(names)
    totals = np.maximum(m.sum(axis=1), 1)
    font, head = _font(11), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_labels = [f"{n} ({m[i, i] / totals[i]:.0%})" for i, n in enumerate(names)]
    cell = max(34, _text_size(probe, str(int(m.max(initial=0))), font)[0] + 8)
    left = max(_text_size(probe, t, font)[0] for t in row_labels) + 30  # + room for "true (recall)"
    col_h = max(_text_size(probe, n, font)[0] for n in names) + 10
    title = f"test set: {int(np.trace(m))}/{int(m.sum())} correct"
    top = _text_size(probe, title, head)[1] + 16
    width, height = left + k * cell + 12, top + k * cell + col_h + 24
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((left + k * cell // 2, 6), title, fill="black", font=head, anchor="mt")
    for i in range(k):
        y = top + i * cell
        draw.text((left - 6, y + cell // 2), row_labels[i], fill="black", font=font, anchor="rm")
        for j in range(k):
            x = left + j * cell
            share = m[i, j] / totals[i]
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_blue(share))
            if m[i, j]:
                draw.text((x + cell // 2, y + cell // 2), str(int(m[i, j])), font=font, anchor="mm",
                          fill="white" if share > 0.5 else "black")
    draw.rectangle((left - 1, top - 1, left + k * cell, top + k * cell), outline=(120, 120, 120))
    for j, name in enumerate(names):  # column labels, written upwards under each column
        w, h = _text_size(probe, name, font)
        strip = Image.new("RGB", (w + 4, h + 6), "white")
        ImageDraw.Draw(strip).text((2, 1), name, fill="black", font=font)
        strip = strip.rotate(90, expand=True)
        picture.paste(strip, (left + j * cell + (cell - strip.width) // 2, top + k * cell + 4))
    draw.text((left + k * cell // 2, height - 4), "predicted", fill="black", font=font, anchor="mb")
    label = Image.new("RGB", (_text_size(probe, "true (recall)", font)[0] + 4, 16), "white")
    ImageDraw.Draw(label).text((2, 1), "true (recall)", fill="black", font=font)
    label = label.rotate(90, expand=True)
    picture.paste(label, (4, top + (k * cell - label.height) // 2))
    return np.asarray(picture)


def read_events(tb_dir: str | Path, tags=None) -> dict[str, list[tuple[int, float, float]]]:
    """The scalar events under `tb_dir` (every tag, or only those in `tags`): {tag: [(step, wall_time, value), ...]}
    in step order. Where a resumed run logged a step twice, the newer file's value wins; a file that cannot be read
    (truncated by a killed run) is passed over, the others still count."""
    files = sorted(Path(tb_dir).rglob("events.out.tfevents.*"))  # names start with the time they were opened
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, tuple[int, float, float]]] = {}
    for events in files:
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        try:
            acc.Reload()
        except Exception:  # noqa: BLE001 - whatever a damaged file raises: keep what the others hold
            continue
        for tag in acc.Tags().get("scalars", []):
            if tags is None or tag in tags:
                merged.setdefault(tag, {}).update((e.step, (e.step, e.wall_time, e.value)) for e in acc.Scalars(tag))
    return {tag: [points[s] for s in sorted(points)] for tag, points in merged.items()}


def read_scalars(tb_dir: str | Path, tags=None) -> dict[str, list[tuple[int, float]]]:
    """read_events without the wall times: {tag: [(step, value), ...]}."""
    return {tag: [(step, value) for step, _, value in points] for tag, points in read_events(tb_dir, tags).items()}
