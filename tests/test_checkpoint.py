"""checkpoint.py: atomic writes, exact save/load of training state, damaged files, newest-good resume."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from procs import old_record

from distmnist.core import checkpoint
from distmnist.core.config import load_config
from distmnist.core.errors import DistMnistError
from distmnist.core.model import build_model, build_optimizer, build_scheduler
from distmnist.core.state import TallySums, TrainState


# ------------------------------------------------------------------------------------------ atomic write
def test_atomic_write_creates_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "dir" / "file.bin"
    checkpoint.atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    checkpoint.atomic_write(path, b"second, longer content")
    assert path.read_bytes() == b"second, longer content"
    checkpoint.atomic_write(path, b"")
    assert path.read_bytes() == b""
    assert os.listdir(path.parent) == ["file.bin"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "file.bin"
    checkpoint.atomic_write(path, b"old")
    with pytest.raises(TypeError):
        checkpoint.atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def plain_file_mode(folder) -> int:
    """The mode `open(path, "wb")` gives a new file here (0o666 less the umask)."""
    probe = folder / "probe"
    with open(probe, "wb"):
        pass
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def test_atomic_write_gives_a_file_the_usual_mode(tmp_path):
    """Run-dir files (config.yaml, model.pt, metrics.json, checkpoints) must be as readable as any other file
    the user writes (a teammate's TensorBoard or evaluate), not 0600 because of the temporary file."""
    path = tmp_path / "metrics.json"
    checkpoint.atomic_write(path, b"{}")
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(plain_file_mode(tmp_path))
    checkpoint.atomic_torch_save({"a": 1}, tmp_path / "model.pt")
    assert oct(stat.S_IMODE((tmp_path / "model.pt").stat().st_mode)) == oct(plain_file_mode(tmp_path))


def test_atomic_torch_save_round_trip(tmp_path):
    obj = {"a": torch.arange(5), "b": [1, 2, 3]}
    checkpoint.atomic_torch_save(obj, tmp_path / "x.pt")
    back = torch.load(tmp_path / "x.pt", weights_only=False)
    assert torch.equal(back["a"], obj["a"]) and back["b"] == [1, 2, 3]
    assert os.listdir(tmp_path) == ["x.pt"]


# -------------------------------------------------------------------------------------- save / load state
def training_state(seed: int):
    cfg = load_config(None, ["optim.lr=0.1", "optim.momentum=0.9", "optim.schedule=cosine", f"seed={seed}"])
    model = build_model([32, 16], seed=seed)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.optim, optimizer, total_steps=20)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(8, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()


def assert_same_state(a, b):
    (ma, oa, sa), (mb, ob, sb) = a, b
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    bufs_a = [oa.state[p]["momentum_buffer"] for p in ma.parameters()]
    bufs_b = [ob.state[p]["momentum_buffer"] for p in mb.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(bufs_a, bufs_b, strict=True))
    assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]
    assert sa.last_epoch == sb.last_epoch
    assert sa.get_last_lr() == sb.get_last_lr()


def test_save_and_load_state_restores_exact_tensors(tmp_path):
    original = training_state(seed=0)
    train_steps(*original, steps=5)
    path = checkpoint.step_path(tmp_path / "checkpoints", 5)
    meta = {"format": checkpoint.FORMAT, "epoch": 1, "global_step": 5}
    model, optimizer, scheduler = original
    checkpoint.all_save_state(
        path, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "distmnist": meta}
    )
    assert path.is_file() and path.name == "step=00000005.ckpt"

    restored = training_state(seed=1)  # other weights, no momentum, schedule at step 0
    assert not torch.equal(restored[0].linear_relu_stack[0].weight, model.linear_relu_stack[0].weight)
    state = {"model": restored[0], "optimizer": restored[1], "scheduler": restored[2]}
    rest = checkpoint.all_load_state(checkpoint.read(path), state)
    assert rest == {"distmnist": meta}
    assert restored[1].state, "momentum buffers were not restored"
    assert_same_state(original, restored)

    # and training goes on identically from both
    train_steps(*original, steps=3, seed=42)
    train_steps(*restored, steps=3, seed=42)
    assert_same_state(original, restored)


def test_save_state_stores_state_dicts_not_objects(tmp_path):
    model, optimizer, scheduler = training_state(seed=0)
    path = tmp_path / "c.ckpt"
    checkpoint.all_save_state(path, {"model": model, "optimizer": optimizer, "step": 3})
    obj = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert set(obj) == {"model", "optimizer", "step"}
    assert obj["step"] == 3
    assert set(obj["model"]) == set(model.state_dict())
    assert set(obj["optimizer"]) == {"state", "param_groups"}


# ------------------------------------------------------------------------------------------ damaged files
def good_checkpoint(path, step: int = 1):
    model = build_model([16], seed=step)
    checkpoint.all_save_state(path, {"model": model, "distmnist": {"global_step": step}})
    return path


def test_read_valid_checkpoint(tmp_path):
    obj = checkpoint.read(good_checkpoint(tmp_path / "c.ckpt", 4))
    assert obj["distmnist"] == {"global_step": 4}


def test_read_truncated_checkpoint(tmp_path):
    path = good_checkpoint(tmp_path / "c.ckpt")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DistMnistError) as info:
        checkpoint.read(path)
    assert "c.ckpt" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage" * 100, bytes(range(256)) * 10, b"PK\x03\x04broken zip"],
    ids=["empty", "text", "bytes", "fake-zip"],
)
def test_read_garbage(tmp_path, content):
    path = tmp_path / "c.ckpt"
    path.write_bytes(content)
    with pytest.raises(DistMnistError) as info:
        checkpoint.read(path)
    assert "c.ckpt" in str(info.value)


