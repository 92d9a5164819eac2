"""Data readers (digits, CIFAR-10 pickles, image folders), augmentations and the resumable loader."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers import write_cifar10, write_image_folder

from bissl_fast.data.tensors import (
    BatchAugment,
    TensorLoader,
    load_cifar10,
    load_dataset,
    load_digits,
    load_imagefolder,
    stratified_split,
)


def test_digits_shapes_and_range():
    d = load_digits(size=None)
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == torch.float32
    assert d.y.shape == (1797,) and d.y.dtype == torch.int64
    assert d.num_classes == 10 and set(d.y.tolist()) == set(range(10))
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    up = load_digits(size=16)
    assert up.x.shape == (1797, 1, 16, 16)
    # Upsampling keeps the mean intensity of each image (bilinear, no clipping needed here).
    assert torch.allclose(up.x.mean(dim=(1, 2, 3)), d.x.mean(dim=(1, 2, 3)), atol=0.02)


def test_cifar10_reader(tmp_path):
    written = {name: data for name, (data, _) in write_cifar10(str(tmp_path), per_batch=4).items()}
    train = load_cifar10(tmp_path, train=True)
    assert train.x.shape == (20, 3, 32, 32) and train.y.shape == (20,)
    assert train.classes == [f"c{i}" for i in range(10)]
    # Pixel (channel 1, row 2, col 3) of the first image: CHW-ordered row of the pickle.
    assert float(train.x[0, 1, 2, 3]) == pytest.approx(written["data_batch_1"][0, 1024 + 2 * 32 + 3] / 255.0)
    test = load_cifar10(tmp_path / "cifar-10-batches-py", train=False, size=16)
    assert test.x.shape == (4, 3, 16, 16)
    assert load_dataset("cifar10", tmp_path).x.shape == (20, 3, 32, 32)


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path)
    write_cifar10(str(tmp_path), per_batch=4)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\[N, 3072\]"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="data root"):
        load_dataset("cifar10", None)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")


def test_imagefolder_reader(tmp_path):
    last = list(write_image_folder(tmp_path, shapes=((10, 12),) * 3).values())[-1]
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image")
    d = load_imagefolder(tmp_path)
    assert d.x.shape == (6, 3, 10, 12) and d.classes == ["cat", "dog"]
    assert d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(d.x[-1], torch.from_numpy(last.astype(np.float32) / 255.0).permute(2, 0, 1))
    gray = load_imagefolder(tmp_path, size=8, channels=1)
    assert gray.x.shape == (6, 1, 8, 8)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagefolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_imagefolder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        load_imagefolder(tmp_path)
    (tmp_path / "empty").rmdir()
    write_image_folder(tmp_path, shapes=((10, 12), (9, 12)), classes=("a",))
    with pytest.raises(ValueError, match="pass size"):
        load_imagefolder(tmp_path)
    assert load_imagefolder(tmp_path, size=6).x.shape == (2, 3, 6, 6)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        load_imagefolder(tmp_path, size=6)
    with pytest.raises(ValueError, match="channels"):
        load_imagefolder(tmp_path, channels=2)


def test_augment_identity_flip_and_randomness():
    x = torch.rand(5, 2, 9, 7)
    identity = BatchAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), translate=0.0, rotation=0.0, jitter=0.0, noise=0.0)
    assert torch.allclose(identity(x), x, atol=1e-5)
    flip = BatchAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), translate=0.0, rotation=0.0, flip=1.0, jitter=0.0, noise=0.0)
    assert torch.allclose(flip(x), x.flip(-1), atol=1e-5)
    aug = BatchAugment()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and bool(torch.isfinite(a).all())
    v1, v2 = aug.views(x, 2)
    assert not torch.allclose(v1, v2)
    with pytest.raises(ValueError, match="4-D"):
        aug(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        BatchAugment(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="rotation"):
        BatchAugment(rotation=-1.0)


def test_tensor_loader_shards_and_resumes():
    x = torch.arange(40, dtype=torch.float32).view(40, 1)
    y = torch.arange(40)
    full = TensorLoader(x, y, batch_size=8, seed=5)
    ranks = [TensorLoader(x, y, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(full) == len(ranks[0]) == 5
    for (xf, yf), (x0, _), (x1, _) in zip(full, *ranks):
        assert torch.equal(torch.cat([x0, x1]), xf)
        assert torch.equal(xf.view(-1).long(), yf)
    assert full.state_dict() == {"epoch": 1, "position": 0}
    # Interrupt the second epoch after two batches and resume in a new loader.
    it = iter(full)
    seen = [next(it)[1] for _ in range(2)]
    resumed = TensorLoader(x, y, batch_size=8, seed=5)
    resumed.load_state_dict(full.state_dict())
    rest = [b[1] for b in resumed]
    reference = [b[1] for b in TensorLoader(x, y, batch_size=8, seed=6)]  # epoch 1 of seed 5 == epoch 0 of seed 6
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, reference))
    assert not torch.equal(reference[0], next(iter(TensorLoader(x, y, batch_size=8, seed=5)))[1])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TensorLoader(x, y, batch_size=32, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(x, y, batch_size=4, rank=2, world_size=2)


def test_stratified_split():
    y = torch.arange(10).repeat(5)
    chosen, rest = stratified_split(y, 2, seed=0)
    assert chosen.numel() == 20 and rest.numel() == 30
    assert torch.bincount(y[chosen]).tolist() == [2] * 10
    assert set(chosen.tolist()).isdisjoint(rest.tolist())
    with pytest.raises(ValueError, match="per_class"):
        stratified_split(y, 5)
