"""Putting the four IDX files of a data set under data.root: copied from a folder (`distmnist data prepare`),
found in a system folder (Debian's dataset-fashion-mnist), or downloaded by torchvision -- atomically, under a
lock, bounded in time, their identity verified (core/identity.py); one process per node, the others wait."""

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
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from distmnist.core import dist, identity
from distmnist.core.checkpoint import atomic_open
from distmnist.core.config import DataConfig
from distmnist.core.data.format import (
    RAW_FILES,
    SPLIT_FILES,
    SYSTEM_FOLDERS,
    TORCHVISION_CLASS,
    check_split,
    find_file,
    raw_folder,
    read_idx,
)
from distmnist.core.errors import AgreedError, DistMnistError

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
    found = {f: find_file(source, f) for f in RAW_FILES}
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
        torchvision_split(DataConfig(name=name, root=str(root)), train)
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
            cls = torchvision_class(cfg.name)
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
        _checked_sources(cfg.name, raw_folder(cfg))  # put there by hand, say: the data set named, not the other
        return
    deadline = time.monotonic() + cfg.prepare_timeout_s
    with PrepareLock(cfg.name, cfg.root, cfg.prepare_timeout_s) as lock:
        if _have_files(cfg):  # prepared (and checked) by the process we waited for
            return
        if lock.held:
            _remove_leftovers(cfg.name, cfg.root)
        for folder in SYSTEM_FOLDERS[cfg.name]:
            if folder.is_dir() and all(find_file(folder, f) for f in RAW_FILES):
                found = _checked_sources(cfg.name, folder)
                _within(deadline, "copying", functools.partial(_install, cfg.name, found, cfg.root), lock)
                return
        if not cfg.download:
            raise DistMnistError(
                f"{cfg.name} is not under {raw_folder(cfg)} and data.download=false: {offline_fixes(cfg.name)}"
            )
        _within(deadline, "downloading", lambda: _download(cfg), lock)


def all_ensure_available(cfg: DataConfig, env: dist.DistEnv) -> None:
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
        outcomes: list[tuple[str | None, str]] = [(None, "")] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(outcomes, (problem, socket.gethostname()), group=group)
        torch.distributed.destroy_process_group(group)
        found = next(((r, p, host) for r, (p, host) in enumerate(outcomes) if p is not None), None)
        if found is not None:  # said by rank 0: on another node, name the rank and node it happened on
            r, problem, host = found
            if host != outcomes[0][1]:
                problem = f"rank {r} on {host} stopped: {problem}"
    if bug is not None:
        raise bug  # with its traceback, where it happened
    if problem is not None:
        raise AgreedError(problem)


# how much longer than data.prepare_timeout_s the ranks wait for the preparing ones to report
OUTCOME_SLACK_S = 60.0


def torchvision_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION_CLASS[name])


def torchvision_split(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
        ds = torchvision_class(cfg.name)(cfg.root, train=train, download=False)
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
