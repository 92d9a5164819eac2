"""Checkpoint loading on synthetic state dicts: prefixes, positional layouts, containers, heads, misfit messages, no
partial loads; atomic writes. Files written by torchvision / timm / lightly themselves: test_integration_checkpoints.py."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from bissl_fast.train.checkpoints import (
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
    report = load_weights(dest, path)
    assert _equal(source, dest)
    assert sorted(report.loaded) == sorted(dest.state_dict())
    assert all(k.startswith(("fc.", "projector.", "classifier.", "projection_head.")) for k in report.ignored)


class _Named(nn.Module):
    """A backbone with named children, as torchvision / timm build them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.fc = nn.Identity()


def test_positional_sequential_of_children_maps_to_names():
    """lightly's ``nn.Sequential(*model.children()[:-1])`` backbone: ``backbone.3.1.weight`` is ``layer1.1.weight``."""
    source = _Named()
    sequential = nn.Sequential(*list(source.children())[:-1])
    state = {f"backbone.{k}": v for k, v in sequential.state_dict().items()}
    state |= {"projection_head.layers.0.weight": torch.zeros(3, 4)}
    dest = _Named()
    report = load_weights(dest, state)
    assert _equal(source, dest) and report.prefix == "backbone." and report.by_position
    assert report.ignored == ["projection_head.layers.0.weight"]
    assert "children by position" in report.summary() and "projection_head.* (1)" in report.summary()


def test_prefix_choice_is_deterministic_and_prefers_the_online_network():
    """BYOL files hold the backbone twice: the online one wins over its momentum copy, in any key order."""
    online, momentum = _backbone(0), _backbone(1)
    for momentum_prefix in ("backbone_momentum.", "momentum_backbone.", "target_encoder.", "ema."):
        items = [(f"backbone.{k}", v) for k, v in online.state_dict().items()]
        items += [(f"{momentum_prefix}{k}", v) for k, v in momentum.state_dict().items()]
        for order in (items, items[::-1]):
            dest = _backbone(2)
            report = load_weights(dest, dict(order), ignore=(momentum_prefix,))
            assert report.prefix == "backbone." and _equal(dest, online), momentum_prefix
    # An explicit prefix picks the momentum copy.
    dest = _backbone(2)
    load_weights(dest, dict(items), prefix="ema.", ignore=("backbone.",))
    assert _equal(dest, momentum)


def test_no_silent_partial_load():
    source, dest = _backbone(0), _backbone(1)
    before = {k: v.clone() for k, v in dest.state_dict().items()}
    sd = source.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("3.")}
    with pytest.raises(ValueError, match=r"does not fit the Sequential \(read under prefix ''\): 2 of the Sequential's 9 "
                                         r"tensors are not in it \(3.weight \(3, 4\); 3.bias \(3,\)\); it holds another"):
        load_weights(dest, partial)
    wrong = dict(sd)
    wrong["3.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"1 tensors differ in shape \(3.weight \(5, 4\) vs the module's 3.weight \(3, 4\)\)"):
        load_weights(dest, wrong)
    with pytest.raises(ValueError, match=r"1 checkpoint tensors fit nothing \(aux.weight \(1,\)\); if they belong to a head "
                                         r"or another network, add their key prefixes to ignore=.*--pretext-checkpoint-ignore"):
        load_weights(dest, sd | {"aux.weight": torch.zeros(1)})
    # Extra tensors inside the module's own layers: another (deeper) architecture, not a head.
    with pytest.raises(ValueError, match=r"1 checkpoint tensors fit nothing \(1.extra \(4,\)\); it holds another architecture"):
        load_weights(dest, sd | {"1.extra": torch.zeros(4)})
    for k, v in dest.state_dict().items():
        assert torch.equal(v, before[k]), k
    report = load_weights(dest, sd | {"aux.weight": torch.zeros(1)}, ignore=("aux.",))
    assert report.ignored == ["aux.weight"] and "ignored 1 checkpoint keys: aux.* (1)" in report.summary()
    with pytest.raises(ValueError, match=r"1 checkpoint tensors fit nothing \(fc.weight"):
        load_weights(dest, sd | {"fc.weight": torch.zeros(1)}, ignore=())


def test_a_file_of_nothing_that_fits_shows_both_key_sets():
    with pytest.raises(ValueError, match=r"no tensor fits: checkpoint keys start \['a.b.c'\], the module's \['0.weight'"):
        load_weights(_backbone(), {"a.b.c": torch.zeros(1)})


def test_paper_head_file_by_shape_or_explicit_prefix():
    """Prefixes are scored by tensors that fit in name and shape; two complete fits of the same kind raise."""
    head, pred = projector(8, (6, 4)), projector(4, (6, 4))
    state = {f"projector.{k}": v for k, v in head.state_dict().items()} | {f"predictor.{k}": v for k, v in pred.state_dict().items()}
    fresh = projector(8, (6, 4))
    assert load_weights(fresh, state).prefix == "projector." and _equal(fresh, head)  # only the projector's shapes fit
    square = {f"projector.{k}": v for k, v in pred.state_dict().items()} | {f"predictor.{k}": v for k, v in pred.state_dict().items()}
    with pytest.raises(ValueError, match=r"fit the module under both 'predictor.' and 'projector.'; pass prefix"):
        load_weights(projector(4, (6, 4)), square)
    fresh = projector(4, (6, 4))
    load_weights(fresh, square, prefix="projector.", ignore=("predictor.",))
    assert _equal(fresh, pred)


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
