"""Data: MNIST / Fashion-MNIST (torchvision's dataset classes) or a synthetic set, sharded per rank.

Every strategy and both loaders see the same samples in the same order:

* training order: a permutation seeded with ``seed + epoch``, padded and split across ranks exactly as
  :class:`torch.utils.data.DistributedSampler` does (``shard_indices``) -- or, with ``data.global_batch_size`` G,
  padded to whole global batches so that optimizer step k takes ``P[kG:(k+1)G]`` at any world size
  (``step_order``, which also places the micro-batches of gradient accumulation);
* evaluation: rank r takes test samples r, r+W, r+2W, ... with no padding, so every test image is counted
  exactly once for any world size W.

``data.loader=resident`` keeps a whole split as one float tensor on the training device: an epoch is one
gather of the rank's shard, a batch is a slice (no per-sample Python, no host-device copy per step).
``data.loader=dataloader`` is the classic ``DataLoader`` path with a sampler (+ ``set_epoch``) in that order.
Pixel values are ``uint8 / 255`` as float32 in both (what ``ToTensor`` gives); shapes are (B, 1, 28, 28).
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from distmnist.core import dist, identity
from distmnist.core.checkpoint import atomic_open
from distmnist.core.config import Batching, Config, DataConfig, batching
from distmnist.core.errors import AgreedError, DistMnistError

# torchvision's class name (its folder under data.root) per data set
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


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz", folder / name.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------- preparing the files under data.root
# Preparation is safe for runs that start together on one data.root, and for nodes that share it:
#  * every file reaches its final name by an atomic rename from a temporary name in the same folder
#    (checkpoint.atomic_open); a download goes to a private temporary folder and is checked before it is copied
#    in. A half-written file is never visible under its final name, so a killed preparation leaves only
#    temporary names, which the next preparation removes;
#  * one process at a time prepares a data set in a data.root: it holds an flock on
#    <data.root>/<Class>/.prepare.lock (released by the kernel when the process dies, so a lock file left behind
#    is not a lock). The others wait on that lock and then find the files;
#  * all of it is bounded by data.prepare_timeout_s, separate from dist.timeout_s.
PREPARE_LOCK = ".prepare.lock"
LOCK_POLL_S = 0.2


def _dataset_folder(name: str, root: str | Path) -> Path:
    return Path(root) / TORCHVISION_CLASS[name]


def lock_path(name: str, root: str | Path) -> Path:
    return _dataset_folder(name, root) / PREPARE_LOCK


class PrepareLock:
    """An exclusive flock on the data set's lock file, waited for up to `timeout_s`; the holder writes who it is
    into the file so that a waiter that gives up can name it.

    Where the file system has no flock (Lustre mounted without ``-o flock``), ``held`` is False and preparation
    goes ahead unlocked: still safe (atomic renames), but it may be done twice and leftovers are not removed.
    """

    def __init__(self, name: str, root: str | Path, timeout_s: float) -> None:
        self.name, self.root, self.timeout_s = name, Path(root), timeout_s
        self.path = lock_path(name, root)
        self.fd: int | None = None
        self.held = False
        self.keep = False  # set when work started under the lock may still be running: hold it until exit

    def __enter__(self) -> PrepareLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise DistMnistError(
                f"cannot create the lock file {self.path} to prepare {self.name} ({err.strerror or err}): data.root "
                f"must be writable, or put the files there beforehand with `distmnist data prepare`"
            ) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    os.close(self.fd)
                    raise DistMnistError(
                        f"preparing {self.name} under {self.root} is slow or stuck: waited {self.timeout_s:g} s "
                        f"(data.prepare_timeout_s) for the lock {self.path}, held by {holder}; let that "
                        f"preparation finish, raise data.prepare_timeout_s, or put the files there beforehand "
                        f"with `distmnist data prepare`"
                    ) from None
                time.sleep(LOCK_POLL_S)
            except OSError:  # no flock on this file system: go on unlocked (see the class doc)
                break
        if self.held:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode(), 0)
        return self

    def holder(self) -> str:
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return text.splitlines()[0][:200] if text else "another process"

    def __exit__(self, *exc) -> None:
        if self.fd is not None and not self.keep:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _remove_leftovers(name: str, root: str | Path) -> None:
    """Temporary files and download folders of preparations that died (call only while holding the lock)."""
    folder = _dataset_folder(name, root)
    leftovers = [*folder.glob(".download-*"), *(folder / "raw").glob(".*.tmp")]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _within(deadline: float, what: str, work: Callable[[], None], lock: PrepareLock) -> None:
    """Run `work` (a copy or a download: no timeout of its own) in a thread, bounded by `deadline`."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            failure.append(err)

    thread = threading.Thread(target=run, name=f"distmnist-{what}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        lock.keep = True  # the thread may still write: keep the lock until this process exits
        raise DistMnistError(
            f"{what} {lock.name} into {lock.root} is slow or stuck: not done within data.prepare_timeout_s="
            f"{lock.timeout_s:g} s; raise data.prepare_timeout_s, or put the files there beforehand with "
            f"`distmnist data prepare --name {lock.name} --from DIR`"
        )
    if failure:
        raise failure[0]


def _checked_sources(name: str, source: str | Path) -> dict[str, Path]:
    """The four IDX files of `name` in `source`, each read and checked (DistMnistError naming a bad one)."""
    if name not in TORCHVISION_CLASS:
        raise DistMnistError(f"data prepare: --name must be one of {', '.join(TORCHVISION_CLASS)}, got {name!r}")
    source = Path(source)
    if not source.is_dir():
        raise DistMnistError(f"data prepare: {source} is not a folder")
    found = {f: _find(source, f) for f in RAW_FILES}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        raise DistMnistError(
            f"data prepare: {source} lacks {', '.join(missing)} (gzipped or not); it needs the four standard "
            f"IDX files of {name}"
        )
    tensors = {f: read_idx(p) for f, p in found.items()}
    for train, (img, lab) in SPLIT_FILES.items():
        check_split(tensors[img], tensors[lab], train, source=str(source))
    splits = {train: (tensors[img], tensors[lab]) for train, (img, lab) in SPLIT_FILES.items()}
    warning = identity.verify(name, str(source), splits)
    if warning is not None:
        print(f"distmnist: warning: {warning}", file=sys.stderr, flush=True)
    return found


def _install(name: str, found: dict[str, Path], root: str | Path) -> Path:
    """Copy checked files to where torchvision looks, each by an atomic rename (hold the lock)."""
    dest = _dataset_folder(name, root) / "raw"
    dest.mkdir(parents=True, exist_ok=True)
    for f, p in found.items():
        with atomic_open(dest / f) as out, (gzip.open if p.suffix == ".gz" else open)(p, "rb") as src:
            shutil.copyfileobj(src, out)
    for train in (True, False):  # torchvision itself must now read them
        _torchvision_split(DataConfig(name=name, root=str(root)), train)
    return dest


def prepare(name: str, source: str | Path, root: str | Path,
            timeout_s: float = DataConfig.prepare_timeout_s) -> Path:
    """Copy the four IDX files of `name` from `source` to where torchvision looks, checking each one, under the
    data set's lock (`distmnist data prepare`)."""
    found = _checked_sources(name, source)
    deadline = time.monotonic() + timeout_s
    with PrepareLock(name, root, timeout_s) as lock:
        if lock.held:
            _remove_leftovers(name, root)
        _within(deadline, "copying", functools.partial(_install, name, found, root), lock)
    return _dataset_folder(name, root) / "raw"


def _have_files(cfg: DataConfig) -> bool:
    folder = raw_folder(cfg)
    return all((folder / f).is_file() for f in RAW_FILES)


def _download(cfg: DataConfig) -> None:
    """torchvision's download into a private temporary folder, then checked and copied in (hold the lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=_dataset_folder(cfg.name, cfg.root)))
    try:
        try:
            cls = _torchvision_class(cfg.name)
            for train in (True, False):
                cls(str(tmp), train=train, download=True)
        except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, OSError...
            raise DistMnistError(
                f"{cfg.name} is not under {raw_folder(cfg)} and the download failed "
                f"({identity.download_cause(err)}): {offline_fixes(cfg.name)}"
            ) from None
        _install(cfg.name, _checked_sources(cfg.name, tmp / TORCHVISION_CLASS[cfg.name] / "raw"), cfg.root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def offline_fixes(name: str) -> str:
    """What works without a network, for the one line of a failed download."""
    system = SYSTEM_FOLDERS["fashion-mnist"][0]
    fashion = (f"Fashion-MNIST is here in {system} (Debian's dataset-fashion-mnist): train on it with -c fashion"
               if system.is_dir() else "apt-get install dataset-fashion-mnist and train on it with -c fashion")
    return (f"{fashion}; or put the four IDX files there with `distmnist data prepare --name {name} --from DIR`; "
            f"or -c smoke (synthetic data, no files)")


def _fetch(cfg: DataConfig) -> None:
    """Put the files under data.root (system folder, else torchvision download) unless they are there, under the
    data set's lock and within data.prepare_timeout_s; DistMnistError saying what went wrong."""
    if _have_files(cfg):
        return
    deadline = time.monotonic() + cfg.prepare_timeout_s
    with PrepareLock(cfg.name, cfg.root, cfg.prepare_timeout_s) as lock:
        if _have_files(cfg):  # prepared by the process we waited for
            return
        if lock.held:
            _remove_leftovers(cfg.name, cfg.root)
        for folder in SYSTEM_FOLDERS[cfg.name]:
            if folder.is_dir() and all(_find(folder, f) for f in RAW_FILES):
                found = _checked_sources(cfg.name, folder)
                _within(deadline, "copying", functools.partial(_install, cfg.name, found, cfg.root), lock)
                return
        if not cfg.download:
            raise DistMnistError(
                f"{cfg.name} is not under {raw_folder(cfg)} and data.download=false: {offline_fixes(cfg.name)}"
            )
        _within(deadline, "downloading", lambda: _download(cfg), lock)


def ensure_available(cfg: DataConfig, env: dist.DistEnv) -> None:
    """Make the files available on every rank, prepared once per data.root.

    Local rank 0 of every node fetches under the data set's lock (a node whose data.root is node-local gets its
    own copy; on a shared one the first holder prepares and the others find the files). The ranks then agree on
    the outcome through a gloo group whose timeout is data.prepare_timeout_s (not dist.timeout_s), so a slow
    download is reported as one, and any failure is reported once, by rank 0, and ends every rank with exit 2.
    """
    if cfg.name == "synthetic":
        return
    group = None
    if dist.is_distributed() and torch.distributed.get_world_size() > 1:
        group = torch.distributed.new_group(
            backend="gloo", timeout=timedelta(seconds=cfg.prepare_timeout_s + OUTCOME_SLACK_S)
        )
    problem, bug = None, None
    if env.local_rank == 0 or group is None:
        try:
            _fetch(cfg)
        except DistMnistError as err:
            problem = str(err)
        except OSError as err:  # a folder that cannot be made, a file system that refuses: the user's to fix
            problem = f"cannot prepare {cfg.name} under {cfg.root}: {err}"
        except Exception as err:  # a bug: the others must not wait for an outcome that never comes
            problem = f"preparing {cfg.name} under {cfg.root} failed on rank {env.rank}: {type(err).__name__}"
            bug = err
    if group is not None:
        outcomes: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(outcomes, problem, group=group)
        torch.distributed.destroy_process_group(group)
        problem = next((p for p in outcomes if p is not None), None)
    if bug is not None:
        raise bug  # with its traceback, where it happened
    if problem is not None:
        raise AgreedError(problem)


# how much longer than data.prepare_timeout_s the ranks wait for the preparing ones to report
OUTCOME_SLACK_S = 60.0


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION_CLASS[name])


