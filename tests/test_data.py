"""core/data/: DistributedSampler-exact order, both loaders alike, exact evaluation shards, IDX files, prepare."""

from __future__ import annotations

import gzip
import math
import shutil
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from distmnist.core import data
from distmnist.core.config import Batching, DataConfig, load_config
from distmnist.core.data import RAW_FILES
from distmnist.core.dist import DistEnv
from distmnist.core.errors import DistMnistError

FASHION = Path("/usr/share/datasets/fashion-mnist")
RAW_NAMES = RAW_FILES  # the four standard IDX file names
needs_fashion = pytest.mark.skipif(
    not all((FASHION / f"{n}.gz").is_file() for n in RAW_NAMES),
    reason="Fashion-MNIST files of Debian's dataset-fashion-mnist are not installed",
)


def synthetic_cfg(*overrides: str):
    return load_config(None, ["data.name=synthetic", "train.accelerator=cpu", *overrides])


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(a, b, strict=True)):
        assert xa.dtype == xb.dtype == torch.float32, i
        assert ya.dtype == yb.dtype, i
        assert torch.equal(xa, xb), f"images of batch {i} differ"
        assert torch.equal(ya, yb), f"labels of batch {i} differ"


def sampler_indices(n, world, rank, seed, epoch) -> list[int]:
    s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    s.set_epoch(epoch)
    return list(s)


# ------------------------------------------------------------------------------------------------ order
@pytest.mark.parametrize(
    "n, world",
    [
        (1, 1),
        (10, 1),
        (10, 2),
        (11, 2),
        (17, 4),
        (100, 3),
        (101, 7),
        (1000, 8),
        (6000, 3),
        (3, 7),
        (1, 4),
        (2, 8),
        (5, 8),
        (7, 7),
        (9, 4),
    ],
)
@pytest.mark.parametrize("seed", [0, 12345])
def test_shard_indices_equal_distributed_sampler(n, world, seed):
    for rank in range(world):
        for epoch in (0, 1, 5):
            got = data.shard_indices(n, world, rank, seed, epoch)
            assert got.tolist() == sampler_indices(n, world, rank, seed, epoch), (n, world, rank, epoch)
            assert len(got) == math.ceil(n / world)


def test_shard_order_changes_with_epoch_and_seed():
    e0 = data.shard_indices(1000, 1, 0, seed=0, epoch=0)
    assert not torch.equal(e0, data.shard_indices(1000, 1, 0, seed=0, epoch=1))
    assert not torch.equal(e0, data.shard_indices(1000, 1, 0, seed=1, epoch=0))
    assert sorted(e0.tolist()) == list(range(1000))


def test_epoch_order_is_sampler_like():
    order = data.EpochOrder(103, Batching(batch_size=8, accumulate=1, world_size=4, fixed=False), 2, seed=7)
    order.set_epoch(3)
    assert list(order) == sampler_indices(103, 4, 2, 7, 3)
    assert len(order) == len(sampler_indices(103, 4, 2, 7, 3))


# ------------------------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("world, rank", [(1, 0), (3, 0), (3, 2), (4, 1)])
def test_resident_and_dataloader_yield_the_same_batches(world, rank):
    env = DistEnv(rank=rank, world_size=world)
    common = ["data.train_samples=1000", "data.batch_size=64", "seed=3"]
    resident = data.train_batches(synthetic_cfg(*common, "data.loader=resident"), env)
    loader = data.train_batches(synthetic_cfg(*common, "data.loader=dataloader", "data.num_workers=0"), env)
    assert isinstance(resident, data.ResidentBatches)
    assert isinstance(loader, data.LoaderBatches)
    images, labels = data.synthetic_split(True, 1000)
    for epoch in (0, 2):
        resident.set_epoch(epoch)
        loader.set_epoch(epoch)
        a, b = batches_of(resident), batches_of(loader)
        assert_same_batches(a, b)
        # and both are the DistributedSampler order of the synthetic set
        idx = torch.tensor(sampler_indices(1000, world, rank, 3, epoch))
        assert torch.equal(torch.cat([x for x, _ in a]), data.to_float(images[idx]))
        assert torch.equal(torch.cat([y for _, y in a]), labels[idx])
        assert [x.shape[0] for x, _ in a][:-1] == [64] * (len(a) - 1)
        assert a[0][0].shape[1:] == (1, 28, 28)


