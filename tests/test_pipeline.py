"""The whole pipeline end to end on a tiny model: outputs, logs, kill-and-resume equality, bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bissl_fast.experiments.pipeline import (
    PipelineConfig,
    config_from_toml,
    run_pipeline,
)
from bissl_fast.experiments.pipeline.config import resolve_config, shipped_configs
from bissl_fast.train.backbones import build_backbone

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield


def tiny(out, **overrides) -> PipelineConfig:
    settings = dict(
        data="digits", arch="tiny_cnn", out=str(out), stages=2, lower_iters=2, upper_iters=2, cg_iters=2,
        pretext_epochs=1, pretext_batch_size=64, pretext_lr=1.0, pretext_warmup_epochs=0, warmup_epochs=1,
        downstream_batch_size=32, finetune_batch_size=32, finetune_epochs=1, seeds=2, lr_search_trials=1,
        test_per_class=20, val_per_class=5, lower_warmup_steps=2, device="cpu",
    )
    settings.update(overrides)
    return PipelineConfig(**settings)


def test_end_to_end(tmp_path):
    summary = run_pipeline(tiny(tmp_path))
    for name in ("bissl", "pretext"):
        result = summary["results"][name]
        assert len(result["runs"]) == 2 and len(result["search"]) == 1
        assert 0 <= result["top1_percent_mean"] <= result["top5_percent_mean"] <= 100
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    phases = [r["phase"] for r in records]
    assert phases.count("pretext") == 1 and phases.count("warmup") == 1 and phases.count("bissl") == 2
    assert phases.count("lr_search") == 2 and phases.count("test") == 4
    bissl = [r for r in records if r["phase"] == "bissl"]
    assert all(len(r["cg_relative_residuals"]) == 2 and r["lower_lr"] > 0 and r["hvp_per_s"] > 0 for r in bissl)
    assert json.load(open(tmp_path / "summary.json"))["results"] == json.loads(json.dumps(summary["results"]))
    # Everything a resume needs loads without unpickling code.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["done"] == ["pretext", "warmup", "bissl", "finetune"]
    # The BiSSL backbone differs from the pretext one (fine-tuning started from different weights).
    final = torch.load(tmp_path / "bissl_backbones.pt", weights_only=True)["bissl_lower_backbone"]
    pretext = {k[len("backbone."):]: v for k, v in state["pretext_model"].items() if k.startswith("backbone.")}
    assert any(not torch.equal(final[k], pretext[k]) for k in final)


class _Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    reference = run_pipeline(tiny(tmp_path / "full", pretext="byol"))
    kills = ["warmup", "bissl:1", "finetune:bissl:0"]

    def kill(label):
        if kills and label == kills[0]:
            kills.pop(0)
            raise _Killed(label)

    cfg = tiny(tmp_path / "killed", pretext="byol")
    for _ in range(3):
        with pytest.raises(_Killed):
            run_pipeline(cfg, on_checkpoint=kill)
    resumed = run_pipeline(cfg, on_checkpoint=kill)
    assert not kills
    assert resumed["results"] == reference["results"]
    assert resumed["bissl"] == reference["bissl"]
    full = torch.load(tmp_path / "full" / "bissl_backbones.pt", weights_only=True)
    again = torch.load(tmp_path / "killed" / "bissl_backbones.pt", weights_only=True)
    for part in full:
        for key in full[part]:
            assert torch.equal(full[part][key], again[part][key]), (part, key)
    lines = open(tmp_path / "killed" / "log.jsonl").read().splitlines()
    full_lines = open(tmp_path / "full" / "log.jsonl").read().splitlines()
    assert len(lines) == len(full_lines)
    # Changed settings do not silently resume another run's checkpoint.
    with pytest.raises(ValueError, match=r"other settings \(stages\)"):
        run_pipeline(tiny(tmp_path / "killed", pretext="byol", stages=3))


def test_pretext_checkpoint_is_loaded_and_checked(tmp_path, capsys):
    backbone, _ = build_backbone("tiny_cnn", 1)
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": {**weights, "backbone.fc.weight": torch.zeros(3, 2)}}, tmp_path / "pre.ckpt")
    summary = run_pipeline(tiny(tmp_path / "run", pretext_checkpoint=str(tmp_path / "pre.ckpt"), seeds=1,
                                lr_search_trials=0, stages=1))
    assert "prefix 'backbone.'" in summary["checkpoint_loads"]["backbone"]
    # The load report is printed, not only recorded.
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pretext backbone from")]
    assert printed == [f"pretext backbone from {tmp_path / 'pre.ckpt'}: loaded {len(weights)} tensors "
                       "(prefix 'backbone.'), ignored 1 checkpoint keys: backbone.* (1)"]
    other, _ = build_backbone("tiny_resnet", 1)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="checkpoint does not fit the TinyCNN"):
        run_pipeline(tiny(tmp_path / "run2", pretext_checkpoint=str(tmp_path / "other.pt")))


class _RunsAShellCommand:
    """What a malicious checkpoint holds: unpickling it would call os.system."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


