"""Sweeps over Dask workers: every grid point trains, from the same store, into its own run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError
from pipeline.training.sweep import expand, parse_grid, run_sweep


def test_grid_parsing_and_expansion():
    grid = parse_grid(["lr=1e-3,3e-4", "rnn-dim=8,16", "encoder_side=false"])
    assert grid == {"lr": [1e-3, 3e-4], "rnn_dim": [8, 16], "encoder_side": [False]}
    runs = expand(TrainConfig(cache="c"), grid, "root")
    assert len(runs) == 4
    assert {cfg.rnn_dim for _, cfg in runs} == {8, 16}
    assert runs[0][1].out == "root/lr=0.001-rnn_dim=8-encoder_side=False"
    with pytest.raises(ConfigError, match="cannot sweep 'nope'"):
        parse_grid(["nope=1"])
    with pytest.raises(ConfigError, match="name=v1,v2"):
        parse_grid(["lr"])


def test_run_sweep_refuses_an_empty_cluster_before_starting_it(tmp_path):
    with pytest.raises(ConfigError, match="workers 0 must be an integer >= 1"):
        run_sweep(TrainConfig(cache="c"), {}, str(tmp_path), workers=0)


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
