"""What a killed and resumed pipeline run tells the user and leaves behind: where it resumes, bars that start
there, a refusal on other data, no temporary files of killed writes, records that a rerun does not overwrite,
and TensorBoard scalars logged once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bissl_fast.experiments.pipeline import format_summary, run_pipeline
from bissl_fast.experiments.pipeline import runner as pipeline_runner
from test_pipeline import tiny

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield


class _Killed(Exception):
    pass


def _kill_at(label):
    def on_checkpoint(written):
        if written == label:
            raise _Killed(label)

    return on_checkpoint


@pytest.fixture
def plain_progress(monkeypatch):
    """Progress as plain lines (tqdm hidden) so that the test reads the counts from stderr."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


def test_every_stage_reports_progress_and_a_resume_says_where_it_continues(tmp_path, capsys, plain_progress, monkeypatch):
    cfg = tiny(tmp_path)
    monkeypatch.setattr(pipeline_runner, "load_average", lambda: float(os.cpu_count() or 1))  # every core busy
    with pytest.raises(_Killed):
        run_pipeline(cfg, on_checkpoint=_kill_at("bissl:1"))
    err = capsys.readouterr().err
    assert "warning: the machine is busy (load average" in err and "use an idle machine" in err
    assert "simclr pretraining: 24/24" in err and "head warm-up: 48/48" in err
    assert err.count("tqdm is not installed") == 1

    monkeypatch.setattr(pipeline_runner, "load_average", lambda: 0.0)
    monkeypatch.setattr(pipeline_runner, "calibrate", lambda device, rounds: {"best_s": 1.0, "median_s": 1.0})
    run_pipeline(cfg)
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'checkpoint.pt'} at BiSSL stage 2 of 2" in err
    assert "warning" not in err
    lines = err.splitlines()
    # The bar starts where the run stopped: the resumed run trains one stage and counts it as the second.
    assert [line.split(" lower_loss")[0] for line in lines if line.startswith("BiSSL stages")] == ["BiSSL stages: 2/2"]
    assert "pretraining" not in err and "head warm-up" not in err
    for init in ("bissl", "pretext"):
        assert f"lr search ({init}): 1/1 loss=" in err and f"fine-tuning ({init}): 2/2 loss=" in err

    run_pipeline(cfg)
    err = capsys.readouterr().err
    assert err == f"{tmp_path / 'checkpoint.pt'} holds a finished run: nothing is trained again (--no-resume or another --out starts over)\n"


def _image_folder(root, per_class=40, classes=("a", "b", "c")):
    from PIL import Image

    gen = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name)
        for i in range(per_class):
            Image.fromarray(gen.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_a_resume_on_other_data_is_refused_in_one_line(tmp_path):
    images = _image_folder(tmp_path / "images")
    cfg = tiny(tmp_path / "run", data="imagefolder", data_root=str(images), test_per_class=10, val_per_class=5,
               pretext_batch_size=32, lr_search_trials=0, seeds=1)
    with pytest.raises(_Killed):
        run_pipeline(cfg, on_checkpoint=_kill_at("bissl:1"))
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    # Same images, other file times: the loaded data is the same, so the run resumes.
    for path in (images / "a").iterdir():
        os.utime(path, (1e9, 1e9))
    with pytest.raises(_Killed):
        run_pipeline(cfg, on_checkpoint=_kill_at("finetune:bissl:0"))

    for i in range(20):
        os.remove(images / "b" / f"{i:03d}.png")
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError) as refused:
        run_pipeline(cfg)
    message = str(refused.value)
    assert message == (f"{tmp_path / 'run' / 'checkpoint.pt'} was written on other data (data imagefolder in {images}: "
                       "'b' has 20 files, had 40); use another --out or --no-resume")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint

    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "c" / "000.png")
    with pytest.raises(ValueError, match=r"other data \(.*'b' has 20 files, had 40, files in 'c' changed\)"):
        run_pipeline(cfg)

    # 3 classes: every label is in the top 5, so only top-1 is reported.
    summary = run_pipeline(tiny(tmp_path / "run", data="imagefolder", data_root=str(images), test_per_class=10,
                                val_per_class=5, pretext_batch_size=32, lr_search_trials=0, seeds=1, resume=False))
    assert all(set(r) == {"top1_percent_mean", "top1_percent_std", "runs", "search"} for r in summary["results"].values())
    assert "top-5" not in format_summary(summary) and "top-1 (%)" in format_summary(summary)


def test_too_few_images_per_class_names_the_class_folder_and_the_flags(tmp_path):
    images = _image_folder(tmp_path / "images", classes=("cats", "dogs"))
    with pytest.raises(ValueError) as error:
        run_pipeline(tiny(tmp_path / "run", data="imagefolder", data_root=str(images), test_per_class=30, val_per_class=10))
    assert str(error.value) == ("class folder 'cats' has 40 images, and the splits take 30 for testing and 10 for "
                                "validation, leaving 0 for training; lower --test-per-class / --val-per-class "
                                "(test_per_class / val_per_class)")