class _Settings:
    """A class of the training script saved beside the weights (torch's refusal to load it carries ANSI codes)."""


def _pickle_with_code(path):
    torch.save({"w": torch.ones(1), "payload": _RunsAShellCommand()}, path)


@pytest.mark.parametrize("make,message", [
    (lambda path: path.write_bytes(b""), "checkpoint '{path}' is empty (0 bytes)"),
    (lambda path: path.mkdir(), "checkpoint '{path}' is a directory; give the checkpoint file inside it"),
    (lambda path: path.write_bytes(b"plain text"), "checkpoint '{path}' is not a file torch.save wrote, or is damaged "
                                                   "(torch.load(weights_only=True): Unsupported operand 112)"),
    (_pickle_with_code, "checkpoint '{path}' holds more than tensors (unsupported GLOBAL posix.system), and a "
                        "weights-only load runs no code from a file; if you trust it, load it with "
                        "torch.load(weights_only=False) and save its state dict"),
    (lambda path: torch.save({"w": torch.ones(1), "settings": _Settings()}, path),
     "checkpoint '{path}' holds more than tensors (Unsupported global: GLOBAL test_pipeline._Settings), and a "
     "weights-only load runs no code from a file; if you trust it, load it with torch.load(weights_only=False) and "
     "save its state dict"),
])
def test_unreadable_pretext_checkpoints_say_why_in_one_line(tmp_path, capsys, make, message):
    from bissl_fast.cli import main

    path = tmp_path / "pre.pt"
    make(path)
    assert main(["run", "--pretext-checkpoint", str(path), "--out", str(tmp_path / "run"), "--arch", "tiny_cnn"]) == 2
    assert capsys.readouterr().err == "bissl-fast run: error: " + message.format(path=path) + "\n"


@pytest.mark.parametrize("bad,match", [
    (dict(seeds=0), "seeds must be >= 1"),
    (dict(pretext_batch_size=1), "pretext_batch_size must be >= 2"),
    (dict(finetune_epochs=-1), "finetune_epochs must be >= 0"),
    (dict(upper_lr=-0.1), "upper_lr must be a finite number > 0"),
    (dict(data="mnist"), "data must be one of"),
    (dict(lam=0.0, damping=0.0), r"lam \+ damping"),
    (dict(lr_search_trials=2, val_per_class=0), "needs a validation split"),
    (dict(test_per_class=0), "test_per_class must be >= 1"),
])
def test_bad_settings(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **bad)


