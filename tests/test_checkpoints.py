"""Checkpoint loading on synthetic state dicts: prefixes, containers, heads, no partial loads; atomic writes."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from bissl_fast.train.checkpoints import (
    HEAD_PREFIXES,
    load_weights,
    read_checkpoint,
    save_atomic,
)
from bissl_fast.train.heads import projector


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))


def _equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,                                                                           # plain / the paper's backbone file
    lambda sd: {f"module.{k}": v for k, v in sd.items()},                                    # DDP
    lambda sd: {"state_dict": {f"backbone.{k}": v for k, v in sd.items()} | {"projection_head.0.weight": torch.zeros(2)}},  # lightly
    lambda sd: {"epoch": 3, "state_dict": {f"backbone.{k}": v for k, v in sd.items()} | {"projector.0.weight": torch.zeros(2),
                                                                                         "classifier.weight": torch.zeros(2)}},  # solo-learn
    lambda sd: {"model": {f"module.encoder.{k}": v for k, v in sd.items()}},
    lambda sd: sd | {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)},          # torchvision with its classifier
])
def test_prefixes_and_containers(tmp_path, wrap):
    source, dest = _backbone(0), _backbone(1)
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(source.state_dict()), path)
    report = load_weights(dest, path, allow_unexpected=HEAD_PREFIXES + ("projection_head.",))
    assert _equal(source, dest)
    assert sorted(report.loaded) == sorted(dest.state_dict())
    assert all(k.startswith(("fc.", "projector.", "classifier.", "projection_head.")) for k in report.ignored)


def test_no_silent_partial_load():
    source, dest = _backbone(0), _backbone(1)
    before = {k: v.clone() for k, v in dest.state_dict().items()}
    sd = source.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("3.")}
    with pytest.raises(ValueError, match=r"does not fit the Sequential: 2 of 9 keys missing .*first: '3.weight'"):
        load_weights(dest, partial)
    wrong = dict(sd)
    wrong["3.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(5, 4\), the module \(3, 4\)"):
        load_weights(dest, wrong)
    with pytest.raises(ValueError, match=r"1 keys that fit nothing .*'fc.weight'.*allow_unexpected"):
        load_weights(dest, sd | {"fc.weight": torch.zeros(1)})
    for k, v in dest.state_dict().items():
        assert torch.equal(v, before[k]), k
    report = load_weights(dest, sd | {"fc.weight": torch.zeros(1)}, allow_unexpected=("fc.",))
    assert report.ignored == ["fc.weight"] and "ignored 1" in report.summary()


def test_paper_head_file_needs_an_explicit_prefix():
    head, pred = projector(8, (6, 4)), projector(4, (6, 4))
    state = {f"projector.{k}": v for k, v in head.state_dict().items()} | {f"predictor.{k}": v for k, v in pred.state_dict().items()}
    with pytest.raises(ValueError, match=r"fit the module under both .*pass prefix"):
        load_weights(projector(4, (6, 4)), state)  # the predictor's shapes: both prefixes fit
    fresh = projector(8, (6, 4))
    load_weights(fresh, state, prefix="projector.", allow_unexpected=("predictor.",))
    assert _equal(fresh, head)


def test_unreadable_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match="no state dict of tensors"):
        read_checkpoint({"epoch": 1})


def test_save_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"a": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_atomic({"a": torch.zeros(2), "b": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]