def test_dataloader_with_workers_yields_the_same_batches():
    env = DistEnv(rank=1, world_size=3)
    common = ["data.train_samples=700", "data.batch_size=50", "seed=9"]
    resident = data.train_batches(synthetic_cfg(*common, "data.loader=resident"), env)
    loader = data.train_batches(synthetic_cfg(*common, "data.loader=dataloader", "data.num_workers=2"), env)
    try:
        for epoch in (0, 1):
            resident.set_epoch(epoch)
            loader.set_epoch(epoch)
            assert_same_batches(batches_of(resident), batches_of(loader))
        resident.set_epoch(1)
        loader.set_epoch(1)
        resident.skip(3)
        loader.skip(3)
        assert_same_batches(batches_of(resident), batches_of(loader))
    finally:
        del loader  # shut down the persistent workers


@pytest.mark.parametrize("loader", ["resident", "dataloader"])
@pytest.mark.parametrize("n, world", [(1000, 1), (1000, 3), (1001, 4), (5, 8)])
def test_union_of_ranks_is_the_padded_permutation(loader, n, world):
    cfg = synthetic_cfg("data.batch_size=32", "seed=5", f"data.loader={loader}", "data.num_workers=0")
    images = data.synthetic_split(True, n)[0]
    ids = torch.arange(n)  # labels = sample index: the batches say which samples they hold
    epoch = 4
    per_rank = []
    for rank in range(world):
        b = data.train_batches(cfg, DistEnv(rank=rank, world_size=world), split=(images, ids))
        b.set_epoch(epoch)
        per_rank.append(torch.cat([y for _, y in b]))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch))
    total = math.ceil(n / world) * world
    padded = torch.cat([perm] * math.ceil(total / n))[:total]
    for rank in range(world):
        assert torch.equal(per_rank[rank], padded[rank::world])
    union = torch.cat(per_rank)
    assert sorted(union.tolist()) == sorted(padded.tolist())
    assert set(union.tolist()) == set(range(n))  # every sample seen in the epoch
    assert len(union) - n == total - n  # only the padding repeats


@pytest.mark.parametrize("loader", ["resident", "dataloader"])
@pytest.mark.parametrize("k", [0, 1, 5, 31])
def test_skip_starts_k_batches_later_once(loader, k):
    cfg = synthetic_cfg(
        "data.train_samples=1000", "data.batch_size=32", f"data.loader={loader}", "data.num_workers=0"
    )
    b = data.train_batches(cfg, DistEnv(rank=1, world_size=2))
    b.set_epoch(2)
    full = batches_of(b)
    assert len(full) == 16
    b.set_epoch(2)
    b.skip(k)
    assert_same_batches(batches_of(b), full[k:])
    # the skip applies to one pass only
    assert_same_batches(batches_of(b), full)


def test_skip_gives_the_same_tail_in_both_loaders():
    env = DistEnv(rank=0, world_size=3)
    common = ["data.train_samples=999", "data.batch_size=40", "seed=1", "data.num_workers=0"]
    r = data.train_batches(synthetic_cfg(*common, "data.loader=resident"), env)
    d = data.train_batches(synthetic_cfg(*common, "data.loader=dataloader"), env)
    for b in (r, d):
        b.set_epoch(7)
        b.skip(4)
    assert_same_batches(batches_of(r), batches_of(d))


@pytest.mark.parametrize("loader", ["resident", "dataloader"])
@pytest.mark.parametrize(
    "n, world, bs", [(1000, 1, 64), (1000, 3, 64), (2048, 4, 32), (10, 7, 3), (2500, 2, 1000)]
)
def test_steps_per_epoch_is_the_number_of_batches(loader, n, world, bs):
    cfg = synthetic_cfg(
        f"data.train_samples={n}", f"data.batch_size={bs}", f"data.loader={loader}", "data.num_workers=0"
    )
    for rank in {0, world - 1}:
        b = data.train_batches(cfg, DistEnv(rank=rank, world_size=world))
        steps = data.steps_per_epoch(cfg, world)
        assert len(b) == steps
        assert sum(1 for _ in b) == steps


