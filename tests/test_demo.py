"""The end-to-end demo (pretext -> BiSSL -> fine-tuning) runs in --quick mode and writes its summary."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bissl_fast import demo


@pytest.mark.slow
def test_quick_demo_writes_summary(tmp_path, capsys):
    threads = torch.get_num_threads()
    demo.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the demo restores torch's thread count
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert set(summary["results"]) == {"pretext", "bissl"}
    seeds = summary["config"]["seeds"]
    for result in summary["results"].values():
        assert len(result["test_acc"]) == seeds
        assert all(0.0 <= a <= 1.0 for a in result["test_acc"])
        # Ten classes: anything trained at all is far above chance.
        assert result["test_acc_mean"] > 0.3
    assert set(summary["times"]) == {"pretrain_s", "bissl_s", "finetune_s", "total_s"}
    stages = summary["config"]["bissl_stages"]
    assert len(summary["bissl_log"]) == stages == len(summary["curves"]["bissl_upper_loss"])
    assert all(len(e["cg_relative_residuals"]) == summary["config"]["upper_iters"] for e in summary["bissl_log"])
    assert summary["dataset"]["name"] == "digits"
    out = capsys.readouterr().out
    assert "bissl" in out and "pretext" in out and "wall time" in out


def test_demo_rejects_bad_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        demo.main(["--quick", "--data", "imagefolder", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="data root"):
        demo.main(["--quick", "--data", "cifar10", "--out", str(tmp_path)])


def test_demo_on_an_image_folder(tmp_path):
    """The pipeline also runs on RGB image-folder data (tiny synthetic tree, minimal budget)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            arr = rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
            arr[..., c] = 255  # a class-dependent colour channel
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    out = tmp_path / "out"
    summary = demo.run_demo(demo.build_parser().parse_args([
        "--data", "imagefolder", "--data-root", str(root), "--image-size", "8", "--quick", "--no-progress",
        "--labels-per-class", "3", "--test-per-class", "3", "--batch-size", "8", "--pretrain-epochs", "1",
        "--bissl-stages", "1", "--finetune-epochs", "1", "--out", str(out),
    ]))
    assert summary["dataset"] == {"name": "imagefolder", "images": 36, "shape": [3, 8, 8], "classes": 3,
                                  "labeled_train": 9, "test": 9}
    assert (out / "summary.json").exists() and (out / "summary.png").exists()
    assert len(summary["results"]["bissl"]["test_acc"]) == summary["config"]["seeds"] == 2
