"""The end-to-end demo (pretext -> BiSSL -> fine-tuning) runs in --quick mode and writes its summary."""
from __future__ import annotations

import json

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
