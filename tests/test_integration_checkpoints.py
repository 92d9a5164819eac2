"""Pretext checkpoints written by the real packages load into ``build_backbone``'s models: lightly's SimCLR /
BYOL models (a ``Sequential`` of torchvision children, and torchvision-named), a Lightning checkpoint,
solo-learn's key layout, torchvision and timm ``state_dict()`` files, DDP's ``module.`` prefix; wrong
architectures are refused naming the layers and shapes. Random weights only (nothing downloaded)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from bissl_fast.train.backbones import build_backbone
from bissl_fast.train.checkpoints import load_weights
from helpers import free_port, import_or_skip

pytestmark = pytest.mark.integration


def _same_features(backbone: nn.Module, reference: nn.Module, size: int = 32) -> None:
    """``backbone`` computes ``reference``'s features, exactly (eval mode, one random batch)."""
    x = torch.randn(2, 3, size, size)
    backbone.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(backbone(x), reference(x).flatten(start_dim=1))


def _lightly_simclr(backbone: nn.Module, width: int) -> nn.Module:
    """lightly's SimCLR example model around ``backbone``."""
    heads = import_or_skip("lightly.models.modules.heads")

    class SimCLR(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = heads.SimCLRProjectionHead(width, width, 128)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    return SimCLR(backbone)


def _lightly_sequential_simclr():
    torchvision = import_or_skip("torchvision")
    resnet = torchvision.models.resnet18(weights=None)
    return _lightly_simclr(nn.Sequential(*list(resnet.children())[:-1]), 512)


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18", "torchvision:resnet18"])
def test_lightly_simclr_sequential_backbone(tmp_path, arch):
    """``nn.Sequential(*resnet.children()[:-1])``: positions 0..8 are conv1, bn1, relu, maxpool, layer1..4, avgpool."""
    import_or_skip("timm")
    model = _lightly_sequential_simclr()
    torch.save(model.state_dict(), tmp_path / "simclr.pt")
    backbone, width = build_backbone(arch)
    report = load_weights(backbone, tmp_path / "simclr.pt")
    assert width == 512 and report.prefix == "backbone." and report.by_position
    assert report.ignored and all(k.startswith("projection_head.") for k in report.ignored)
    _same_features(backbone, model.backbone)


def test_lightly_simclr_torchvision_named_backbone(tmp_path):
    torchvision = import_or_skip("torchvision")
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    model = _lightly_simclr(resnet, 512)
    torch.save(model.state_dict(), tmp_path / "simclr.pt")
    backbone, _ = build_backbone("torchvision:resnet18")
    report = load_weights(backbone, tmp_path / "simclr.pt")
    assert report.prefix == "backbone." and not report.by_position
    assert "projection_head.* (" in report.summary()
    _same_features(backbone, model.backbone)


def _lightly_byol():
    """lightly's BYOL example model, its momentum copies moved away from the online network."""
    import_or_skip("lightly")
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    torchvision = import_or_skip("torchvision")

    class BYOL(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(512, 1024, 256)
            self.prediction_head = BYOLPredictionHead(256, 1024, 256)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

    model = BYOL(nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1]))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    update_momentum(model.backbone, model.backbone_momentum, m=0.5)
    return model


def test_lightly_byol_loads_the_online_backbone_in_any_key_order(tmp_path):
    model = _lightly_byol()
    state = model.state_dict()
    for name, order in (("forward", list(state.items())), ("reversed", list(state.items())[::-1])):
        torch.save(dict(order), tmp_path / f"{name}.pt")
        backbone, _ = build_backbone("torchvision:resnet18")
        report = load_weights(backbone, tmp_path / f"{name}.pt")
        assert report.prefix == "backbone." and report.by_position, name
        assert {k.split(".")[0] for k in report.ignored} == {
            "backbone_momentum", "projection_head", "prediction_head", "projection_head_momentum"}
        _same_features(backbone, model.backbone)


