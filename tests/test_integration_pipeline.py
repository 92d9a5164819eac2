"""``bissl-fast run`` with the real packages: a lightly checkpoint through the CLI (and its ignore-list
flag), TensorBoard's scalars read back with tensorboard, and a shipped config run from an installed wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from bissl_fast.cli import main
from helpers import import_or_skip, write_image_folder

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lightly_checkpoint(path) -> None:
    """lightly's SimCLR example model (``Sequential`` of resnet18's children) plus a head the defaults do not know."""
    torchvision = import_or_skip("torchvision")
    heads = import_or_skip("lightly.models.modules.heads")
    model = nn.Module()
    model.backbone = nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1])
    model.projection_head = heads.SimCLRProjectionHead(512, 512, 128)
    model.aux_head = nn.Linear(512, 3)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)


def test_cli_loads_a_lightly_checkpoint_and_writes_tensorboard_scalars(tmp_path, capsys, one_intra_op_thread):
    import_or_skip("timm")
    event_accumulator = import_or_skip("tensorboard.backend.event_processing.event_accumulator")
    write_image_folder(tmp_path / "data", shapes=[(16, 16), (20, 18), (14, 16)] * 4)
    _lightly_checkpoint(tmp_path / "simclr.ckpt")
    argv = ["run", "--data", "imagefolder", "--data-root", str(tmp_path / "data"), "--image-size", "16",
            "--arch", "resnet18", "--pretext-checkpoint", str(tmp_path / "simclr.ckpt"), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--stages", "1", "--lower-iters", "1", "--upper-iters", "1", "--cg-iters", "1",
            "--lower-warmup-steps", "1", "--warmup-epochs", "1", "--finetune-epochs", "1", "--seeds", "1",
            "--lr-search-trials", "0", "--test-per-class", "2", "--val-per-class", "0", "--pretext-batch-size", "8",
            "--downstream-batch-size", "8", "--finetune-batch-size", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2 checkpoint tensors fit nothing (aux_head.weight (3, 512)" in err
    assert "add their key prefixes to ignore=... (bissl-fast run: --pretext-checkpoint-ignore)" in err
    assert main([*argv, "--pretext-checkpoint-ignore", "aux_head.", "--tensorboard"]) == 0
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    loaded = summary["checkpoint_loads"]["backbone"]
    assert "(prefix 'backbone.', children by position)" in loaded and "aux_head.* (2)" in loaded, loaded
    assert "projection_head.* (" in loaded
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    bissl = [r for r in records if r["phase"] == "bissl"]
    assert bissl and "bissl/lower_loss" in tags, tags
    assert [e.value for e in events.Scalars("bissl/lower_loss")] == pytest.approx([r["lower_loss"] for r in bissl])


def test_shipped_config_runs_from_an_installed_wheel(tmp_path):
    """``bissl-fast run --config cpu_digits`` from a pure-Python wheel installed away from the source tree."""
    import_or_skip("sklearn")
    # From a copy of the tracked files: setuptools reuses a build/ folder, which in the checkout may hold stale files.
    source = tmp_path / "source"
    for name in subprocess.run(["git", "-C", REPO, "ls-files"], check=True, capture_output=True, text=True).stdout.split():
        os.makedirs((source / name).parent, exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), source / name, follow_symlinks=False)
    env = dict(os.environ, BISSL_FAST_SKIP_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, env=env, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").iterdir()
    assert {"bissl_fast/experiments/pipeline/configs/cpu_digits.toml",
            "bissl_fast/experiments/pipeline/configs/paper_resnet50.toml"} <= set(zipfile.ZipFile(wheel).namelist())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    installed = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    run = subprocess.run(
        [sys.executable, "-c", "import sys, bissl_fast.cli; print(bissl_fast.__file__, file=sys.stderr); "
         "sys.exit(bissl_fast.cli.main(sys.argv[1:]))",
         "run", "--config", "cpu_digits", "--pretext-epochs", "1", "--warmup-epochs", "1", "--stages", "1",
         "--lower-iters", "1", "--upper-iters", "1", "--finetune-epochs", "1", "--lr-search-trials", "0", "--seeds", "1",
         "--out", str(tmp_path / "run")],
        env=installed, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.splitlines()[0] == str(tmp_path / "site" / "bissl_fast" / "__init__.py")
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["config"]["arch"] == "small_resnet" and summary["config"]["data"] == "digits"
