"""The IDX files of MNIST and Fashion-MNIST: their names, parsing, the checks every split passes, and where
they live under data.root (torchvision's folder layout)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch

from distmnist.core.config import DataConfig
from distmnist.core.errors import DistMnistError

TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# Where Debian's package dataset-fashion-mnist puts the real files; found without the user typing it.
SYSTEM_FOLDERS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")], "mnist": []}
SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZE = {True: 60000, False: 10000}
RAW_FILES = SPLIT_FILES[True] + SPLIT_FILES[False]
SYNTHETIC_SIZE = {True: 6000, False: 1000}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "synthetic": [f"class {i}" for i in range(10)],
}
IDX_DTYPES = {0x08: torch.uint8}


# --------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path, max_bytes: int = 100 * 2**20) -> torch.Tensor:
    """Read an IDX file (gzipped or not) of unsigned bytes; DistMnistError if it is not a valid one."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as err:
        raise DistMnistError(f"cannot read {path}: {err}") from None
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, source: str = "IDX data") -> torch.Tensor:
    if len(raw) < 4:
        raise DistMnistError(f"{source} is not an IDX file: {len(raw)} bytes, too short for a header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in IDX_DTYPES or not 1 <= ndim <= 3:
        raise DistMnistError(
            f"{source} is not an IDX file of unsigned bytes (magic {raw[:4].hex()}, expected 0000080N)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DistMnistError(f"{source} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DistMnistError(
            f"{source} is {what}: {len(raw)} bytes, header {list(dims)} needs {expected}; fetch the file again"
        )
    if expected == header:  # a valid, empty array (torch.frombuffer refuses an empty buffer)
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def check_split(images: torch.Tensor, labels: torch.Tensor, train: bool, source: str) -> None:
    n = SPLIT_SIZE[train]
    if tuple(images.shape) != (n, 28, 28):
        raise DistMnistError(f"{source}: images have shape {list(images.shape)}, expected [{n}, 28, 28]")
    if tuple(labels.shape) != (n,):
        raise DistMnistError(f"{source}: labels have shape {list(labels.shape)}, expected [{n}]")
    if int(labels.max()) > 9:
        raise DistMnistError(f"{source}: labels go up to {int(labels.max())}, expected 0..9")


def raw_folder(cfg: DataConfig) -> Path:
    return Path(cfg.root) / TORCHVISION_CLASS[cfg.name] / "raw"


def find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz", folder / name.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    return None
