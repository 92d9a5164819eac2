"""`torchrun --nproc_per_node=2 -m bissl_fast.cli run` ends where the single-process run on the same global batches ends.

The model has no BatchNorm (tiny_cnn backbone, projector without BatchNorm) and the views are
deterministic flips: BatchNorm normalizes each rank's half-batch with its own statistics (DDP
without SyncBatchNorm), and random augmentations draw per rank, so either would make the two runs
differ by design. What remains -- gradient averaging in every stage, the NT-Xent all-gather, the
rank-averaged Hessian products, sharded loaders -- must reproduce the single process to float32
rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bissl_fast.cli import main as cli_main
from helpers import free_port

FLAGS = [
    "--data", "digits", "--arch", "tiny_cnn", "--no-projector-batchnorm", "--augment", "flip", "--device", "cpu",
    "--threads", "1", "--stages", "2", "--lower-iters", "2", "--upper-iters", "2", "--cg-iters", "2",
    "--pretext-epochs", "1", "--pretext-batch-size", "64", "--pretext-lr", "1.0", "--pretext-warmup-epochs", "0",
    "--warmup-epochs", "1", "--downstream-batch-size", "32", "--finetune-batch-size", "32", "--finetune-epochs", "1",
    "--seeds", "1", "--lr-search-trials", "0", "--test-per-class", "20", "--val-per-class", "0", "--lower-warmup-steps", "2",
]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "bissl_fast.cli", "run", *FLAGS, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli_main(["run", *FLAGS, "--out", str(tmp_path / "one")]) == 0

    one = json.load(open(tmp_path / "one" / "summary.json"))
    two = json.load(open(tmp_path / "two" / "summary.json"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # The NT-Xent loss is over the gathered global batch; the logged upper loss is rank 0's half-batch mean.
    for a, b in zip(one["bissl"], two["bissl"]):
        assert a["lower_loss"] == pytest.approx(b["lower_loss"], rel=1e-4)
    for name in ("bissl", "pretext"):
        assert one["results"][name]["top1_percent_mean"] == pytest.approx(two["results"][name]["top1_percent_mean"], abs=100 / 200)
    w1 = torch.load(tmp_path / "one" / "bissl_backbones.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "bissl_backbones.pt", weights_only=True)
    start = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["pretext_model"]
    for part in w1:
        for key in w1[part]:
            assert torch.allclose(w1[part][key], w2[part][key], rtol=1e-4, atol=1e-6), (part, key)
    moved = [k for k in w1["bissl_lower_backbone"] if not torch.equal(w1["bissl_lower_backbone"][k], start["backbone." + k])]
    assert moved, "BiSSL moved the lower backbone (the comparison is not between untouched weights)"