def _torchvision_split(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = raw_folder(cfg)
    images_file, labels_file = SPLIT_FILES[train]
    for f in (images_file, labels_file):  # clean messages for damaged files instead of torchvision's
        if not (folder / f).is_file():
            raise DistMnistError(
                f"{folder / f} is missing: run `distmnist data prepare --name {cfg.name} --from DIR`"
            )
    header_check(folder / images_file)
    labels = read_idx(folder / labels_file)
    try:
        ds = _torchvision_class(cfg.name)(cfg.root, train=train, download=False)
        images, targets = ds.data, ds.targets
    except Exception as err:  # noqa: BLE001
        raise DistMnistError(f"torchvision cannot read {folder}: {err}; run `distmnist data prepare` again") from None
    check_split(images, labels, train, source=str(folder))
    return images, targets.to(torch.int64)


def header_check(path: Path) -> None:
    """Header and size of a big IDX file without reading it all."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":
        raise DistMnistError(f"{path} is not an IDX image file; run `distmnist data prepare` again")
    dims = struct.unpack(">3I", head[4:16])
    if size != 16 + math.prod(dims):
        raise DistMnistError(
            f"{path} is damaged: {size} bytes, its header {list(dims)} needs {16 + math.prod(dims)}; "
            f"run `distmnist data prepare` again"
        )


# ---------------------------------------------------------------------------------------- synthetic set
def synthetic_split(train: bool, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, learnable 10-class set of 28x28 uint8 images: a smooth prototype per class plus noise.

    The same bytes on every machine and rank (CPU generator with a fixed seed).
    """
    n = n or SYNTHETIC_SIZE[train]
    g = torch.Generator().manual_seed(20240601)
    smooth = F.interpolate(torch.rand(10, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")[:, 0]
    prototypes = 0.5 + 0.8 * (smooth - 0.5)
    g.manual_seed(1 if train else 2)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randn(n, 28, 28, generator=g) * 0.5
    images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def split_size(cfg: DataConfig, train: bool) -> int:
    """Number of samples of a split, known without loading it."""
    full = (SYNTHETIC_SIZE if cfg.name == "synthetic" else SPLIT_SIZE)[train]
    limit = cfg.train_samples if train else cfg.test_samples
    return min(full, limit) if limit is not None and cfg.name != "synthetic" else (limit or full)


def steps_per_epoch(cfg: Config, world_size: int) -> int:
    """Optimizer steps in one epoch: ceil(ceil(N / world_size) / (batch_size x accumulation)), as
    DistributedSampler pads; with data.global_batch_size, ceil(N / global batch) whatever the world size."""
    b = batching(cfg, world_size)
    return math.ceil(rank_samples(split_size(cfg.data, True), b) / b.step_batch)


def load_split(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of one split, cut to data.train/test_samples if set."""
    limit = cfg.train_samples if train else cfg.test_samples
    if cfg.name == "synthetic":
        return synthetic_split(train, limit)
    images, labels = _torchvision_split(cfg, train)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], bit for bit what ToTensor gives."""
    return images.unsqueeze(1).to(torch.float32).div(255)


# ------------------------------------------------------------------------------------------------ order
def shard_indices(n: int, world_size: int, rank: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The indices `DistributedSampler(shuffle, seed, drop_last=False)` gives `rank` at `epoch`."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    if total > n:  # pad by repeating the start, as DistributedSampler does
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
    return order[rank:total:world_size]


def eval_indices(n: int, world_size: int, rank: int) -> torch.Tensor:
    """Rank r's test samples: r, r+W, ... -- no padding, so the union over ranks is each sample once."""
    return torch.arange(rank, n, world_size)


def rank_samples(n: int, b: Batching) -> int:
    """Samples one rank takes in an epoch of `n`, padding included."""
    if b.fixed:  # padded to whole global batches
        return math.ceil(n / b.global_batch) * b.step_batch
    return math.ceil(n / b.world_size)  # padded to a multiple of the world size, as DistributedSampler


def step_order(n: int, b: Batching, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """Rank `rank`'s indices of an epoch, in the order its micro-batches take them.

    The epoch's permutation P (seed + epoch) is padded by repeating its start: to a multiple of the world size W
    (DistributedSampler's padding) or, with data.global_batch_size G, to whole global batches (every step then
    has G samples whatever W is). Rank r takes P[r::W]; its share of optimizer step k is the next
    batch_size x accumulation (A) of those, i.e. P[kG + r :: W] within P[kG:(k+1)G], and micro-batch m of the
    step takes every A-th of them from the m-th (listed micro-batch by micro-batch, so a micro-batch is a
    contiguous slice). So micro-batch m of rank r takes P[kG:(k+1)G][m*W + r :: W*A]: the same samples as rank
    m*W + r of a job of W*A processes without accumulation, and step k consumes P[kG:(k+1)G] for any W and A.
    With A = 1 and no global batch this is ``shard_indices``, DistributedSampler's order."""
    if b.fixed:
        total = rank_samples(n, b) * b.world_size
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        idx = order[rank:total:b.world_size]
    else:
        idx = shard_indices(n, b.world_size, rank, seed, epoch)
    a, step = b.accumulate, b.step_batch
    if a == 1:
        return idx
    full = idx.shape[0] // step * step  # whole steps: [k, i, m] -> [k, m, i]
    head = idx[:full].view(-1, b.batch_size, a).transpose(1, 2).reshape(-1)
    tail = idx[full:]  # a short last step (no global batch): micro-batch sizes differ by at most one
    return torch.cat([head, *(tail[m::a] for m in range(a))])


class EpochOrder:
    """Sampler-like: the rank's indices for the current epoch (``set_epoch`` as with DistributedSampler), in the
    order of its micro-batches (``step_order``); ``skip_samples`` starts the next pass part-way (resume)."""

    def __init__(self, n: int, b: Batching, rank: int, seed: int) -> None:
        self.n, self.b, self.rank, self.seed = n, b, rank, seed
        self.epoch = 0
        self.skip_samples = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        skip, self.skip_samples = self.skip_samples, 0
        return step_order(self.n, self.b, self.rank, self.seed, self.epoch)[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return rank_samples(self.n, self.b)


class ResidentBatches:
    """Training batches from a split kept on the device, in the sampler's order (gathered per batch on the CPU,
    per epoch on a GPU). One item is one optimizer step's samples of this rank: batch_size x accumulation, its
    micro-batches one after the other (``micro_batches`` splits it)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, b: Batching, sampler: EpochOrder,
                 device: torch.device) -> None:
        self.images = to_float(images).to(device)
        self.labels = labels.to(device)
        self.batch_size = b.step_batch
        self.sampler = sampler  # Lightning calls sampler.set_epoch(epoch) on it, as on a DataLoader's

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip(self, steps: int) -> None:
        """Start the next pass `steps` optimizer steps into the epoch (resume mid-epoch)."""
        self.sampler.skip_samples = steps * self.batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, bs = self.sampler.indices().to(self.images.device), self.batch_size
        if self.images.device.type == "cpu":
            # per batch on the CPU: 938 gathers of 64 images take ~20 ms an epoch, one gather of the whole epoch
            # ~70 ms (a 188 MB copy through memory)
            for i in range(0, idx.shape[0], bs):
                b = idx[i : i + bs]
                yield self.images.index_select(0, b), self.labels.index_select(0, b)
            return
        # on a GPU one gather per epoch is one kernel; the batches are then slices (no launch per step)
        x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        for i in range(0, x.shape[0], bs):
            yield x[i : i + bs], y[i : i + bs]


def micro_batches(x: torch.Tensor, y: torch.Tensor, accumulate: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step's samples of a rank -> its `accumulate` micro-batches (contiguous slices; sizes as
    ``step_order`` lists them)."""
    if accumulate == 1:
        return [(x, y)]
    return list(zip(x.tensor_split(accumulate), y.tensor_split(accumulate), strict=True))


class MicroBatches:
    """The step batches as micro-batches, for a loop that accumulates itself (the Lightning Trainer's
    ``accumulate_grad_batches``); ``sampler`` and ``skip`` (in optimizer steps) are the step batches'."""

    def __init__(self, steps, accumulate: int) -> None:
        self.steps, self.accumulate = steps, accumulate
        self.sampler = steps.sampler

    def __len__(self) -> int:
        return len(self.steps) * self.accumulate

    def __iter__(self):
        for x, y in self.steps:
            yield from micro_batches(x, y, self.accumulate)


class ImageSet(Dataset):
    """Map-style dataset over uint8 images, returning what ToTensor gives (per sample, the classic way)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].unsqueeze(0).to(torch.float32).div(255), self.labels[i]


class LoaderBatches:
    """The classic path: DataLoader over the map-style set with the sampler's order (DistributedSampler's, see
    ``step_order``), ``set_epoch`` each epoch. One item is one optimizer step's samples of this rank."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, b: Batching, rank: int,
                 seed: int, device: torch.device) -> None:
        self.sampler = EpochOrder(len(labels), b, rank, seed)
        self.loader = DataLoader(
            ImageSet(images, labels), batch_size=b.step_batch, sampler=self.sampler, num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0, drop_last=False,
        )
        self.batch_size = b.step_batch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip(self, steps: int) -> None:
        self.sampler.skip_samples = steps * self.batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        return iter(self.loader)


def train_batches(cfg: Config, env: dist.DistEnv, split: tuple[torch.Tensor, torch.Tensor] | None = None):
    """This rank's training batches, one item per optimizer step (``micro_batches`` splits one)."""
    images, labels = split if split is not None else load_split(cfg.data, train=True)
    b = batching(cfg, env.world_size)
    if cfg.data.loader == "resident":
        return ResidentBatches(images, labels, b, EpochOrder(len(labels), b, env.rank, cfg.seed), env.device)
    return LoaderBatches(images, labels, cfg.data, b, env.rank, cfg.seed, env.device)


class EvalBatches:
    """This rank's share of the test split in fixed batches, already on the device; iterate it every epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def eval_batches(cfg: Config, env: dist.DistEnv, split: tuple[torch.Tensor, torch.Tensor] | None = None):
    images, labels = split if split is not None else load_split(cfg.data, train=False)
    idx = eval_indices(len(labels), env.world_size, env.rank)
    return EvalBatches(to_float(images[idx]).to(env.device), labels[idx].to(env.device), cfg.data.eval_batch_size)
