"""A stopped training run goes on from its checkpoint and writes exactly what an uninterrupted run writes.

The state between steps (weights, AdamW's moments, the schedule, the dropout streams, each seed's best epoch
and patience, the epoch's batches done) is saved to ``<out>/checkpoint.pt``; these tests stop runs after an epoch
or within one (in process, and with kill -9 from outside) and compare every output of the resumed run with one that
never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from graph_tape import TapeRecorder
from safetensors.torch import load_file

from pipeline.common.config import TrainConfig
from pipeline.training import Trainer, train
from pipeline.training.checkpoint import CHECKPOINT_NAME, DISCARDED_NAME, REPLACED_NAME, Checkpoints, RunState


def config(cache: str, out: Path, **kw) -> TrainConfig:
    settings = dict(epochs=4, rnn_dim=16, batch_size=8, device="cpu", seeds=(0, 1), patience=None,
                    checkpoint_seconds=0, warmup_ratio=0.3)
    return TrainConfig(cache=cache, out=str(out), **{**settings, **kw})


class Stop(Exception):
    """Stands for a crash or Ctrl-C between two epochs."""


def stopped_at(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make every later ``Trainer.train_epoch`` raise when it reaches ``epoch``."""
    original = Trainer.train_epoch

    def train_epoch(self: Trainer, at: int, *args, **kwargs):
        if at == epoch:
            raise Stop(f"stopped before epoch {at}")
        return original(self, at, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def stopped_within(monkeypatch: pytest.MonkeyPatch, epoch: int, steps: int) -> None:
    """Make the run stop (a crash, Ctrl-C) right after it saves its state after batch ``steps`` of ``epoch``."""
    save = Checkpoints.save

    def save_then_stop(self: Checkpoints, state: RunState) -> None:
        save(self, state)
        if state.within is not None and (state.epoch + 1, state.within.steps) == (epoch, steps):
            raise Stop(f"stopped after batch {steps} of epoch {epoch}")

    monkeypatch.setattr(Checkpoints, "save", save_then_stop)


def outputs(run: Path) -> dict[str, object]:
    """Everything a run writes that depends on what it computed (its resources say how long it took)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("resources")
    files = {path.relative_to(run).as_posix(): path for path in run.rglob("*") if path.is_file()}
    assert CHECKPOINT_NAME not in files  # removed once the outputs are written
    found: dict[str, object] = {"metrics.json": metrics}
    for name, path in sorted(files.items()):
        if name.endswith(".safetensors"):
            found[name] = {k: v.numpy() for k, v in load_file(str(path)).items()}
        elif name.endswith((".csv", "adapter_config.json")):
            found[name] = path.read_text()
    return found


def assert_same_outputs(resumed: Path, uninterrupted: Path) -> None:
    a, b = outputs(resumed), outputs(uninterrupted)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".safetensors"):
            for tensor in b[name]:
                np.testing.assert_array_equal(a[name][tensor], b[name][tensor], err_msg=f"{name}: {tensor}")
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("family, memory_budget", [("seq2seq", "8GB"), ("encoder", "8GB"), ("seq2seq", 0)])
def test_a_resumed_run_writes_what_an_uninterrupted_run_writes(synthetic_store, tmp_path, monkeypatch, capsys,
                                                               family, memory_budget):
    # Dropout on, a warm-up then decaying schedule, best epochs chosen along the way: all of it must carry over.
    # memory_budget=0: rows streamed by block, shuffled through a buffer.
    cache = synthetic_store(family=family, splits={"train": 60, "validation": 20}, max_tokens=6, block_tokens=60).path
    options = dict(memory_budget=memory_budget, shuffle_buffer=2)
    train(config(cache, tmp_path / "whole", checkpoint_seconds=None, **options), progress=False)
    assert not (tmp_path / "whole" / CHECKPOINT_NAME).exists()  # none saved without checkpoint_seconds
    with monkeypatch.context() as patch:
        stopped_at(patch, 3)
        with pytest.raises(Stop):
            train(config(cache, tmp_path / "resumed", **options), progress=False)
    assert (tmp_path / "resumed" / CHECKPOINT_NAME).is_file() and not (tmp_path / "resumed" / "metrics.json").exists()
    capsys.readouterr()
    metrics = train(config(cache, tmp_path / "resumed", **options), progress=False)
    assert "saved after epoch 2" in capsys.readouterr().err  # said even without progress: it is about the files
    assert metrics["resources"]["resumed_after_epoch"] == 2 and metrics["epochs_run"] == 4
    assert_same_outputs(tmp_path / "resumed", tmp_path / "whole")


@pytest.mark.parametrize("family, memory_budget, recorded", [("seq2seq", "8GB", False), ("encoder", 0, False),
                                                             ("seq2seq", "8GB", True)])
def test_a_run_stopped_within_an_epoch_resumes_from_that_batch(synthetic_store, tmp_path, monkeypatch, capsys,
                                                               family, memory_budget, recorded):
    # A long epoch is not lost either: checkpoint_seconds also saves between two steps, and the rerun goes on
    # from the next batch of the same order (streamed: groups of blocks it skips are not read), with the
    # epoch's loss sums so far, to the outputs of a run that never stopped. recorded: the CUDA graphs' stand-in.
    cache = synthetic_store(family=family, splits={"train": 60, "validation": 20}, max_tokens=6, block_tokens=60).path
    options = dict(memory_budget=memory_budget, shuffle_buffer=2)

    def run(out: Path, **kw) -> dict:
        cfg = config(cache, out, **{**options, **kw})
        return Trainer(cfg, progress=False, recorder=TapeRecorder() if recorded else None).run()

    run(tmp_path / "whole", checkpoint_seconds=None)
    with monkeypatch.context() as patch:
        stopped_within(patch, 3, 4)
        with pytest.raises(Stop):
            run(tmp_path / "resumed", checkpoint_seconds=1e-9)  # due after every step
    capsys.readouterr()
    metrics = run(tmp_path / "resumed", checkpoint_seconds=1e-9)
    assert "saved after batch 4 of epoch 3" in capsys.readouterr().err
    assert metrics["resources"]["resumed_after_epoch"] == 2 and metrics["resources"]["resumed_after_batches"] == 4
    assert_same_outputs(tmp_path / "resumed", tmp_path / "whole")


def test_patience_and_best_epochs_carry_over(synthetic_store, tmp_path, monkeypatch):
    # A large learning rate: scores go up and down, so seeds stop improving at different epochs and early
    # stopping ends the run; the resumed run must stop at the same epoch with the same best epochs.
    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    options = dict(epochs=12, patience=2, lr=0.05)
    whole = train(config(cache, tmp_path / "whole", checkpoint_seconds=None, **options), progress=False)
    with monkeypatch.context() as patch:
        stopped_at(patch, 3)
        with pytest.raises(Stop):
            train(config(cache, tmp_path / "resumed", **options), progress=False)
    resumed = train(config(cache, tmp_path / "resumed", **options), progress=False)
    assert resumed["epochs_run"] == whole["epochs_run"] and whole["epochs_run"] < 12
    assert_same_outputs(tmp_path / "resumed", tmp_path / "whole")


def test_a_replayed_step_resumes_as_it_ran(synthetic_store, tmp_path, monkeypatch):
    # Recorded steps (the CPU stand-in for CUDA graphs) read the learning rate from a tensor: the resumed run
    # keeps that tensor, filled from the checkpoint, and records its graphs again.
    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path

    def run(out: Path, **kw) -> dict:
        return Trainer(config(cache, out, **kw), progress=False, recorder=TapeRecorder()).run()

    run(tmp_path / "whole", checkpoint_seconds=None)
    with monkeypatch.context() as patch:
        stopped_at(patch, 3)
        with pytest.raises(Stop):
            run(tmp_path / "resumed")
    run(tmp_path / "resumed")
    assert_same_outputs(tmp_path / "resumed", tmp_path / "whole")


def test_a_checkpoint_is_used_only_by_the_same_run(synthetic_store, tmp_path, monkeypatch, capsys):
    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    out = tmp_path / "run"

    def stop_after_two(**kw) -> None:
        with monkeypatch.context() as patch:
            stopped_at(patch, 3)
            with pytest.raises(Stop):
                train(config(cache, out, **kw), progress=False)
        capsys.readouterr()

    # Other settings that change results: a note, and the run starts over (its outputs are a fresh run's).
    stop_after_two(lr=3e-3)
    train(config(cache, out, lr=1e-3, threads=1), progress=False)
    assert (f"{out / CHECKPOINT_NAME} was saved by a run with other settings (lr 0.003 there, 0.001 here); starting "
            "over") in capsys.readouterr().err
    train(config(cache, tmp_path / "fresh", lr=1e-3, checkpoint_seconds=None), progress=False)
    assert_same_outputs(out, tmp_path / "fresh")
    # --no-resume starts over too, and a run that did not save leaves the old checkpoint no longer.
    stop_after_two()
    train(config(cache, out, resume=False), progress=False)
    assert "resuming" not in capsys.readouterr().err
    assert_same_outputs(out, tmp_path / "fresh")
    # How a run goes (threads, budgets that keep the rows held, how often it saves) does not matter.
    stop_after_two()
    train(config(cache, out, threads=1, memory_budget="4GB", checkpoint_seconds=None), progress=False)
    assert "saved after epoch 2" in capsys.readouterr().err
    assert_same_outputs(out, tmp_path / "fresh")
    # Nor does the path the store is given by, or naming the splits scored by default.
    stop_after_two()
    moved = tmp_path / "elsewhere.zarr"
    Path(cache).rename(moved)
    relative = os.path.relpath(moved)
    train(config(relative, out, eval_splits=("validation",), checkpoint_seconds=None), progress=False)
    assert "saved after epoch 2" in capsys.readouterr().err
    assert_same_outputs(out, tmp_path / "fresh")
    # A checkpoint from before the store's path stopped counting still resumes.
    import torch

    moved.rename(cache)
    stop_after_two()
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    saved["identity"]["cache"] = "/an/older/path.zarr"
    torch.save(saved, out / CHECKPOINT_NAME)
    train(config(cache, out, checkpoint_seconds=None), progress=False)
    assert "saved after epoch 2" in capsys.readouterr().err
    assert_same_outputs(out, tmp_path / "fresh")


def test_a_run_stopped_while_writing_over_an_earlier_one_is_not_taken_for_finished(synthetic_store, tmp_path,
                                                                                  monkeypatch, capsys):
    # Stopped after its first adapter, a run left that adapter beside the earlier run's others and its metrics.json:
    # predict ensembled the two runs and the report showed the earlier run's scores, without a word.
    from pipeline.common.errors import AdapterNotFoundError
    from pipeline.inference.predictor import find_adapters
    from pipeline.report import discover_tasks
    from pipeline.training import trainer

    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    runs = tmp_path / "runs"
    train(config(cache, runs / "rte", lr=3e-3), progress=False)
    saved = trainer.save_adapter
    calls = []

    def stop_after_one(*args, **kwargs):
        if calls:
            raise Stop
        calls.append(saved(*args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_adapter", stop_after_one)
        with pytest.raises(Stop):
            train(config(cache, runs / "rte", checkpoint_seconds=None), progress=False)  # no checkpoint to tell
    assert not (runs / "rte" / "metrics.json").exists() and not (runs / "rte" / CHECKPOINT_NAME).exists()
    monkeypatch.chdir(runs / "rte" / "adapters")
    for named in (runs / "rte", runs / "rte" / "adapters", runs / "rte" / "adapters" / "seed_1", Path("seed_0")):
        with pytest.raises(AdapterNotFoundError, match=r"rte is an unfinished run \(its adapters/.writing is there"):
            find_adapters([named])
    shutil.copytree(runs / "rte" / "adapters", tmp_path / "copy", ignore=shutil.ignore_patterns(".writing"))
    assert len(find_adapters([tmp_path / "copy"])) == 2  # a copy of a finished run's adapters/ (dvc get) has none
    assert discover_tasks(runs) == []  # the report leaves it out, with a note
    assert "an unfinished run (stopped while it wrote its outputs" in capsys.readouterr().err
    train(config(cache, runs / "rte"), progress=False)  # the rerun finishes it: what a run alone writes
    train(config(cache, tmp_path / "fresh", checkpoint_seconds=None), progress=False)
    assert_same_outputs(runs / "rte", tmp_path / "fresh")
    assert find_adapters([runs / "rte"]) == [runs / "rte" / "adapters" / f"seed_{s}" for s in (0, 1)]


def test_an_unreadable_checkpoint_is_a_note_and_a_fresh_start(synthetic_store, tmp_path, capsys):
    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    train(config(cache, out), progress=False)
    assert (f"{out / CHECKPOINT_NAME} cannot be read (UnpicklingError); it is kept as {out / DISCARDED_NAME}, which "
            "no run reads; starting over") in capsys.readouterr().err
    assert (out / DISCARDED_NAME).read_bytes() == b"not a checkpoint"
    train(config(cache, tmp_path / "fresh"), progress=False)
    assert_same_outputs(out, tmp_path / "fresh")


def test_a_checkpoint_not_used_is_set_aside_and_a_rerun_with_its_settings_goes_on(synthetic_store, tmp_path,
                                                                                  monkeypatch, capsys):
    # A rerun with a mistyped setting starts over; the run it replaced is kept, and the corrected command goes on
    # from it, keeping the mistyped run's progress in turn.
    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    out, aside = tmp_path / "run", tmp_path / "run" / REPLACED_NAME

    def stop_after_two(**kw) -> None:
        with monkeypatch.context() as patch:
            stopped_at(patch, 3)
            with pytest.raises(Stop):
                train(config(cache, out, **kw), progress=False)
        return capsys.readouterr().err

    stop_after_two(lr=3e-3)
    note = stop_after_two(lr=1e-3)  # the typo
    assert (f"{out / CHECKPOINT_NAME} was saved by a run with other settings (lr 0.003 there, 0.001 here); "
            f"starting over (it is kept as {aside}: a run with its settings goes on from it)") in note
    train(config(cache, out, lr=3e-3, checkpoint_seconds=None), progress=False)
    assert (f"resuming from {out / CHECKPOINT_NAME}, saved after epoch 2 (an earlier rerun had set it aside); the "
            f"checkpoint of other settings it replaces is kept as {aside}") in capsys.readouterr().err
    train(config(cache, tmp_path / "fresh", lr=3e-3, checkpoint_seconds=None), progress=False)
    assert_same_outputs(out, tmp_path / "fresh")
    train(config(cache, out, lr=1e-3, checkpoint_seconds=None), progress=False)  # and the typo's run, had it been meant
    assert "saved after epoch 2 (an earlier rerun had set it aside)" in capsys.readouterr().err
    assert not aside.exists()
    train(config(cache, tmp_path / "fresh-typo", lr=1e-3, checkpoint_seconds=None), progress=False)
    assert_same_outputs(out, tmp_path / "fresh-typo")
    # A third setting replaces the checkpoint set aside, and says which.
    stop_after_two(lr=1e-3)
    stop_after_two(lr=3e-3)
    assert ("it replaces the one set aside earlier (lr 0.001 there, 0.01 here)"
            in stop_after_two(lr=1e-2))
    # --no-resume discards a checkpoint of its own settings, here or set aside: no later run goes on from it.
    train(config(cache, out, lr=3e-3, resume=False, checkpoint_seconds=None), progress=False)
    note = capsys.readouterr().err
    assert (f"--no-resume: starting over, not from {aside}: it is kept as {out / DISCARDED_NAME}, which no run "
            f"reads; {out / CHECKPOINT_NAME} was saved by a run with other settings (lr 0.01 there, 0.003 here) (it is "
            f"kept as {aside}: a run with its settings goes on from it)") in note
    assert_same_outputs(out, tmp_path / "fresh")
    train(config(cache, out, lr=3e-3, checkpoint_seconds=None), progress=False)
    assert "resuming" not in capsys.readouterr().err
    assert_same_outputs(out, tmp_path / "fresh")


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_checkpoint(synthetic_store, tmp_path):
    # The real thing: `pipeline train` killed with SIGKILL (no handler runs) after it saved a checkpoint,
    # then the same command again.
    cache = synthetic_store(splits={"train": 200, "validation": 40}, max_tokens=6).path
    args = [sys.executable, "-m", "pipeline.cli", "train", "--cache", cache, "--epochs", "30", "--rnn-dim", "16",
            "--batch-size", "8", "--seeds", "0,1", "--device", "cpu", "--patience", "none", "--threads", "1",
            "--checkpoint-seconds", "0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", str(killed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT_NAME).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert (killed / CHECKPOINT_NAME).is_file() and not (killed / "metrics.json").exists()
    again = subprocess.run([*args, "--out", str(killed)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole"), "--checkpoint-seconds", "none"], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert_same_outputs(killed, tmp_path / "whole")


def test_a_second_run_into_a_busy_folder_is_refused_at_once(synthetic_store, tmp_path):
    # Two runs writing one folder would mix their outputs, and the second would go on from the first one's
    # checkpoint while the first still writes it. Another process's run holds the folder's lock (a separate lock
    # object here: the same file, another open file description, as another process would have).
    from click.testing import CliRunner
    from filelock import FileLock

    from pipeline.cli import main
    from pipeline.common.files import RUN_LOCK

    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--cache", cache, "--out", str(out), "--epochs", "1", "--rnn-dim", "8", "--device", "cpu",
            "--quiet"]
    with FileLock(str(out / RUN_LOCK), is_singleton=False):
        busy = CliRunner().invoke(main, args)
    assert busy.exit_code == 2 and busy.output.count("\n") == 1, busy.output
    assert busy.output.startswith(f"Error: another run is writing {out} now") and "choose another --out" in busy.output
    assert not (out / "metrics.json").exists()
    done = CliRunner().invoke(main, args)  # once that run is over
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize("below", ["adapters", "predictions"])
def test_a_file_where_an_output_folder_goes_is_refused_before_training(synthetic_store, tmp_path, monkeypatch, below):
    # Found only when the outputs were written, after every epoch, and named as another path.
    cache = synthetic_store(splits={"train": 60, "validation": 20}, max_tokens=6).path
    out = tmp_path / "run"
    out.mkdir()
    (out / below).write_text("not a folder")
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("trained"))
    with pytest.raises(NotADirectoryError) as refused:
        train(config(cache, out), progress=False)
    assert refused.value.filename == str(out / below)
