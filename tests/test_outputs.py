"""A run directory holds this run's outputs only, each file whole: stale seeds and splits go, crashes leave no half files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.common.config import TrainConfig
from pipeline.common.files import atomic_write_text, partial_path
from pipeline.training import train

REPO = Path(__file__).resolve().parents[1]


def quick(cache: str, out: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, out=str(out), rnn_dim=8, batch_size=4, device="cpu", threads=1,
                       **{"epochs": 2, **kw})


@pytest.fixture
def store(synthetic_store) -> str:
    return synthetic_store(family="encoder", splits={"train": 24, "validation": 10}).path


def test_retraining_with_other_seeds_and_splits_leaves_only_this_runs_outputs(store, tmp_path):
    train(quick(store, tmp_path, seeds=(0, 1, 3), eval_splits=("validation", "train")), progress=False)
    # Things the pipeline did not write are never touched, even under adapters/ and predictions/.
    (tmp_path / "adapters" / "seed_3" / "notes.txt").write_text("mine")
    (tmp_path / "adapters" / "seed_x").mkdir()
    (tmp_path / "adapters" / "seed_01").mkdir()
    (tmp_path / "predictions" / "readme.txt").write_text("mine")
    train(quick(store, tmp_path, seeds=(2,), eval_splits=("validation",)), progress=False)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["seed_01", "seed_2", "seed_3", "seed_x"]
    assert sorted(p.name for p in (tmp_path / "adapters" / "seed_3").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["readme.txt", "validation.csv"]
    assert list(json.loads((tmp_path / "metrics.json").read_text())["seeds"]) == ["2"]



def test_retraining_into_a_run_folder_says_first_which_seeds_it_replaces(store, tmp_path, capsys):
    from pipeline.training.trainer import result_line

    run = tmp_path / "run3"
    first = train(quick(store, run, seeds=(0, 1, 2), epochs=1), progress=False)
    assert "replacing" not in capsys.readouterr().err and result_line(first).startswith("rte (read, 3 seeds): ")
    again = train(quick(store, run, seeds=(5,), epochs=1), progress=False)  # progress off: still said
    assert capsys.readouterr().err == f"replacing the run in {run} (seeds 0, 1, 2)\n"
    assert result_line(again).startswith("rte (read, 1 seed): ")  # not "1 seeds"
    train(quick(store, run, seeds=(5,), epochs=1), progress=False)
    assert capsys.readouterr().err == f"replacing the run in {run} (seed 5)\n"
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "task": "cola"}))  # a run of another task
    train(quick(store, run, seeds=(5,), epochs=1), progress=False)
    assert capsys.readouterr().err == f"replacing the run in {run} (a run of cola, seed 5; this one trains rte)\n"


@pytest.mark.parametrize("victim", ["metrics.json", "history.csv", "config.json", "predictions/validation.csv",
                                    "adapters/seed_0/adapter_model.safetensors",
                                    "adapters/seed_0/adapter_config.json"])
def test_a_failure_mid_write_leaves_the_previous_file_intact(store, tmp_path, monkeypatch, victim):
    train(quick(store, tmp_path, seeds=(0,)), progress=False)
    before = (tmp_path / victim).read_bytes()
    target = partial_path(tmp_path / victim)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:  # the new bytes are half on their way: the disk fills up
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == target:
            os.truncate(fd, 7)
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("pipeline.common.files.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        train(quick(store, tmp_path, seeds=(0,), lr=0.01), progress=False)
    # metrics.json marks a finished run: removed before the outputs are written and written last, so the folder
    # now reads as unfinished (predict refuses it, the report leaves it out); every other file is whole.
    assert not (tmp_path / "metrics.json").exists()
    if victim != "metrics.json":
        assert (tmp_path / victim).read_bytes() == before
    assert not target.exists()


def test_atomic_write_replaces_whole(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new\r\n")
    assert path.read_bytes() == b"new\r\n" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # A failure names the file asked for, never the temporary one it does not know about.
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        atomic_write_text(tmp_path / "folder", "new")
    assert caught.value.filename == str(tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]  # no temporary file left


def _train_command(store: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--cache", store, "--out", str(out), "--seeds", "0,1",
            "--epochs", "6", "--rnn-dim", "8", "--batch-size", "2", "--device", "cpu", "--threads", "1",
            "--patience", "none"]


def _run_outputs(run: Path) -> tuple[dict, dict]:
    seeds = json.loads((run / "metrics.json").read_text())["seeds"]
    tensors = {p.parent.name: {k: v.tolist() for k, v in load_file(str(p)).items()}
               for p in sorted(run.glob("adapters/*/adapter_model.safetensors"))}
    return seeds, tensors


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_gives_the_uninterrupted_run(store, tmp_path):
    """The reduced version of benchmarks/reliability.py's training rows: one kill point, mid-epoch."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_train_command(store, clean), env=env, check=True, capture_output=True)
    # A complete earlier run into the same folder, then the killed rerun over it: nothing may be left half.
    subprocess.run(_train_command(store, killed)[:-2] + ["--epochs", "1"], env=env, check=True, capture_output=True)
    process = subprocess.Popen(_train_command(store, killed), env=env, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "epoch 3/" in line:
            break
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    for path in killed.rglob("*.json"):
        json.loads(path.read_text())  # every JSON that exists parses
    subprocess.run(_train_command(store, killed), env=env, check=True, capture_output=True)
    assert _run_outputs(killed) == _run_outputs(clean)
    assert not list(killed.rglob(f"*{partial_path('x').suffix}"))