def test_steps_per_epoch_full_synthetic_set():
    cfg = synthetic_cfg("data.batch_size=64")
    assert data.split_size(cfg.data, True) == 6000
    b = data.train_batches(cfg, DistEnv(rank=0, world_size=1))
    assert len(b) == data.steps_per_epoch(cfg, 1) == math.ceil(6000 / 64)


# ------------------------------------------------------------------ global batch, accumulation: step k's samples
def step_samples(n, b, seed, epoch):
    """Per optimizer step: the samples every rank's micro-batches take, as (rank, micro-batch) -> ids."""
    orders = [data.step_order(n, b, r, seed, epoch) for r in range(b.world_size)]
    steps = []
    for k in range(math.ceil(len(orders[0]) / b.step_batch)):
        chunk = {r: o[k * b.step_batch:(k + 1) * b.step_batch] for r, o in enumerate(orders)}
        steps.append({(r, m): part for r, c in chunk.items() for m, part in enumerate(c.tensor_split(b.accumulate))})
    return steps


@pytest.mark.parametrize("n", [2048, 1920, 77])
@pytest.mark.parametrize("world, bs, acc", [(2, 96, 1), (3, 64, 1), (1, 96, 2), (1, 48, 4), (6, 16, 2), (4, 24, 2)])
def test_step_k_takes_the_same_global_slice_at_any_world_size(n, world, bs, acc):
    """G = 192: optimizer step k consumes P[kG:(k+1)G] of the epoch's padded permutation, whatever W and A; and
    micro-batch m of rank r takes P[kG:(k+1)G][m*W + r :: W*A]."""
    g, seed, epoch = 192, 4, 3
    b = Batching(bs, acc, world, fixed=True)
    assert b.global_batch == g
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    steps = math.ceil(n / g)
    padded = torch.cat([perm] * math.ceil(steps * g / n))[: steps * g]
    got = step_samples(n, b, seed, epoch)
    assert len(got) == steps
    for k, parts in enumerate(got):
        want = padded[k * g:(k + 1) * g]
        for (r, m), ids in parts.items():
            assert torch.equal(ids, want[m * world + r::world * acc]), (k, r, m)
        assert sum(len(ids) for ids in parts.values()) == g


def test_accumulation_micro_batches_are_the_ranks_of_a_larger_world():
    """W=1 x accumulate 2 takes, micro-batch for micro-batch, what the two ranks of W=2 take (same order inside
    the batch): the arithmetic can be the same bit for bit."""
    one = step_samples(1000, Batching(96, 2, 1, fixed=True), 0, 1)
    two = step_samples(1000, Batching(96, 1, 2, fixed=True), 0, 1)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a[(0, 0)], b[(0, 0)]) and torch.equal(a[(0, 1)], b[(1, 0)])


@pytest.mark.parametrize("n, world, bs, acc", [(1000, 2, 32, 2), (999, 3, 10, 3), (64, 1, 8, 4)])
def test_without_a_global_batch_a_rank_still_takes_the_distributed_sampler_shard(n, world, bs, acc):
    b = Batching(bs, acc, world, fixed=False)
    for r in range(world):
        got = data.step_order(n, b, r, 2, 5)
        assert sorted(got.tolist()) == sorted(sampler_indices(n, world, r, 2, 5))
        # step by step the same samples as one batch of bs * acc would have
        want = torch.tensor(sampler_indices(n, world, r, 2, 5))
        for i in range(0, len(want), bs * acc):
            assert sorted(got[i:i + bs * acc].tolist()) == sorted(want[i:i + bs * acc].tolist())


