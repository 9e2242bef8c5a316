"""Sweeps over Dask workers: every grid point trains, from the same store, into its own run."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError
from pipeline.store import CacheStore
from pipeline.training.checkpoint import CHECKPOINT_NAME
from pipeline.training.sweep import expand, finished_run, parse_grid, parse_settings, run_sweep


def test_grid_parsing_and_expansion():
    grid = parse_grid(["lr=1e-3,3e-4", "rnn-dim=8,16", "encoder_side=false"])
    assert grid == {"lr": [1e-3, 3e-4], "rnn_dim": [8, 16], "encoder_side": [False]}
    runs = expand(TrainConfig(cache="c"), grid, "root")
    assert len(runs) == 4
    assert {cfg.rnn_dim for _, cfg in runs} == {8, 16}
    assert runs[0][1].out == "root/lr=0.001-rnn_dim=8-encoder_side=False"
    with pytest.raises(ConfigError, match="--grid 'nope': no such train setting; the settings: aggregate, "):
        parse_grid(["nope=1"])
    with pytest.raises(ConfigError, match="name=v1,v2"):
        parse_grid(["lr"])
    with pytest.raises(ConfigError, match="--grid seeds: the sweep's own --seeds sets it"):
        parse_grid(["seeds=0,1"])
    with pytest.raises(ConfigError, match=r"--set epochs is given twice \('1' and '2'\); give it once"):
        parse_settings(["epochs=1", "epochs=2"])
    with pytest.raises(ConfigError, match="--set 'foo': no such train setting"):
        parse_settings(["foo=1"])
    with pytest.raises(ConfigError, match="lr: both in --grid and in --set"):
        parse_settings(["lr=1e-3", "epochs=2"], grid)
    # A value given twice, as read (1e-3 is 0.001), would train one run folder twice, at once on two workers.
    with pytest.raises(ConfigError, match=r"^--grid lr lists 0.001 twice \(1e-3 and 0.001\); give each value once$"):
        parse_grid(["lr=1e-3,3e-4,0.001"])
    with pytest.raises(ConfigError, match=r"^--grid patience lists null twice \(none and null\); give each value once$"):
        parse_grid(["patience=none,3,null"])
    with pytest.raises(ConfigError, match=r"^--grid rnn lists gru twice; give each value once$"):
        parse_grid(["rnn=gru,gru"])
    with pytest.raises(ConfigError, match=r"^--grid lr=1e-3,,3e-4 has an empty value; .* e.g. lr=1e-3,3e-4$"):
        parse_grid(["lr=1e-3,,3e-4"])
    with pytest.raises(ConfigError, match=r"^--grid select_on: the points are ranked on one split, .* --set select-on"):
        parse_grid(["select-on=selection,validation"])
    # Spaces around a value are no part of it: a text setting would carry them into the run folder's name.
    assert parse_grid(["train_split=train, more"]) == {"train_split": ["train", "more"]}
    assert parse_settings(["train_split= train "]) == {"train_split": "train"}


def test_run_sweep_refuses_an_empty_cluster_before_starting_it(tmp_path):
    with pytest.raises(ConfigError, match="workers 0 must be an integer >= 1"):
        run_sweep(TrainConfig(cache="c"), {}, str(tmp_path), workers=0)


def test_a_failing_point_is_one_line_naming_it_without_the_workers_traceback(synthetic_store, tmp_path, capfd):
    """An expected failure of a grid point (a PipelineError) is the CLI's one line, naming the point; the Dask worker,
    whose stderr is the sweep's, logs no traceback of it, nor of the teardown that stops the other points."""
    cache = synthetic_store(splits={"train": 20, "validation": 8}).path
    result = CliRunner().invoke(main, [
        "sweep", "--cache", cache, "--grid", "train-split=train,nosuch", "--set", "epochs=1", "--set", "device=cpu",
        "--seeds", "0", "--out", str(tmp_path / "sweep"), "--workers", "1",
    ])
    err = capfd.readouterr().err  # the worker processes write to the file descriptor, not to sys.stderr
    assert "Traceback" not in err and "Compute Failed" not in err and "distributed" not in err, err
    assert result.exit_code == 2, result.output
    assert result.output == "Error: train_split=nosuch: task rte has no split 'nosuch'; expected one of: train, " \
                            "validation, test\n"