def test_prefix_choice_does_not_depend_on_hash_seeds(tmp_path):
    """Two interpreters with different string hashes pick the same layout (it used to follow set order)."""
    torch.save(_lightly_byol().state_dict(), tmp_path / "byol.pt")
    script = ("import sys, torchvision, torch.nn as nn; from bissl_fast.train.checkpoints import load_weights; "
              "m = torchvision.models.resnet18(weights=None); m.fc = nn.Identity(); "
              "print(load_weights(m, sys.argv[1]).summary())")
    summaries = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "byol.pt")], env=env, check=True,
                             capture_output=True, text=True).stdout
        summaries.add(out.strip())
    assert len(summaries) == 1 and "(prefix 'backbone.', children by position)" in summaries.pop()


def test_lightning_checkpoint_of_a_lightly_model(tmp_path):
    """The ``{"state_dict": ..., "epoch": ..., ...}`` file that Lightning's Trainer writes for lightly's LightningModule example."""
    pl = import_or_skip("pytorch_lightning")
    lightly_loss = import_or_skip("lightly.loss")
    inner = _lightly_sequential_simclr()

    class SimCLR(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone, self.projection_head = inner.backbone, inner.projection_head
            self.criterion = lightly_loss.NTXentLoss()

        def training_step(self, batch, batch_index):
            x0, x1 = batch
            z0 = self.projection_head(self.backbone(x0).flatten(start_dim=1))
            z1 = self.projection_head(self.backbone(x1).flatten(start_dim=1))
            return self.criterion(z0, z1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = SimCLR()
    views = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(views, batch_size=4))
    trainer.save_checkpoint(tmp_path / "simclr.ckpt")
    assert "state_dict" in torch.load(tmp_path / "simclr.ckpt", weights_only=True)
    backbone, _ = build_backbone("resnet18")
    report = load_weights(backbone, tmp_path / "simclr.ckpt")
    assert report.prefix == "backbone." and report.by_position
    _same_features(backbone, model.backbone)


def _solo_learn_style(cifar_stem: bool) -> nn.Module:
    """solo-learn's method layout: ``backbone`` (torchvision ResNet, ``fc`` removed; the CIFAR variant with a
    3x3 stride-1 stem and no max-pool), ``projector``, online ``classifier``, momentum copies."""
    torchvision = import_or_skip("torchvision")
    backbone = torchvision.models.resnet18(weights=None)
    backbone.fc = nn.Identity()
    if cifar_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        backbone.maxpool = nn.Identity()
    method = nn.Module()
    method.backbone = backbone
    method.projector = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    method.classifier = nn.Linear(512, 10)
    method.momentum_backbone = copy.deepcopy(backbone)
    method.momentum_projector = copy.deepcopy(method.projector)
    return method


def test_solo_learn_checkpoint(tmp_path):
    method = _solo_learn_style(cifar_stem=False)
    torch.save({"epoch": 3, "global_step": 30, "state_dict": method.state_dict()}, tmp_path / "solo.ckpt")
    backbone, _ = build_backbone("torchvision:resnet18")
    report = load_weights(backbone, tmp_path / "solo.ckpt")
    assert report.prefix == "backbone." and not report.by_position
    assert {k.split(".")[0] for k in report.ignored} == {"projector", "classifier", "momentum_backbone", "momentum_projector"}
    _same_features(backbone, method.backbone)


def test_solo_learn_cifar_stem_is_another_architecture(tmp_path):
    torch.save({"state_dict": _solo_learn_style(cifar_stem=True).state_dict()}, tmp_path / "solo.ckpt")
    backbone, _ = build_backbone("torchvision:resnet18")
    with pytest.raises(ValueError, match=r"^checkpoint does not fit the ResNet \(read under prefix 'backbone.'\): "
                                         r"1 tensors differ in shape \(backbone.conv1.weight \(64, 3, 3, 3\) vs the "
                                         r"module's conv1.weight \(64, 3, 7, 7\)\); it holds another architecture"):
        load_weights(backbone, tmp_path / "solo.ckpt")


@pytest.mark.parametrize("library,name,ignored", [
    ("torchvision", "resnet18", {"fc.weight", "fc.bias"}),
    ("torchvision", "mobilenet_v3_small", {"classifier.3.weight", "classifier.3.bias"}),  # classifier.0 is kept
    ("torchvision", "efficientnet_b0", {"classifier.1.weight", "classifier.1.bias"}),
    ("timm", "resnet18", {"fc.weight", "fc.bias"}),
    ("timm", "convnext_atto", {"head.fc.weight", "head.fc.bias"}),  # head.norm is kept
    ("timm", "vit_tiny_patch16_224", {"head.weight", "head.bias"}),
])
def test_state_dict_files_of_torchvision_and_timm(tmp_path, library, name, ignored):
    """A plain ``torch.save(model.state_dict())`` with the classifier: the classifier is ignored and reported."""
    lib = import_or_skip(library)
    model = lib.models.get_model(name, weights=None) if library == "torchvision" else lib.create_model(name, pretrained=False)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    backbone, _ = build_backbone(f"{library}:{name}")
    report = load_weights(backbone, tmp_path / "model.pt")
    assert report.prefix == "" and set(report.ignored) == ignored
    size = 224 if "vit" in name else 64
    x = torch.randn(2, 3, size, size)
    model.eval(), backbone.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True) if library == "timm" else None
        if library == "torchvision":
            classifier = model.fc if name == "resnet18" else model.classifier[-1]
            captured = []
            classifier.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
            model(x)
            features = captured[0]
        assert torch.equal(backbone(x), features)