@pytest.mark.parametrize("loader", ["resident", "dataloader"])
def test_global_batch_steps_per_epoch_and_micro_batches(loader):
    cfg = synthetic_cfg("data.train_samples=2048", "data.global_batch_size=192", "data.batch_size=48",
                        f"data.loader={loader}", "data.num_workers=0")
    b = data.train_batches(cfg, DistEnv(rank=1, world_size=2))
    assert len(b) == data.steps_per_epoch(cfg, 2) == math.ceil(2048 / 192) == sum(1 for _ in b)
    x, y = next(iter(b))
    assert x.shape[0] == 96
    micro = data.micro_batches(x, y, 2)
    assert [m[0].shape[0] for m in micro] == [48, 48]
    assert len(data.MicroBatches(b, 2)) == 2 * len(b) == sum(1 for _ in data.MicroBatches(b, 2))


# --------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("world", [1, 3, 7])
def test_eval_indices_count_each_sample_once(world):
    n = 10000
    parts = [data.eval_indices(n, world, r) for r in range(world)]
    union = torch.cat(parts)
    assert len(union) == n
    assert torch.equal(union.sort().values, torch.arange(n))


@pytest.mark.parametrize("world", [1, 3, 7])
def test_eval_batches_count_each_test_sample_once(world):
    cfg = synthetic_cfg("data.test_samples=10000", "data.eval_batch_size=1000")
    images, labels = data.load_split(cfg.data, train=False)
    assert len(labels) == 10000
    ids = torch.arange(10000)
    seen, counted = [], 0
    xs = torch.empty(10000, 1, 28, 28)
    for rank in range(world):
        env = DistEnv(rank=rank, world_size=world)
        batches = data.eval_batches(cfg, env)  # the real synthetic test set
        assert all(x.shape[0] <= 1000 for x, _ in batches)
        counted += sum(len(y) for _, y in batches)
        rank_ids = torch.cat([y for _, y in data.eval_batches(cfg, env, split=(images, ids))])
        seen.append(rank_ids)
        xs[rank_ids] = torch.cat([x for x, _ in batches])
        assert torch.equal(torch.cat([y for _, y in batches]), labels[rank_ids])
    assert counted == 10000
    union = torch.cat(seen)
    assert len(union) == 10000 and len(set(union.tolist())) == 10000  # no duplicates, nothing left out
    assert torch.equal(xs, data.to_float(images))


# ------------------------------------------------------------------------------------------ synthetic set
def test_synthetic_split_is_deterministic_and_has_all_classes():
    before = torch.get_rng_state()
    for train, n in ((True, 6000), (False, 1000)):
        a_img, a_lab = data.synthetic_split(train)
        b_img, b_lab = data.synthetic_split(train)
        assert a_img.dtype == torch.uint8 and a_img.shape == (n, 28, 28)
        assert a_lab.shape == (n,)
        assert a_img.numpy().tobytes() == b_img.numpy().tobytes()
        assert a_lab.numpy().tobytes() == b_lab.numpy().tobytes()
        assert sorted(set(a_lab.tolist())) == list(range(10))
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(data.synthetic_split(True, 1000)[0], data.synthetic_split(False, 1000)[0])


def test_synthetic_split_size_and_prefix():
    images, labels = data.synthetic_split(False, 10000)
    assert images.shape == (10000, 28, 28) and sorted(set(labels.tolist())) == list(range(10))
    cfg = synthetic_cfg("data.train_samples=123")
    assert data.load_split(cfg.data, True)[0].shape == (123, 28, 28)


# ----------------------------------------------------------------------------------------------- to_float
def test_to_float_is_bit_for_bit_to_tensor():
    from PIL import Image
    from torchvision import transforms

    images = torch.cat(
        [
            (torch.arange(784) % 256).to(torch.uint8).reshape(1, 28, 28),  # every byte value
            torch.full((1, 28, 28), 255, dtype=torch.uint8),
            data.synthetic_split(True, 30)[0],
        ]
    )
    out = data.to_float(images)
    assert out.dtype == torch.float32 and out.shape == (len(images), 1, 28, 28)
    to_tensor = transforms.ToTensor()
    for i, img in enumerate(images):
        expected = to_tensor(Image.fromarray(img.numpy()))
        assert expected.shape == (1, 28, 28)
        assert torch.equal(out[i].view(torch.int32), expected.view(torch.int32)), i


