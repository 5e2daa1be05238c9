"""Which data set a folder of IDX files holds, from their content (no network), and why a download failed.

A split is recognised by two exact numbers that the other data set cannot share: the label count per class
(Fashion-MNIST has exactly 6000 / 1000 of each; MNIST's counts are uneven, as published with it and quoted by
Lightning's own test datasets) and the sum of all pixel values of its images (MNIST's from its published means
0.1306604762738431 / 0.13251460584233699 x 255 x pixels, both integers to 1e-5; Fashion-MNIST's computed here
from Debian's dataset-fashion-mnist). Record counts and shapes are checked before (data.check_split).
"""

from __future__ import annotations

import numpy as np
import torch

from distmnist.core.errors import DistMnistError

TITLE = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# label count per class, per data set and split (train True)
LABEL_COUNTS = {
    "mnist": {True: (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
              False: (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)},
    "fashion-mnist": {True: (6000,) * 10, False: (1000,) * 10},
}
# sum of every pixel value (uint8) of the images, per data set and split
PIXEL_SUMS = {"mnist": {True: 1567298545, False: 264923200},
              "fashion-mnist": {True: 3431114169, False: 573469082}}


def recognise(images: torch.Tensor, labels: torch.Tensor) -> tuple[str | None, str]:
    """(data set or None, what shows it) for one split of checked shape."""
    counts = tuple(torch.bincount(labels.to(torch.int64), minlength=10).tolist())
    pixels = int(images.numpy().sum(dtype=np.int64))  # numpy's: 15x faster than torch's for uint8 -> int64
    for name in TITLE:
        for train in (True, False):
            if counts == LABEL_COUNTS[name][train] and pixels == PIXEL_SUMS[name][train]:
                return name, f"{TITLE[name]}'s label counts and pixel sum"
            if counts == LABEL_COUNTS[name][train] or pixels == PIXEL_SUMS[name][train]:
                what = "label counts" if counts == LABEL_COUNTS[name][train] else "pixel sum"
                return name, f"{TITLE[name]}'s {what} (the other does not match: altered files?)"
    return None, f"label counts {list(counts)}, pixel sum {pixels}"


def verify(name: str, source: str, splits: dict[bool, tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """Refuse files of the other data set (DistMnistError naming both); a warning line for unknown ones."""
    unknown = []
    for train, (images, labels) in splits.items():
        found, why = recognise(images, labels)
        split = "train" if train else "test"
        if found is not None and found != name:
            raise DistMnistError(
                f"the files under {source} are {TITLE[found]}, not {TITLE[name]}: the {split} split has {why}; "
                f"use them as {found} (--name {found} / data.name={found}), or prepare {TITLE[name]}'s own files"
            )
        if found is None:
            unknown.append(f"{split}: {why}")
    if unknown:
        return (f"cannot verify that the files under {source} are {TITLE[name]} ({'; '.join(unknown)}); "
                f"using them as they are")
    return None


def download_cause(err: BaseException) -> str:
    """The real reason of a failed download: torchvision puts each mirror's error on lines of its message."""
    seen: list[str] = []
    while err is not None:
        reason = getattr(err, "reason", None)
        lines = [str(reason)] if reason is not None else str(err).splitlines()
        for line in lines:
            line = line.strip().removeprefix("<urlopen error ").removesuffix(">").strip()
            if line and not line.startswith(("Error downloading", "Tried ")) and line not in seen:
                seen.append(line)
        err = err.__cause__ or err.__context__
    return "; ".join(seen)[:160] or "no reason given"
