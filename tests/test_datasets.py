"""Disk datasets (image folders, CIFAR-10 pickles) and make_loader, on small data written to tmp."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from helpers import write_cifar10 as _write_cifar
from helpers import write_image_folder as _write_folder

from bissl_fast.data.augment import simclr_augment
from bissl_fast.data.datasets import CIFAR10Dataset, ImageFolderDataset, make_loader

try:
    from PIL import Image
except ImportError:  # pillow is an optional extra: the image-folder tests need it, the rest do not
    Image = None

needs_pillow = pytest.mark.skipif(Image is None, reason="needs Pillow (pip install pillow)")


# --------------------------------------------------------------------------------------------
# ImageFolderDataset
# --------------------------------------------------------------------------------------------


@needs_pillow
def test_image_folder_decodes_lazily_to_uint8_at_a_fixed_size(tmp_path):
    written = _write_folder(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1, 1]
    for index, (path, label) in enumerate(ds.samples):
        image, got_label = ds[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and got_label == label
        ref = np.asarray(Image.fromarray(written[path]).resize((16, 16), Image.BILINEAR))
        assert torch.equal(image, torch.from_numpy(ref.copy()).permute(2, 0, 1))
    # Already 16x16: the pixels come back unchanged.
    assert torch.equal(ds[2][0], torch.from_numpy(written[ds.samples[2][0]]).permute(2, 0, 1))
    # Decoding is lazy: deleting a file after the scan only fails when that item is read.
    os.remove(ds.samples[0][0])
    assert ds[1][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="cannot read image"):
        ds[0]


@needs_pillow
def test_image_folder_gray_rectangular_and_center_crop(tmp_path):
    written = _write_folder(tmp_path, shapes=((20, 10),), classes=("a",))
    path = next(iter(written))
    gray = ImageFolderDataset(tmp_path, (6, 4), channels=1)
    assert gray[0][0].shape == (1, 6, 4)
    ref_gray = np.asarray(Image.fromarray(written[path]).convert("L").resize((4, 6), Image.BILINEAR))
    assert torch.equal(gray[0][0][0], torch.from_numpy(ref_gray.copy()))
    crop = ImageFolderDataset(tmp_path, 8, resize="center_crop")
    # 20x10 (HxW) -> shorter side 10 scaled to 8: 16x8, then the central 8x8 rows 4..12.
    scaled = np.asarray(Image.fromarray(written[path]).resize((8, 16), Image.BILINEAR))
    assert torch.equal(crop[0][0], torch.from_numpy(scaled[4:12].copy()).permute(2, 0, 1))


@needs_pillow
def test_image_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "empty").rmdir()
    _write_folder(tmp_path, shapes=((8, 8),), classes=("a",))
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, 8, channels=2)
    with pytest.raises(ValueError, match="resize"):
        ImageFolderDataset(tmp_path, 8, resize="pad")
    with pytest.raises(ValueError, match="size"):
        ImageFolderDataset(tmp_path, 0)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolderDataset(tmp_path, 8)
    with pytest.raises(ValueError, match="broken.png"):
        ds[0]
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        ImageFolderDataset(tmp_path, 8)


# --------------------------------------------------------------------------------------------
# CIFAR10Dataset
# --------------------------------------------------------------------------------------------


def test_cifar10_dataset_reads_the_pickles(tmp_path):
    written = _write_cifar(str(tmp_path))
    train = CIFAR10Dataset(tmp_path, train=True)
    assert len(train) == 30 and train.classes == [f"c{i}" for i in range(10)]
    data, labels = written["data_batch_2"]
    image, label = train[6 + 1]  # second image of the second batch
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == labels[1]
    assert torch.equal(image, torch.from_numpy(data[1].reshape(3, 32, 32)))
    image[:] = 0  # items are copies: the dataset is not changed through them
    assert torch.equal(train[7][0], torch.from_numpy(data[1].reshape(3, 32, 32)))
    test = CIFAR10Dataset(tmp_path / "cifar-10-batches-py", train=False)
    assert len(test) == 6 and test.targets == written["test_batch"][1]


def test_cifar10_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CIFAR10Dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFAR10Dataset(tmp_path)
    _write_cifar(str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"junk")
    with pytest.raises(ValueError, match="test_batch"):
        CIFAR10Dataset(tmp_path, train=False)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, f)
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        CIFAR10Dataset(tmp_path, train=True)


# --------------------------------------------------------------------------------------------
# make_loader
# --------------------------------------------------------------------------------------------


def _epoch_labels(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def _indexed(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n))


def test_loader_batches_and_seeded_shuffle(tmp_path):
    _write_cifar(str(tmp_path))
    loader = make_loader(CIFAR10Dataset(tmp_path), 8, shuffle=True, seed=3, drop_last=True)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32) and y.dtype == torch.int64 and y.shape == (8,)
    assert len(loader) == 3 and loader.pin_memory == torch.cuda.is_available()

    ds = _indexed(20)
    first = make_loader(ds, 6, shuffle=True, seed=3, drop_last=False)
    epoch1, epoch2 = _epoch_labels(first), _epoch_labels(first)
    assert sorted(epoch1) == sorted(epoch2) == list(range(20))
    assert epoch1 != epoch2 and epoch1 != list(range(20))
    again = make_loader(ds, 6, shuffle=True, seed=3, drop_last=False)
    assert _epoch_labels(again) == epoch1 and _epoch_labels(again) == epoch2
    assert _epoch_labels(make_loader(ds, 6, shuffle=True, seed=4, drop_last=False)) != epoch1
    assert _epoch_labels(make_loader(ds, 6, shuffle=False, drop_last=True)) == list(range(18))


@needs_pillow
def test_loader_with_two_workers_gives_the_same_batches(tmp_path):
    _write_folder(tmp_path, shapes=((12, 10),) * 5, classes=("a", "b", "c"))
    ds = ImageFolderDataset(tmp_path, 12)
    serial = make_loader(ds, 4, shuffle=True, seed=7, drop_last=False)
    parallel = make_loader(ds, 4, shuffle=True, seed=7, workers=2, drop_last=False)
    assert parallel.num_workers == 2
    for _ in range(2):  # the second pass too: the order depends on the seed and the pass, not on workers
        batches = list(serial)
        others = list(parallel)
        assert len(batches) == len(others) == 4
        for (xa, ya), (xb, yb) in zip(batches, others):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_restoring_the_generator_replays_a_pass(workers):
    # What a resumed run does: restore the loader's generator, iterate again.
    loader = make_loader(_indexed(14), 4, shuffle=True, seed=1, workers=workers, drop_last=False)
    _epoch_labels(loader)
    state = loader.generator.get_state()
    second = _epoch_labels(loader)
    fresh = make_loader(_indexed(14), 4, shuffle=True, seed=1, workers=workers, drop_last=False)
    fresh.generator.set_state(state)
    assert _epoch_labels(fresh) == second


def test_distributed_sampler_shards_and_reshuffles_on_set_epoch():
    ds = _indexed(21)
    loaders = [
        make_loader(ds, 4, shuffle=True, seed=5, drop_last=False, distributed=True, num_replicas=2, rank=r) for r in range(2)
    ]
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)
    orders = [_epoch_labels(loader) for loader in loaders]
    # 21 samples over 2 ranks: 11 each, the tail padded with one repeat.
    assert [len(o) for o in orders] == [11, 11] and set(orders[0]) | set(orders[1]) == set(range(21))
    assert _epoch_labels(loaders[0]) == orders[0]  # same epoch, same order
    for loader in loaders:
        loader.sampler.set_epoch(1)
    reshuffled = [_epoch_labels(loader) for loader in loaders]
    assert reshuffled[0] != orders[0] and set(reshuffled[0]) | set(reshuffled[1]) == set(range(21))
    dropped = make_loader(ds, 4, shuffle=False, drop_last=True, distributed=True, num_replicas=2, rank=1)
    assert _epoch_labels(dropped) == [1, 3, 5, 7, 9, 11, 13, 15]


def test_distributed_is_automatic_under_an_initialized_process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    assert not dist.is_initialized(), "another test left a torch.distributed process group initialized"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = make_loader(_indexed(10), 5, shuffle=True, seed=0, drop_last=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 1
        assert sorted(_epoch_labels(loader)) == list(range(10))
    finally:
        dist.destroy_process_group()
    assert not isinstance(make_loader(_indexed(10), 5, shuffle=True, seed=0, drop_last=True).sampler, DistributedSampler)


def test_loader_feeds_the_device_augmentation(tmp_path):
    _write_cifar(str(tmp_path))
    loader = make_loader(CIFAR10Dataset(tmp_path), 6, shuffle=True, seed=0, drop_last=True)
    aug = simclr_augment(16)
    x, _ = next(iter(loader))
    views = aug.views(x.to("cpu", non_blocking=True), 2, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(6, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 and float(v.min()) >= 0 and float(v.max()) <= 1 for v in views)


def test_loader_errors(tmp_path):
    ds = _indexed(10)
    with pytest.raises(TypeError, match="map-style"):
        make_loader([1, 2, 3], 2, shuffle=True, drop_last=False)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, shuffle=True, drop_last=False)
    with pytest.raises(ValueError, match="workers"):
        make_loader(ds, 2, shuffle=True, workers=-1, drop_last=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(ds, 11, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(ds, 6, shuffle=True, drop_last=True, distributed=True, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="empty"):
        make_loader(_indexed(0), 2, shuffle=True, drop_last=False)
    with pytest.raises(TypeError, match="shuffle"):
        make_loader(ds, 2, shuffle=1, drop_last=False)
    with pytest.raises(ValueError, match="process group"):
        make_loader(ds, 2, shuffle=True, drop_last=False, distributed=True)
    with pytest.raises(ValueError, match="only used with distributed"):
        make_loader(ds, 2, shuffle=True, drop_last=False, rank=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            make_loader(ds, 2, shuffle=True, drop_last=False, pin_memory=True)