def test_the_local_workers_ignore_ctrl_c_and_the_sweep_does_not():
    """Ctrl-C reaches the whole process group: the sweep stops its workers itself, so they must not also print
    their own KeyboardInterrupt tracebacks."""
    import signal

    from distributed import Client

    from pipeline.training.sweep import local_cluster

    before = signal.getsignal(signal.SIGINT)
    with local_cluster(1, 1) as cluster, Client(cluster) as client:
        assert client.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is before


def test_sweep_trains_every_point_on_a_local_dask_cluster(t5_store, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, [
        "sweep", "--cache", t5_store, "--grid", "rnn-dim=4,8", "--set", "epochs=1", "--set", "device=cpu",
        "--seeds", "0,1", "--out", str(out), "--workers", "2",
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted(r["rnn_dim"] for r in rows) == [4, 8]
    for row in rows:
        metrics = json.loads((out / row["run"] / "metrics.json").read_text())
        assert metrics["num_seeds"] == 2 and metrics["mean"]["accuracy"] == row["mean"]
        # The winner is ranked on the selection split, never on the validation scores it reports.
        assert row["ranked_by"] == "selection/accuracy" == metrics["select_metric"]
        assert row["rank_score"] == metrics["mean"]["selection/accuracy"]
    assert [r["rank_score"] for r in rows] == sorted((r["rank_score"] for r in rows), reverse=True)
    assert "ranked by selection/accuracy" in result.output


def test_a_rerun_sweep_keeps_the_points_that_finished(t5_store, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", t5_store, "--grid", "rnn-dim=4,8", "--set", "epochs=1", "--set", "device=cpu",
            "--seeds", "0", "--out", str(out), "--workers", "1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    rows = {r["run"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert not any(r["kept"] for r in rows.values())
    stamps = {name: (out / name / "metrics.json").stat().st_mtime_ns for name in rows}
    # rnn_dim=8 was stopped in the middle (its checkpoint is left): not finished, it trains again; rnn_dim=4 is kept.
    (out / "rnn_dim=8" / CHECKPOINT_NAME).write_bytes(b"stopped")
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "kept 1 finished run of the same settings and store (marked *)" in second.output
    assert (out / "rnn_dim=4" / "metrics.json").stat().st_mtime_ns == stamps["rnn_dim=4"]
    assert (out / "rnn_dim=8" / "metrics.json").stat().st_mtime_ns != stamps["rnn_dim=8"]
    again = {r["run"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert again["rnn_dim=4"]["kept"] and not again["rnn_dim=8"]["kept"]
    for row in again.values():  # the same figures, kept or trained again
        row.pop("kept"), rows[row["run"]].pop("kept", None)
        assert row == rows[row["run"]]
    # Other settings or another store: not this point's run.
    fingerprint = CacheStore(t5_store).fingerprint
    point = TrainConfig(cache=t5_store, out=str(out / "rnn_dim=4"), rnn_dim=4, epochs=1, device="cpu", seeds=(0,))
    assert finished_run(point, fingerprint) is not None
    assert finished_run(dataclasses.replace(point, lr=3e-3), fingerprint) is None
    assert finished_run(point, "another store") is None
    # The store by another path, other threads: how a run goes, not what it computes; the finished point is kept.
    elsewhere = os.path.relpath(t5_store)
    assert finished_run(dataclasses.replace(point, cache=elsewhere, threads=1, checkpoint_seconds=5), fingerprint)
    # --retrain trains every point again.
    third = CliRunner().invoke(main, [*args, "--retrain"])
    assert third.exit_code == 0 and "kept" not in third.output, third.output
    assert (out / "rnn_dim=4" / "metrics.json").stat().st_mtime_ns != stamps["rnn_dim=4"]