def test_read_non_dict_and_missing(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(DistMnistError, match="list.ckpt"):
        checkpoint.read(tmp_path / "list.ckpt")
    with pytest.raises(DistMnistError, match="absent.ckpt"):
        checkpoint.read(tmp_path / "absent.ckpt")


# --------------------------------------------------------------------------------- listing / prune / resume
def test_listing_orders_by_step_newest_first(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (5, 100, 20, 7):
        good_checkpoint(checkpoint.step_path(d, step), step)
    (d / "step=9.ckpt").write_bytes(b"x")  # unpadded names are ordered by number, not text
    (d / "step=10.ckpt").write_bytes(b"x")
    (d / "notes.txt").write_text("ignored")
    (d / ".step=00000200.ckpt.abc.tmp").write_bytes(b"x")  # a writer's temporary file
    (d / "last.ckpt").write_bytes(b"x")
    steps = [int(p.name.split("=")[1].split(".")[0]) for p in checkpoint.listing(d)]
    assert steps == [100, 20, 10, 9, 7, 5]
    assert checkpoint.listing(tmp_path / "no-such-dir") == []


@pytest.mark.parametrize("keep", [1, 2, 3, 10])
def test_prune_keeps_the_newest(tmp_path, keep):
    d = tmp_path / "checkpoints"
    steps = [1, 2, 3, 10, 11]
    for step in steps:
        good_checkpoint(checkpoint.step_path(d, step), step)
    (d / "other.txt").write_text("kept")
    checkpoint.prune(d, keep)
    kept = sorted(steps, reverse=True)[:keep]
    assert checkpoint.listing(d) == [checkpoint.step_path(d, s) for s in kept]
    assert (d / "other.txt").is_file()


def test_newest_good_skips_a_damaged_newest(tmp_path, capsys):
    d = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        good_checkpoint(checkpoint.step_path(d, step), step)
    newest = checkpoint.step_path(d, 30)
    raw = newest.read_bytes()
    newest.write_bytes(raw[: len(raw) // 2])
    checked = []
    found = checkpoint.newest_good(d, lambda obj, path: checked.append(path))
    assert found is not None
    path, obj = found
    assert path == checkpoint.step_path(d, 20)
    assert obj["distmnist"]["global_step"] == 20
    assert checked == [path]  # the check ran on the file that was chosen only
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1
    assert "warning" in err[0] and newest.name in err[0]


def test_newest_good_none_and_all_damaged(tmp_path, capsys):
    """No checkpoint: start from scratch. Checkpoints of which none loads: refused, never a silent restart."""
    d = tmp_path / "checkpoints"
    assert checkpoint.newest_good(d, lambda obj, path: None) is None
    d.mkdir()
    assert checkpoint.newest_good(d, lambda obj, path: None) is None
    (d / "step=00000001.ckpt").write_bytes(b"junk")
    (d / "step=00000002.ckpt").write_bytes(b"")
    with pytest.raises(DistMnistError, match=r"no checkpoint .* loads: .*step=00000002.ckpt.*1 more.*move them out"):
        checkpoint.newest_good(d, lambda obj, path: None)
    assert not capsys.readouterr().err.strip()  # the refusal is the one line: no warnings before it


class Payload:
    """What a hostile checkpoint pickles: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_pickles_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = checkpoint.step_path(tmp_path, 99999999)
    torch.save({"distmnist": {"format": checkpoint.FORMAT}, "model": Payload(marker)}, path)
    with pytest.raises(DistMnistError, match="pickles objects other than tensors") as err:
        checkpoint.read(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does what it says: plain unpickling runs it
    assert marker.exists()


def test_prune_keeps_the_checkpoint_just_written_over_a_newer_damaged_one(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "step=99999999.ckpt").parent.mkdir()
    (d / "step=99999999.ckpt").write_bytes(b"damaged: did not load at start")
    for step in (10, 20):
        good_checkpoint(checkpoint.step_path(d, step), step)
    checkpoint.prune(d, keep=1, newest_step=20)
    assert [p.name for p in checkpoint.listing(d)] == ["step=99999999.ckpt", "step=00000020.ckpt"]


def test_newest_good_stops_on_a_foreign_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (1, 2):
        good_checkpoint(checkpoint.step_path(d, step), step)

    def check(obj, path):
        raise DistMnistError(f"{path} belongs to another run")

    with pytest.raises(DistMnistError, match="step=00000002"):
        checkpoint.newest_good(d, check)


# ------------------------------------------------------------------------------------ the training position
def test_train_state_is_its_own_typed_entry_and_reads_the_old_flat_record():
    state = TrainState(epoch=1, step_in_epoch=16, global_step=80, epoch_train_s=0.5, elapsed_s=3.0,
                       tally=TallySums(loss_sum=12.5, correct=300.0, count=512.0))
    record = {"format": checkpoint.FORMAT, "global_batch": 32, "history": [], "train_state": state.state_dict()}
    assert torch.load(_saved(record), weights_only=True) == record  # plain types: the safe reader takes it
    assert TrainState.from_checkpoint(record) == state
    assert TrainState.from_checkpoint(old_record(record)) == state
    assert TrainState.from_checkpoint(record).tally.mean_loss == 12.5 / 512
    state.next_epoch()
    assert state.tally is None and TrainState.from_checkpoint({"train_state": state.state_dict()}) == state


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