# Runs the tiny pipeline and dies (SIGKILL, no cleanup) in the middle of writing its third checkpoint.
_KILLED_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_pipeline import tiny
    from bissl_fast.experiments.pipeline import run_pipeline

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.set_num_threads(1)
    torch.save = save
    run_pipeline(tiny({out!r}))
""")


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "run"
    script = _KILLED_MID_WRITE.format(tests=os.path.join(REPO, "tests"), out=str(out))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr[-2000:]
    leftover = out / f"checkpoint.pt.tmp-{killed.pid}"
    assert leftover.read_bytes() == b"half a checkpoint"
    # Not ours to remove: a temporary file of a live process, and names of another form.
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    live = out / f"checkpoint.pt.tmp-{writer.pid}"
    others = [out / "checkpoint.pt.tmp-notapid", out / "checkpoint.pt.tmp-12x", out / "other.pt.tmp-1"]
    for path in (live, *others):
        path.write_bytes(b"x")
    try:
        run_pipeline(tiny(out))
    finally:
        writer.kill()
        writer.wait()
    err = capsys.readouterr().err
    assert "removed 1 temporary file(s) of checkpoint writes that were killed (0.0 MB)" in err
    assert f"resuming {out / 'checkpoint.pt'} at BiSSL stage 1 of 2" in err
    assert not leftover.exists() and live.exists() and all(path.exists() for path in others)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == ["pretext", "warmup", "bissl", "finetune"]


def test_a_rerun_of_a_finished_run_keeps_its_records(tmp_path):
    cfg = tiny(tmp_path, seeds=1, lr_search_trials=0)
    with pytest.raises(_Killed):
        run_pipeline(cfg, on_checkpoint=_kill_at("bissl:1"))
    first = run_pipeline(cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["wall_time_s_by_process"]) == 2 and all(t > 0 for t in saved["wall_time_s_by_process"])
    assert saved["wall_time_s_total"] == pytest.approx(sum(saved["wall_time_s_by_process"]))
    assert saved == json.loads(json.dumps(first))
    again = run_pipeline(cfg)
    assert again == first and json.loads((tmp_path / "summary.json").read_text()) == saved
    # One unit, labelled: percent in the summary, the test records and the console table.
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    tests = [r for r in records if r["phase"] == "test"]
    assert all(0 <= r["top1_percent"] <= r["top5_percent"] <= 100 and "top1" not in r for r in tests)
    bissl = saved["results"]["bissl"]
    assert bissl["top1_percent_mean"] == tests[0]["top1_percent"]
    assert f"{bissl['top1_percent_mean']:>8.2f} +- " in format_summary(saved)


def test_tensorboard_holds_every_record_once(tmp_path):
    """A kill while a checkpoint is written: what was logged since the last checkpoint is logged again on
    resume, yet TensorBoard shows each record once, with fine-tuning, test and CG-residual scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(tmp_path, tensorboard=True, seeds=2, lr_search_trials=1)
    writes = []
    real_save = pipeline_runner.save_atomic

    def save_killed_at_the_third_checkpoint(obj, path):
        writes.append(path)
        if len(writes) == 3:  # pretext, warm-up, then BiSSL stage 1: its log line is written, its checkpoint not
            raise _Killed("mid-write")
        real_save(obj, path)

    pipeline_runner.save_atomic = save_killed_at_the_third_checkpoint
    try:
        with pytest.raises(_Killed):
            run_pipeline(cfg)
    finally:
        pipeline_runner.save_atomic = real_save
    run_pipeline(cfg)

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags}
    assert all(len(s) == len(set(s)) for s in steps.values()), {t: s for t, s in steps.items() if len(s) != len(set(s))}
    assert steps["bissl/lower_loss"] == [0, 1] and steps["bissl/cg_relative_residual_max"] == [0, 1]
    assert steps["pretext/loss"] == [0] and steps["warmup/loss"] == [0]
    for init in ("bissl", "pretext"):
        assert steps[f"test/{init}/top1_percent"] == [0, 1] and steps[f"test/{init}/top5_percent"] == [0, 1]
        assert steps[f"lr_search/{init}/top1_percent"] == [0]
        assert steps[f"finetune/{init}/seed0/loss"] == [0] and steps[f"finetune/{init}/seed1/loss"] == [0]
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    residuals = [max(r["cg_relative_residuals"]) for r in records if r["phase"] == "bissl"]
    logged = [e.value for e in events.Scalars("bissl/cg_relative_residual_max")]
    assert logged == pytest.approx(residuals, rel=1e-6)  # TensorBoard stores float32
    test_values = [r["top1_percent"] for r in records if r["phase"] == "test" and r["init"] == "bissl"]
    assert [e.value for e in events.Scalars("test/bissl/top1_percent")] == pytest.approx(test_values, rel=1e-6)
