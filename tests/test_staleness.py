"""Committed results against today's code: the demo's replicates reproduce their recorded fingerprints (data,
split, augmentation, initialization, loss before any update), a planted change of each kind is caught, rounding
differences between CPUs are not; provenance is recorded and README blocks say when results predate the code."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bissl_fast import _provenance
from bissl_fast.data.tensors import BatchAugment, load_digits
from bissl_fast.experiments import demo, demo_setup
from bissl_fast.train.models import SmallResNet

REPO = Path(__file__).resolve().parents[1]
COMMITTED_DEMO = REPO / "benchmarks" / "results" / "demo_cpu_digits_simclr" / "summary.json"


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield


def test_committed_demo_replicates_reproduce_their_fingerprints():
    summary = json.loads(COMMITTED_DEMO.read_text())
    stale = demo.stale_replicates(summary)
    assert not stale, (
        f"{COMMITTED_DEMO.relative_to(REPO)} was produced by other code (replicate seed -> fields that differ today: "
        f"{stale}); re-run `bash scripts/demo.sh --out {COMMITTED_DEMO.parent.relative_to(REPO)} --readme README.md`"
    )


def test_committed_demo_replicates_reproduce_under_avx2_only():
    """Another vector width (AVX2 instead of this machine's widest) rounds differently but must still pass."""
    code = (
        "import json, sys, torch; from bissl_fast.experiments import demo; torch.set_num_threads(1); "
        f"stale = demo.stale_replicates(json.load(open({str(COMMITTED_DEMO)!r}))); "
        "print(torch.backends.cpu.get_cpu_capability()); sys.exit(1 if stale else 0)"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split()[-1] in ("AVX2", "DEFAULT"), done.stdout  # the restriction took effect


@pytest.fixture(scope="module")
def small_summary() -> dict:
    """A summary of two quick-sized replicates with their fingerprints, as the demo records them (no training)."""
    args = demo.resolve(demo.build_parser().parse_args(["--quick"]))
    settings, data = demo.settings_from_args(args), load_digits(size=None)
    replicates = [
        {"seed": seed, "fingerprint": demo_setup.replicate_fingerprint(
            demo_setup.prepare_replicate(settings, data, seed, torch.device("cpu")))}
        for seed in (0, 1)
    ]
    config = {k: v for k, v in vars(args).items() if k not in demo._NOT_CONFIG}
    return {"config": config, "replicates": replicates}


def test_unchanged_code_reproduces_the_fingerprints(small_summary):
    assert demo.stale_replicates(small_summary) == {}


_ORIGINAL_LOAD, _ORIGINAL_SPLIT, _ORIGINAL_NT_XENT = demo._load, demo_setup.split_indices, demo_setup.nt_xent


def _perturbed_digits(args: argparse.Namespace):
    data = _ORIGINAL_LOAD(args)
    data.x[5] += 1.0 / 16  # one intensity step on one image
    return data


def _shifted_split(y, *args, **kwargs):
    splits = _ORIGINAL_SPLIT(y, *args, **kwargs)
    # One test image trades places with an unlabeled one: the split sizes stay, the split does not.
    splits.test[0], splits.unlabeled[0] = splits.unlabeled[0].clone(), splits.test[0].clone()
    return splits


class _RotatedMore(BatchAugment):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "rotation": kwargs.get("rotation", 15.0) + 1.0})


class _WiderInit(SmallResNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.stem[0].weight.mul_(1.01)


def _warmer_nt_xent(z0, z1, temperature, **kwargs):
    return _ORIGINAL_NT_XENT(z0, z1, temperature * 1.01, **kwargs)


PLANTED = {
    # change kind: (module, attribute, replacement, fields that must flag it)
    "data": (demo, "_load", _perturbed_digits, {"data_sha256"}),
    "split": (demo_setup, "split_indices", _shifted_split, {"split_sha256"}),
    "augmentation": (demo_setup, "BatchAugment", _RotatedMore, {"first_views_checksum"}),
    "initialization": (demo_setup, "SmallResNet", _WiderInit, {"init_checksum"}),
    "loss": (demo_setup, "nt_xent", _warmer_nt_xent, {"first_pretrain_loss"}),
}


@pytest.mark.parametrize("kind", list(PLANTED))
def test_a_planted_change_of_each_kind_is_caught(small_summary, monkeypatch, kind):
    module, attribute, replacement, fields = PLANTED[kind]
    monkeypatch.setattr(module, attribute, replacement)
    stale = demo.stale_replicates(small_summary)
    assert set(stale) == {0, 1}, f"a planted {kind} change went unnoticed: {stale}"
    for seed, wrong in stale.items():
        assert fields <= set(wrong), f"{kind}: replicate {seed} flagged {wrong}, expected at least {fields}"


def test_a_summary_without_fingerprints_is_stale(small_summary):
    old = {**small_summary, "replicates": [{"seed": r["seed"]} for r in small_summary["replicates"]]}
    assert demo.stale_replicates(old) == {0: ["fingerprint"], 1: ["fingerprint"]}


def test_provenance_names_the_code_the_software_and_the_machine():
    record = _provenance.provenance(command=["bissl-fast", "demo"])
    assert record["source_sha256"] == _provenance.source_hash() and len(record["source_sha256"]) == 64
    assert record["source_files"] > 50
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert record["versions"]["torch"] and record["versions"]["numpy"] and record["versions"]["python"]
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["command"] == "bissl-fast demo" and record["threads"]["intra_op"] == torch.get_num_threads()
    short = _provenance.short_form(record)
    assert record["cpu_capability"] in short and ("commit" in short or "not a git checkout" in short)


def test_reading_provenance_imports_neither_triton_nor_sklearn():
    code = ("import sys; from bissl_fast import _provenance; _provenance.provenance(); "
            "print(sorted(m for m in ('triton', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_source_hash_changes_with_any_source_file(tmp_path):
    (tmp_path / "bissl_fast" / "ops").mkdir(parents=True)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "bissl_fast" / "ops" / "a.py").write_text("x = 1\n")
    (tmp_path / "csrc" / "k.cpp").write_text("int k;\n")
    (tmp_path / "notes.md").write_text("not code\n")
    before = _provenance.source_hash(root=tmp_path)
    (tmp_path / "notes.md").write_text("edited, still not code\n")
    assert _provenance.source_hash(root=tmp_path) == before
    for path in ("bissl_fast/ops/a.py", "csrc/k.cpp"):
        (tmp_path / path).write_text((tmp_path / path).read_text() + "// changed\n")
        changed = _provenance.source_hash(root=tmp_path)
        assert changed != before
        before = changed


def test_readme_blocks_say_when_results_predate_the_code():
    record = _provenance.provenance()
    assert _provenance.older_code_note(record) is None
    assert "older code" in _provenance.older_code_note({**record, "source_sha256": "0" * 64})
    assert "older code" in _provenance.older_code_note(None)


def test_readme_pipeline_block_is_generated_from_the_committed_run():
    from bissl_fast.experiments.pipeline import report

    source = "benchmarks/results/pipeline_cpu_digits/summary.json"
    summary = json.loads((REPO / source).read_text())
    assert report.readme_block((REPO / "README.md").read_text()) == report.render_markdown(summary, source), (
        f"README's pipeline block differs from {source}: python -m bissl_fast.experiments.pipeline.report {source} "
        "--readme README.md"
    )