def test_torchvision_resnet_file_loads_into_timms(tmp_path):
    """The pipeline's ``resnet50`` is timm's when installed; torchvision's files fit it (same tensor names)."""
    torchvision = import_or_skip("torchvision")
    import_or_skip("timm")
    model = torchvision.models.resnet50(weights=None)
    torch.save(model.state_dict(), tmp_path / "r50.pt")
    backbone, width = build_backbone("resnet50")
    assert type(backbone).__module__.startswith("timm") and width == 2048
    load_weights(backbone, tmp_path / "r50.pt")
    model.fc = nn.Identity()
    _same_features(backbone, model, size=64)


def _ddp_state(path: str, port: int) -> None:
    torchvision = import_or_skip("torchvision")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(torchvision.models.resnet18(weights=None))
        torch.save(ddp.state_dict(), path)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_module_prefix(tmp_path):
    _ddp_state(str(tmp_path / "ddp.pt"), free_port())
    state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert all(k.startswith("module.") for k in state)
    backbone, _ = build_backbone("torchvision:resnet18")
    report = load_weights(backbone, tmp_path / "ddp.pt")
    assert report.prefix == "module." and report.ignored == ["module.fc.weight", "module.fc.bias"]
    reference = import_or_skip("torchvision").models.resnet18(weights=None)
    reference.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    reference.fc = nn.Identity()
    _same_features(backbone, reference)


def test_wrong_architecture_names_layers_and_shapes(tmp_path):
    torchvision = import_or_skip("torchvision")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    backbone, _ = build_backbone("torchvision:resnet18")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError, match=r"^checkpoint does not fit the ResNet \(read under prefix ''\): 96 checkpoint "
                                         r"tensors fit nothing \(layer1.2.conv1.weight \(64, 64, 3, 3\); layer1.2.bn1.weight "
                                         r"\(64,\); .*\); it holds another architecture or width than this backbone$"):
        load_weights(backbone, tmp_path / "r34.pt")
    with pytest.raises(ValueError, match=r"tensors differ in shape \(layer1.0.conv1.weight \(64, 64, 1, 1\) vs the "
                                         r"module's layer1.0.conv1.weight \(64, 64, 3, 3\);.*another architecture"):
        load_weights(backbone, tmp_path / "r50.pt")
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