def test_bad_paths_and_arch(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_root .* does not exist"):
        run_pipeline(tiny(tmp_path, data="imagefolder", data_root=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        run_pipeline(tiny(tmp_path, arch="resnet9000"))
    with pytest.raises(ValueError, match="bf16 autocast is a CUDA option"):
        run_pipeline(tiny(tmp_path, bf16=True))
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        run_pipeline(tiny(tmp_path, tensorboard=True))


def test_shipped_configs_parse():
    assert shipped_configs() == ["cpu_digits", "paper_resnet50"]
    paper = config_from_toml(resolve_config("paper_resnet50"))
    assert (paper.arch, paper.stages, paper.lower_iters, paper.upper_iters, paper.byol_momentum) == ("resnet50", 500, 20, 8, 0.9995)
    assert (paper.pretext_lr, paper.lower_lr, paper.lower_warmup_steps, paper.finetune_epochs, paper.seeds) == (4.8, 1.0, 200, 400, 10)
    cpu = config_from_toml(resolve_config("cpu_digits"), seeds=1)
    assert cpu.data == "digits" and cpu.seeds == 1


@pytest.mark.parametrize("argv,match", [
    (["--seeds", "0"], "seeds must be >= 1"),
    (["--pretext-batch-size", "1"], "pretext_batch_size must be >= 2"),
    (["--stages", "-1"], "stages must be >= 0"),
    (["--finetune-lr", "-1"], "finetune_lr must be a finite number > 0"),
    (["--data", "imagefolder", "--data-root", "/no/such/folder"], "data_root '/no/such/folder' does not exist"),
    (["--arch", "resnet9000", "--device", "cpu"], "unknown backbone 'resnet9000'"),
    (["--config", "/no/such.toml"], "config file '/no/such.toml' does not exist"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'$"),
    (["--config", "cpu_digit"], r"config 'cpu_digit' is neither a file nor a shipped config \(cpu_digits, paper_resnet50\)"),
    (["--config", "cpu_digits", "--arch", "resnet9000"], "unknown backbone 'resnet9000'"),  # the shipped name resolves
    (["--pretext-checkpoint-ignore", " , "], "pretext_checkpoint_ignore names no key prefix"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, match):
    from bissl_fast.cli import main

    assert main(["run", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bissl-fast run: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err), err


def test_cli_unparsable_flag_is_one_line(capsys):
    from bissl_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--stages", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "bissl-fast run: error: argument --stages: invalid int value: 'many'\n"


def test_cli_flags_override_the_config_file(tmp_path, capsys):
    from bissl_fast.cli import main

    toml = tmp_path / "c.toml"
    toml.write_text('[model]\narch = "resnet9000"\n[finetune]\nseeds = 0\n')
    assert main(["run", "--config", str(toml), "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "unknown backbone 'resnet9000'" in capsys.readouterr().err  # seeds=0 was overridden, arch was read
    toml.write_text('[model]\narhc = "tiny_cnn"\n')
    assert main(["run", "--config", str(toml)]) == 2
    assert "unknown keys ['arhc']" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ('projector_batchnorm = "no"', "projector_batchnorm must be true or false, got 'no'"),
    ("stages = 2.5", "stages must be an integer, got 2.5"),
    ('upper_lr = "0.1"', "upper_lr must be a number, got '0.1'"),
    ("data_root = 3", "data_root must be a string or unset, got 3"),
    ("progress = 1", "progress must be true or false, got 1"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, text, message):
    toml = tmp_path / "c.toml"
    toml.write_text(text + "\n")
    with pytest.raises(TypeError, match="^" + __import__("re").escape(message) + "$"):
        config_from_toml(toml)


def test_integer_learning_rates_are_numbers():
    toml_value = PipelineConfig(upper_lr=1, device="cpu").upper_lr
    assert toml_value == 1.0 and isinstance(toml_value, float)


def test_every_setting_has_help():
    from dataclasses import fields

    from bissl_fast.experiments.pipeline import FIELD_HELP

    assert sorted(FIELD_HELP) == sorted(f.name for f in fields(PipelineConfig))


def test_paper_augmentations_work_in_unit_range_and_need_rgb(tmp_path):
    """augment='paper' augments de-normalized images in [0, 1] and normalizes the views back."""
    from bissl_fast.data.tensors import normalize_stats
    from bissl_fast.experiments.pipeline.inputs import Augment as _Augment
    from bissl_fast.experiments.pipeline.inputs import Splits as _Splits

    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(16, 3, 12, 12, generator=gen)
    stats = normalize_stats(raw)
    x = (raw - stats[0]) / stats[1]
    y = torch.zeros(16, dtype=torch.long)
    splits = _Splits(x, y, x[:0], y[:0], x, y, x, 1, stats, stats)
    for pretext in ("simclr", "byol"):
        aug = _Augment("paper", splits, pretext, torch.device("cpu"))
        assert torch.allclose(aug._unit_range(x, aug.stats), raw, atol=1e-6)
        views = aug.views((x, y))
        assert len(views) == 2 and all(v.shape == x.shape and torch.isfinite(v).all() for v in views)
        assert not torch.allclose(views[0], views[1])
        # Normalized with the split's statistics: a constant mid-grey image maps to (0.5 - mean) / std.
        grey = (torch.full((2, 3, 12, 12), 0.5) - stats[0]) / stats[1]
        assert aug.downstream(grey).shape == grey.shape
        assert torch.allclose(aug.downstream(grey), grey, atol=1e-5)  # crops and flips of a constant image
    with pytest.raises(ValueError, match="augment='paper' needs RGB"):
        run_pipeline(tiny(tmp_path, augment="paper"))


def test_data_change_names_what_differs():
    from bissl_fast.data.tensors import ImageDataset
    from bissl_fast.experiments.pipeline.inputs import data_change, data_fingerprint

    images = torch.rand(4, 1, 3, 3)
    labels = torch.tensor([0, 1, 0, 1])
    saved = data_fingerprint(ImageDataset(images, labels, ["a", "b"], "digits"), None)
    assert data_change(saved, data_fingerprint(ImageDataset(images.clone(), labels.clone(), ["a", "b"], "digits"), None)) is None
    other = data_fingerprint(ImageDataset(torch.cat([images, images[:1]]), torch.cat([labels, labels[:1]]), ["a", "b"], "x"), None)
    assert data_change(saved, other) == "other images were loaded (5 now, 4 before)"
    relabeled = data_fingerprint(ImageDataset(images, labels.flip(0), ["a", "b"], "digits"), None)
    assert data_change(saved, relabeled) == "other images were loaded (4 now, 4 before)"
    folders = {name: [10, 100, 1] for name in "abcde"}
    changed = dict(other, folders={**{name: [9, 90, 2] for name in "abcd"}, "e": [10, 100, 2]})
    assert data_change(dict(saved, folders=folders), changed) == (
        "'a' has 9 files, had 10, 'b' has 9 files, had 10, 'c' has 9 files, had 10 and 2 more changes")
