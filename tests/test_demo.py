"""The demo's replicated experiment: splits, the compute-matched control, input checks, the report and README block."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bissl_fast.data.tensors import BatchAugment
from bissl_fast.experiments import demo, demo_experiment, demo_report, demo_setup, stats

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "demo_cpu_digits_simclr" / "summary.json"


def test_derive_seed_is_a_function_of_seed_and_purpose():
    assert demo_setup.derive_seed(3, "split") == demo_setup.derive_seed(3, "split")
    seeds = {demo_setup.derive_seed(s, p) for s in range(4) for p in ("split", "init", "finetune")}
    assert len(seeds) == 12
    assert all(0 <= s < 2**31 for s in seeds)


def test_split_indices_hold_out_test_and_validation():
    y = torch.arange(10).repeat_interleave(30)[torch.randperm(300)]
    s = demo_setup.split_indices(y, test_per_class=8, val_per_class=4, labels_per_class=3, seed=5)
    test, val, lab, unl = (set(t.tolist()) for t in (s.test, s.val, s.labeled, s.unlabeled))
    assert not test & val and not test & unl and not val & unl and not test & lab and not val & lab
    assert lab <= unl  # labeled images are training images
    assert test | val | unl == set(range(300))
    for idx, per_class in ((s.test, 8), (s.val, 4), (s.labeled, 3)):
        assert torch.bincount(y[idx], minlength=10).tolist() == [per_class] * 10
    again = demo_setup.split_indices(y, 8, 4, 3, seed=5)
    assert torch.equal(again.test, s.test) and torch.equal(again.labeled, s.labeled)
    assert not torch.equal(demo_setup.split_indices(y, 8, 4, 3, seed=6).test, s.test)
    with pytest.raises(ValueError, match="fewer than test \\+ val \\+ labeled = 31"):
        demo_setup.split_indices(y, 20, 8, 3, seed=0)


def test_view_stream_skipping_keeps_the_other_draws_identical():
    x = torch.randn(40, 1, 8, 8)
    full = demo_setup.ViewStream(x, 8, BatchAugment(), seed=11)
    skipping = demo_setup.ViewStream(x, 8, BatchAugment(), seed=11, skip=lambda i: i % 3 == 2)
    full_views = [v for _ in range(3) for v in full]  # 3 epochs of 5 batches
    kept = [v for _ in range(3) for v in skipping]
    assert len(full_views) == 15 and len(kept) == 10
    expected = [v for i, v in enumerate(full_views) if i % 3 != 2]
    for a, b in zip(expected, kept):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert [e for e in full.log if e[0] % 3 != 2] == skipping.log


def _settings(**overrides):
    base = dict(
        pretext="simclr", widths=(8, 16), pretrain_epochs=1, pretrain_lr=2e-3, batch_size=32, bissl_stages=2,
        lower_iters=3, upper_iters=2, bissl_lr=5e-4, lam=None, solver="reuse", finetune_epochs=3, finetune_lr=1e-3,
        labels_per_class=2, val_per_class=2, test_per_class=5, flip=False,
    )
    base.update(overrides)
    return demo_setup.ExperimentSettings(**base)


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_replicate_control_replays_the_bissl_lower_batches(pretext, one_intra_op_thread):
    from bissl_fast.data.tensors import load_digits

    data = load_digits(size=None)
    record = demo_experiment.run_replicate(_settings(pretext=pretext), data, 7, torch.device("cpu"))
    assert record["lower_steps"] == {"B": 6, "C": 6}
    assert record["bissl_config"]["pretext"] == pretext and record["bissl_config"]["lam"] == 0.001
    assert record["control_views_identical"] is True
    # Before the first step B and C are the same model on the same views; the proximal term is 0 there.
    assert record["first_lower_loss"]["B"] == record["first_lower_loss"]["C"]
    assert len(record["curves"]["control_loss"]) == len(record["curves"]["bissl_lower_loss"]) == 2
    assert set(record["test_acc"]) == {"A", "B", "C", "D"}
    assert record["sizes"] == {"unlabeled": 1797 - 70, "labeled": 20, "val": 20, "test": 50}
    again = demo_experiment.run_replicate(_settings(pretext=pretext), data, 7, torch.device("cpu"))
    assert again["test_acc"] == record["test_acc"]  # one seed fixes the whole replicate


@pytest.mark.slow
def test_quick_demo_writes_summary(tmp_path, capsys):
    threads = torch.get_num_threads()
    demo.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the demo restores torch's thread count
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    cfg = summary["config"]
    assert summary["replicate_seeds"] == [0, 1] == [r["seed"] for r in summary["replicates"]]
    for record in summary["replicates"]:
        assert set(record["test_acc"]) == {"A", "B", "C", "D"}
        # Ten classes: anything trained at all is far above chance (10%).
        assert all(0.2 < a <= 1.0 for a in record["test_acc"].values())
        assert record["control_views_identical"] is True
        assert record["lower_steps"]["B"] == record["lower_steps"]["C"] == cfg["bissl_stages"] * cfg["lower_iters"]
        assert len(record["curves"]["bissl_upper_loss"]) == cfg["bissl_stages"]
        assert len(record["curves"]["finetune_loss"]["A"]) == cfg["finetune_epochs"]
    # The statistics are those of the recorded accuracies.
    for label, a, b in demo_report.COMPARISONS:
        expected = stats.compare_paired(
            [r["test_acc"][a] for r in summary["replicates"]], [r["test_acc"][b] for r in summary["replicates"]]
        )
        assert stats.PairedComparison.from_dict(summary["comparisons"][label]) == expected
    out = capsys.readouterr().out
    assert "B-C (primary)" in out and f"Conclusion: {summary['conclusion']}" in out and "wall" in out
    assert str(tmp_path / "summary.png") in out


@pytest.mark.slow
def test_parallel_workers_give_the_sequential_result(tmp_path):
    args = ["--quick", "--no-progress", "--bissl-stages", "1", "--finetune-epochs", "5"]
    one = demo.run_demo(demo.build_parser().parse_args(args + ["--out", str(tmp_path / "one")]))
    two = demo.run_demo(demo.build_parser().parse_args(args + ["--workers", "2", "--out", str(tmp_path / "two")]))
    assert two["times"]["workers"] == 2
    assert [r["test_acc"] for r in one["replicates"]] == [r["test_acc"] for r in two["replicates"]]


def test_demo_on_an_image_folder(tmp_path):
    """The experiment also runs on RGB image-folder data (tiny synthetic tree, minimal budget)."""
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
        "--labels-per-class", "3", "--val-per-class", "1", "--test-per-class", "3", "--batch-size", "8",
        "--pretrain-epochs", "1", "--bissl-stages", "1", "--finetune-epochs", "1", "--lam", "0.25", "--out", str(out),
    ]))
    assert summary["replicates"][0]["bissl_config"]["lam"] == 0.25
    assert summary["dataset"] == {"name": "imagefolder", "images": 36, "shape": [36, 3, 8, 8], "classes": 3,
                                  "per_replicate": {"unlabeled": 24, "labeled": 9, "val": 3, "test": 9}}
    assert (out / "summary.json").exists() and (out / "summary.png").exists()
    assert len(summary["replicates"]) == 2


def test_demo_on_cifar10_layout(tmp_path):
    """The documented CIFAR-10 recipe's data path (pickled batches, RGB, flips) on a tiny fake CIFAR-10 folder."""
    import pickle

    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        labels = np.arange(10).repeat(2)
        data = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    summary = demo.run_demo(demo.build_parser().parse_args([
        "--data", "cifar10", "--data-root", str(tmp_path), "--image-size", "8", "--quick", "--no-progress",
        "--replicates", "1", "--labels-per-class", "2", "--val-per-class", "1", "--test-per-class", "2",
        "--batch-size", "16", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path / "out"),
    ]))
    assert summary["dataset"]["name"] == "cifar10" and summary["dataset"]["shape"] == [100, 3, 8, 8]
    assert summary["replicates"][0]["sizes"] == {"unlabeled": 70, "labeled": 20, "val": 10, "test": 20}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--device cuda was requested but torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicates", "0"], "--replicates must be >= 1, got 0"),
        (["--pretrain-epochs", "-1"], "--pretrain-epochs must be >= 0, got -1"),
        (["--bissl-stages", "-2"], "--bissl-stages must be >= 0, got -2"),
        (["--lower-iters", "-1"], "--lower-iters must be >= 0, got -1"),
        (["--upper-iters", "-1"], "--upper-iters must be >= 0, got -1"),
        (["--finetune-epochs", "-3"], "--finetune-epochs must be >= 0, got -3"),
        (["--batch-size", "1"], "--batch-size must be >= 2 with --pretext simclr (NT-Xent needs negatives), got 1"),
        (["--labels-per-class", "0"], "--labels-per-class must be >= 1, got 0"),
        (["--labels-per-class", "150", "--test-per-class", "50"], "images per class, but the smallest class of digits has 174"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--bissl-lr", "0"], "--bissl-lr must be a positive finite number, got 0.0"),
        (["--lam", "-1"], "--lam must be a finite number >= 0, got -1.0"),
        (["--data", "mnist"], "argument --data: invalid choice: 'mnist'"),
        (["--data", "cifar10"], "data='cifar10' needs a data root folder (--data-root DIR)"),
        (["--data", "imagefolder", "--data-root", "/nonexistent/x"], "does not exist or is not a directory"),
        (["--readme", "/nonexistent/README.md"], "--readme '/nonexistent/README.md' is not a file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        demo.main(argv + ["--no-progress", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bissl-fast demo: error: ")
    assert message in err
    assert not out.exists()  # nothing ran


def test_readme_without_markers_is_rejected_before_training(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no demo block\n")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--readme", str(readme), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "no <!-- demo:start --> ... <!-- demo:end --> block" in capsys.readouterr().err


def _synthetic_summary(diffs: list[float]) -> dict:
    rng = np.random.default_rng(0)
    records = []
    for k, d in enumerate(diffs):
        a = 0.7 + 0.05 * rng.standard_normal()
        c = a + 0.002 * (k % 3 - 1)
        records.append({"seed": k, "test_acc": {"A": a, "C": c, "B": c + d, "D": c - 0.01}})
    return demo_report.summarize(records)


@pytest.mark.parametrize(
    "diffs, start",
    [
        ([0.02, 0.031, 0.025, 0.018, 0.027, 0.022, 0.03, 0.024], "BiSSL's lower backbone (B) beat compute-matched"),
        ([-0.02, -0.031, -0.025, -0.018, -0.027, -0.022, -0.03, -0.024], "BiSSL's lower backbone (B) did worse than"),
        ([0.01, -0.012, 0.004, 0.0, -0.006, 0.009, -0.008, 0.002], "BiSSL's lower backbone (B) was not distinguishable"),
    ],
)
def test_summary_conclusion_follows_the_numbers(diffs, start):
    summary = _synthetic_summary(diffs)
    assert summary["conclusion"].startswith(start)
    primary = summary["comparisons"]["B-C"]
    assert primary["differences"] == pytest.approx(diffs)
    assert f"over {len(diffs)} replicates" in summary["conclusion"]


def test_update_readme_replaces_only_the_block(tmp_path):
    summary = json.loads(COMMITTED.read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{demo_report.README_START}\nold\n{demo_report.README_END}\nafter\n")
    demo_report.update_readme(readme, summary)
    text = readme.read_text()
    assert text.startswith(f"before\n{demo_report.README_START}\n") and text.endswith(f"{demo_report.README_END}\nafter\n")
    assert demo_report.readme_block(text) == demo_report.render_markdown(summary)


def test_readme_block_is_generated_from_the_committed_summary():
    summary = json.loads(COMMITTED.read_text())
    readme = (REPO / "README.md").read_text()
    assert demo_report.readme_block(readme) == demo_report.render_markdown(summary)
    assert (COMMITTED.parent / "summary.png").stat().st_size > 10_000
    # The committed run is the documented full CPU run, not a smoke run.
    assert summary["config"]["quick"] is False and summary["dataset"]["name"] == "digits"
    assert all(r["control_views_identical"] for r in summary["replicates"])
