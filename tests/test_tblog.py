"""The TensorBoard pictures: real arrays from the real renderers, checked pixel by pixel where it matters."""

from __future__ import annotations

import numpy as np
import torch

from distmnist.core import tblog

NAMES = [f"class {i}" for i in range(10)]


def test_confusion_picture_shades_each_cell_by_its_share_of_the_row():
    matrix = np.full((10, 10), 1, dtype=int) + np.diag(np.full(10, 91))  # rows of 100, 91 on the diagonal
    picture = tblog.confusion_figure(matrix.tolist(), NAMES)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    # the diagonal cells are dark blue, the off-diagonal cells nearly white (colours to rounding)
    blue = np.array(tblog._blue(0.91))
    assert (np.abs(picture.astype(int) - blue).sum(axis=2) <= 3).sum() > 10 * 20 * 20
    pale = np.array(tblog._blue(0.01))
    assert (np.abs(picture.astype(int) - pale).sum(axis=2) <= 3).sum() > 90 * 20 * 20


def test_blues_scale_runs_from_white_to_dark_blue():
    assert tblog._blue(0.0) == tblog.BLUES[0] and tblog._blue(1.0) == tblog.BLUES[-1]
    assert tblog._blue(-1) == tblog.BLUES[0] and tblog._blue(2) == tblog.BLUES[-1]
    shades = [sum(tblog._blue(f / 20)) for f in range(21)]
    assert shades == sorted(shades, reverse=True)  # darker as the share grows


def test_image_grid_shows_uint8_and_float_images_alike():
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    titles = [f"{NAMES[i]} / {NAMES[9 - i]}" for i in range(10)]
    a = tblog.image_grid(images, titles, "predicted / true")
    b = tblog.image_grid(images.float() / 255.0, titles, "predicted / true")
    assert a.shape == b.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float -> uint8 rounding only
    # every image is in the picture, enlarged 3x (each pixel a 3x3 block), in grey on all three channels
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    for image in images[:, 0].numpy():
        tile = np.kron(image, np.ones((3, 3), dtype=np.uint8))
        assert _contains(a[..., 0], tile)
    empty = tblog.image_grid(images[:0], [], "nothing")
    assert empty.ndim == 3


def _contains(picture: np.ndarray, tile: np.ndarray) -> bool:
    """Whether `tile` appears somewhere in `picture` (both 2-D uint8)."""
    first = tile[0].tobytes()
    for r in range(picture.shape[0] - tile.shape[0] + 1):
        start = picture[r].tobytes().find(first)
        while start >= 0:
            if (picture[r : r + tile.shape[0], start : start + tile.shape[1]] == tile).all():
                return True
            start = picture[r].tobytes().find(first, start + 1)
    return False


def _events(folder):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e for f in sorted(folder.rglob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()]


def test_hparams_go_into_the_writers_own_event_file_without_scalars(tmp_path):
    log = tblog.TBLog(tblog.open_writer(tmp_path))
    log.step(10, 0.5, 0.25)  # values a float32 holds exactly
    log.hparams({"optim.lr": 0.1, "model.hidden": [128, 128], "strategy": "ddp"})
    log.close()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-folder (SummaryWriter.add_hparams)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    tags = [v.tag for e in _events(tmp_path) for v in e.summary.value]
    assert sorted(t for t in tags if t.startswith("_hparams_/")) == [
        "_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    assert tblog.read_scalars(tmp_path) == {tblog.TAG_LOSS: [(10, 0.5)], tblog.TAG_LR: [(10, 0.25)]}


def test_read_events_newer_file_wins_and_a_damaged_file_is_passed_over(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for value, wall in ((1.0, 100.0), (2.0, 200.0)):  # a run, then its resumed attempt logging step 32 again
        with SummaryWriter(str(tmp_path), filename_suffix=f".{int(value)}") as w:
            w.add_scalar(tblog.TAG_VAL_ACC, value, 32, walltime=wall)
            w.add_scalar(tblog.TAG_VAL_LOSS, value, 32, walltime=wall)
    (tmp_path / "events.out.tfevents.9999999999.host.damaged").write_bytes(b"\x01\x02 not a record")
    assert tblog.read_events(tmp_path, (tblog.TAG_VAL_ACC,)) == {tblog.TAG_VAL_ACC: [(32, 200.0, 2.0)]}
    assert tblog.read_scalars(tmp_path) == {tblog.TAG_VAL_ACC: [(32, 2.0)], tblog.TAG_VAL_LOSS: [(32, 2.0)]}
    assert tblog.read_events(tmp_path / "missing") == {}