# ------------------------------------------------------------------------------------------------- IDX
def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def test_parse_idx_valid():
    rng = np.random.default_rng(0)
    for shape in [(5,), (3, 4), (7, 28, 28)]:
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        t = data.parse_idx(idx_bytes(arr))
        assert t.dtype == torch.uint8 and tuple(t.shape) == shape
        assert np.array_equal(t.numpy(), arr)


def test_read_idx_plain_and_gzipped(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    raw = idx_bytes(arr)
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        assert np.array_equal(data.read_idx(tmp_path / name).numpy(), arr)


GOOD = idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
BAD_IDX = {
    "empty": b"",
    "short header": b"\x00\x00",
    "header cut in its dims": GOOD[:9],
    "wrong magic": b"\x00\x00\x09\x03" + GOOD[4:],
    "nonzero first bytes": b"\x1f\x8b\x08\x03" + GOOD[4:],
    "zero dims": b"\x00\x00\x08\x00" + GOOD[4:],
    "truncated data": GOOD[:-1],
    "extra trailing bytes": GOOD + b"\x00",
    "text": b"this is not an IDX file at all\n",
}


@pytest.mark.parametrize("case", BAD_IDX)
def test_parse_idx_rejects(case):
    with pytest.raises(DistMnistError):
        data.parse_idx(BAD_IDX[case], source="some-idx3-ubyte")


@pytest.mark.parametrize("case", BAD_IDX)
def test_read_idx_rejects_names_the_file(tmp_path, case):
    for name, content in (
        ("bad-idx3-ubyte", BAD_IDX[case]),
        ("bad-idx3-ubyte.gz", gzip.compress(BAD_IDX[case])),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DistMnistError) as info:
            data.read_idx(path)
        assert name in str(info.value)


@pytest.mark.parametrize(
    "content",
    [GOOD, b"", b"not gzip at all, just text", gzip.compress(GOOD)[:12]],
    ids=["plain-idx", "empty", "text", "truncated-gzip"],
)
def test_read_idx_non_gzip_or_broken_gzip_named_gz(tmp_path, content):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DistMnistError) as info:
        data.read_idx(path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DistMnistError, match="nothing-here"):
        data.read_idx(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------------------ prepare
def tiny_files(folder: Path, skip: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in RAW_NAMES:
        if name != skip:
            arr = np.zeros((3, 28, 28) if "images" in name else (3,), dtype=np.uint8)
            (folder / name).write_bytes(idx_bytes(arr))


@pytest.mark.parametrize("missing", RAW_NAMES)
def test_prepare_names_a_missing_file(tmp_path, missing):
    tiny_files(tmp_path / "src", skip=missing)
    with pytest.raises(DistMnistError) as info:
        data.prepare("fashion-mnist", tmp_path / "src", tmp_path / "root")
    assert missing in str(info.value)
    assert not (tmp_path / "root" / "FashionMNIST" / "raw" / missing).exists()


def test_prepare_names_a_truncated_train_images_file(tmp_path):
    tiny_files(tmp_path / "src")
    path = tmp_path / "src" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DistMnistError) as info:
        data.prepare("fashion-mnist", tmp_path / "src", tmp_path / "root")
    assert "train-images-idx3-ubyte" in str(info.value)
    assert not (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_prepare_refuses_wrong_sizes_and_bad_arguments(tmp_path):
    tiny_files(tmp_path / "src")  # valid IDX files, but 3 samples instead of 60000/10000
    with pytest.raises(DistMnistError):
        data.prepare("fashion-mnist", tmp_path / "src", tmp_path / "root")
    with pytest.raises(DistMnistError, match="cifar"):
        data.prepare("cifar", tmp_path / "src", tmp_path / "root")
    with pytest.raises(DistMnistError, match="nowhere"):
        data.prepare("fashion-mnist", tmp_path / "nowhere", tmp_path / "root")


def check_prepared(root: Path, source_gz: Path = FASHION) -> None:
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_NAMES)  # uncompressed, no temp files left
    for name in RAW_NAMES:
        assert (raw / name).read_bytes() == gzip.decompress((source_gz / f"{name}.gz").read_bytes()), name
    cfg = DataConfig(name="fashion-mnist", root=str(root), download=False)
    for train, n in ((True, 60000), (False, 10000)):
        images, labels = data.load_split(cfg, train)
        assert images.dtype == torch.uint8 and tuple(images.shape) == (n, 28, 28)
        assert tuple(labels.shape) == (n,)
        assert sorted(set(labels.tolist())) == list(range(10))
        prefix = "train" if train else "t10k"
        assert torch.equal(images, data.read_idx(source_gz / f"{prefix}-images-idx3-ubyte.gz"))
        assert torch.equal(
            labels, data.read_idx(source_gz / f"{prefix}-labels-idx1-ubyte.gz").to(torch.int64)
        )


@pytest.fixture(scope="module")
def prepared_from_gz(tmp_path_factory):
    """prepare() run once on a copy of the real .gz files: (data.root, what prepare returned)."""
    folder = tmp_path_factory.mktemp("prepared")
    src = folder / "src"
    src.mkdir()
    for name in RAW_NAMES:
        shutil.copy(FASHION / f"{name}.gz", src)
    return folder / "root", data.prepare("fashion-mnist", src, folder / "root")


@pytest.mark.slow
@needs_fashion
def test_prepare_real_fashion_mnist_from_gz(prepared_from_gz):
    root, dest = prepared_from_gz
    assert Path(dest) == root / "FashionMNIST" / "raw"
    check_prepared(root)
    cut = DataConfig(name="fashion-mnist", root=str(root), train_samples=100, test_samples=50)
    assert data.load_split(cut, True)[0].shape == (100, 28, 28)
    assert data.load_split(cut, False)[0].shape == (50, 28, 28)


@pytest.mark.slow
@needs_fashion
def test_prepare_real_fashion_mnist_uncompressed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in RAW_NAMES:
        (src / name).write_bytes(gzip.decompress((FASHION / f"{name}.gz").read_bytes()))
    data.prepare("fashion-mnist", src, tmp_path / "root")
    check_prepared(tmp_path / "root")


@pytest.mark.slow
@needs_fashion
def test_prepared_files_are_readable_like_other_files(prepared_from_gz, tmp_path):
    """A shared data.root must be readable by the other users' jobs: no 0600 files from a temporary name."""
    raw = Path(prepared_from_gz[1])
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    usual = stat.S_IMODE(probe.stat().st_mode)
    for name in RAW_NAMES:
        assert oct(stat.S_IMODE((raw / name).stat().st_mode)) == oct(usual), name


@pytest.mark.slow
@needs_fashion
def test_prepare_real_fashion_mnist_truncated_train_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in RAW_NAMES[1:]:
        shutil.copy(FASHION / f"{name}.gz", src)
    full = gzip.decompress((FASHION / "train-images-idx3-ubyte.gz").read_bytes())
    (src / "train-images-idx3-ubyte").write_bytes(full[: len(full) // 2])
    with pytest.raises(DistMnistError) as info:
        data.prepare("fashion-mnist", src, tmp_path / "root")
    assert "train-images-idx3-ubyte" in str(info.value)
    assert not (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


@pytest.mark.slow
@needs_fashion
def test_load_split_names_a_damaged_prepared_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in RAW_NAMES:
        shutil.copy(FASHION / f"{name}.gz", src)
    raw = data.prepare("fashion-mnist", src, tmp_path / "root")
    images = Path(raw) / "train-images-idx3-ubyte"
    with open(images, "r+b") as f:
        f.truncate(images.stat().st_size // 2)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "root"), download=False)
    with pytest.raises(DistMnistError) as info:
        data.load_split(cfg, True)
    assert "train-images-idx3-ubyte" in str(info.value)
    (Path(raw) / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DistMnistError) as info:
        data.load_split(cfg, False)
    assert "t10k-labels-idx1-ubyte" in str(info.value)
