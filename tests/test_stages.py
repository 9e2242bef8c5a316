"""The DVC stage scripts (params.yaml -> config -> library) and the aggregate report."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.common.config import ExtractConfig, TrainConfig
from pipeline.common.errors import ConfigError
from pipeline.report import write_report
from stages import extract as extract_stage
from stages import read_params
from stages import report as report_stage
from stages import train as train_stage

REPO = Path(__file__).resolve().parents[1]


def write_params(path: Path, **sections) -> Path:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base.update(sections)
    path.write_text(yaml.safe_dump(base))
    return path


# ---- the embedded default ---------------------------------------------------------------------------
def test_embedded_params_build_both_configs():
    params = read_params(REPO / "params.yaml")
    assert params["tasks"], "params.yaml must list at least one task"
    for task in params["tasks"]:
        cfg = extract_stage.extract_config(params, task, f"data/{task}.zarr")
        assert isinstance(cfg, ExtractConfig) and cfg.task == task and cfg.out_path == f"data/{task}.zarr"
        assert cfg.glue_dir == params["glue_dir"]
        tcfg = train_stage.train_config(params, f"data/{task}.zarr", f"runs/{task}")
        assert isinstance(tcfg, TrainConfig) and tcfg.out_dir(task) == f"runs/{task}"
    # YAML's 1e-3 (no dot) would be a string: the learning rate must have come through as a number
    assert isinstance(tcfg.lr, float)


def test_dvc_yaml_loops_over_params_tasks():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = dvc["stages"]
    assert stages["extract"]["foreach"] == "${tasks}" and stages["train"]["foreach"] == "${tasks}"
    assert "extract" in stages["extract"]["do"]["params"] and "train" in stages["train"]["do"]["params"]
    # a train parameter must not reach extraction, or changing it would re-extract
    assert "train" not in stages["extract"]["do"]["params"]
    outs = stages["extract"]["do"]["outs"][0]
    assert outs == {"data/${item}.zarr": {"persist": True}}


# ---- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, section, argv", [
    (extract_stage, "extract", ["--task", "rte"]),
    (train_stage, "train", ["--task", "rte"]),
])
def test_unknown_key_is_refused(tmp_path, capsys, stage, section, argv):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[section]["lerning_rate"] = 0.1
    path = write_params(tmp_path / "params.yaml", **{section: params[section]})
    assert stage.main([*argv, "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: unknown") and "'lerning_rate'" in err and "\n" not in err


def test_unknown_top_level_key_is_refused(tmp_path, capsys):
    path = write_params(tmp_path / "params.yaml", glue_data="/somewhere")
    assert extract_stage.main(["--task", "rte", "--params", str(path)]) == 2
    assert "unknown top-level key(s) ['glue_data']" in capsys.readouterr().err


@pytest.mark.parametrize("stage, section, key, said", [
    (extract_stage, "extract", "task", "is set per task by dvc.yaml (--task)"),
    (extract_stage, "extract", "glue_dir", "is a top-level setting; move it out of the 'extract' section"),
    (train_stage, "train", "cache", "is set per task by dvc.yaml (--cache)"),
])
def test_per_task_and_top_level_keys_are_refused_in_a_section(tmp_path, capsys, stage, section, key, said):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[section][key] = "x"
    path = write_params(tmp_path / "params.yaml", **{section: params[section]})
    assert stage.main(["--task", "rte", "--params", str(path)]) == 2
    assert f"{section}.{key} {said}" in capsys.readouterr().err


def test_bad_value_is_refused_with_the_config_message(tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["rnn"] = "transformer"
    path = write_params(tmp_path / "params.yaml", train=params["train"])
    assert train_stage.main(["--task", "rte", "--params", str(path)]) == 2
    assert "rnn 'transformer' must be gru, rnn or lstm" in capsys.readouterr().err


@pytest.mark.parametrize("text, needles", [
    ("train:\n  epochs: 1\n  seeds: [0\n", ["line 4, column 1: expected ',' or ']'", "from line 3, column 10",
                                            "fix the YAML"]),
    ("train:\n\tepochs: 1\n", ["line 2, column 1: found character '\\t'", "indent with spaces, not tabs"]),
    ("train: \x00\n", ["unacceptable character #x0000", "fix the YAML"]),
])
def test_malformed_yaml_is_one_line_naming_the_place(tmp_path, capsys, text, needles):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert train_stage.main(["--task", "rte", "--cache", "X", "--out", str(tmp_path / "r"), "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {path}") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_exponent_floats_are_numbers(tmp_path):
    """`dvc exp run -S train.lr=3e-4` writes 3e-4, which plain PyYAML (YAML 1.1) reads as a string."""
    text = (REPO / "params.yaml").read_text()
    text = re.sub(r"(?m)^  lr: .*$", "  lr: 3e-4\n  weight_decay: 1E-2", text)
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "3e-4"
    cfg = train_stage.train_config(read_params(tmp_path / "params.yaml"), "data/rte.zarr", None)
    assert cfg.lr == 3e-4 and cfg.weight_decay == 0.01


def test_missing_or_unreadable_params_file(tmp_path):
    with pytest.raises(ConfigError, match="no params file"):
        read_params("/nonexistent/params.yaml")
    (tmp_path / "p.yaml").write_bytes(b"train: \xff\n")
    with pytest.raises(ConfigError, match=r"p.yaml is not UTF-8 text \(byte 7: invalid start byte\); save it as UTF-8"):
        read_params(tmp_path / "p.yaml")


@pytest.mark.parametrize("where", ["nowhere", "empty folder"])
def test_missing_data_stops_at_once_naming_both_ways(tmp_path, capsys, monkeypatch, where):
    """No GLUE folder and no Hub (conftest sets HF offline): the first stage stops before any model loads."""
    import time

    monkeypatch.delenv("GLUE_DIR", raising=False)
    path = write_params(tmp_path / "params.yaml", glue_dir=None if where == "nowhere" else str(tmp_path))
    start = time.perf_counter()
    assert extract_stage.main(["--task", "rte", "--params", str(path), "--out", str(tmp_path / "rte.zarr")]) == 2
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: rte/train") and "\n" not in err
    assert "glue_data" in err and "set glue_dir" in err and "GLUE_DIR" in err
    if where == "nowhere":
        assert "Hugging Face Hub" in err
    assert not (tmp_path / "rte.zarr").exists()


# ---- the report -----------------------------------------------------------------------------------
def fake_run(runs: Path, task: str, primary: str, scores: dict[int, float], other: dict[str, float] | None = None,
             frozen: float = 10.0, select_on: str | None = "selection", folder: str | None = None):
    run = runs / (folder or task)
    run.mkdir(parents=True)
    seeds = {str(s): {"best_epoch": 2, primary: v, **(other or {})} for s, v in scores.items()}
    values = list(scores.values())
    mean = sum(values) / len(values)
    metrics = {
        "task": task, "method": "read", "primary_metric": primary, "backbone": "all-MiniLM-L6-v2",
        "num_seeds": len(scores), "epochs_run": 3, "trainable_parameters": 12345, "fingerprint": "f",
        "mean": {primary: mean, **(other or {})}, "std": {primary: 1.0, **{k: 0.0 for k in other or {}}},
        "seeds": seeds, "resources": {"wall_time_s": 12.0, "peak_rss_mb": 500.0, "cuda_max_allocated_mb": None},
        "frozen_start": {"epoch": 0, "meaning": "a fresh head", "mean": {primary: frozen}},
        "majority_baseline": {primary: 0.0},
    }
    if select_on is not None:  # None: a run from before the selection split, which chose on validation
        metrics["select_on"] = select_on
    (run / "metrics.json").write_text(json.dumps(metrics))
    with open(run / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "select_on", primary, *[f"{primary}_seed{s}" for s in scores]])
        writer.writerow([0, "", select_on, frozen, *[frozen for _ in values]])
        for epoch in (1, 2, 3):
            writer.writerow([epoch, 1.0 / epoch, select_on, mean - 3 + epoch, *[v - 3 + epoch for v in values]])


def test_report_table_and_image(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 60.0, 1: 62.0, 2: 64.0})
    fake_run(runs, "stsb", "combined", {0: 80.0, 1: 82.0, 2: 84.0}, other={"pearson": 83.0})
    report = write_report(str(runs), str(tmp_path / "reports"), tasks=["stsb", "rte"])
    text = (tmp_path / "reports" / "summary.md").read_text()
    assert text == report["markdown"]
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| task | metric | seed 0 | seed 1 | seed 2 | mean ± std")
    assert lines[2].startswith("| stsb | combined | 80.00 | 82.00 | 84.00 | **82.00** ± 1.00 | 10.00 | 0.00 | "
                               "pearson 83.00")
    assert lines[3].startswith("| rte | accuracy | 60.00 | 62.00 | 64.00 | **62.00** ± 1.00 | 10.00 | 0.00 |")
    assert "ON VALIDATION" not in "\n".join(lines) and "⚠" not in "\n".join(lines)
    assert "| **average** |" in lines[4] and "**72.00**" in lines[4]
    assert report["average"] == pytest.approx(72.0)
    png = (tmp_path / "reports" / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_names_rows_by_their_task_and_averages_only_distinct_tasks(tmp_path):
    # A variant's folder, and a folder that now holds another task's run: rows say which task they are, and an
    # average over rows would count rte twice, so there is none.
    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 60.0})
    fake_run(runs, "rte", "accuracy", {0: 64.0}, folder="rte-lr3e-4")
    fake_run(runs, "sst2", "accuracy", {0: 90.0}, folder="copy")
    report = write_report(str(runs), str(tmp_path / "reports"))
    rows = [line.split(" | ")[0] for line in report["markdown"].splitlines() if line.startswith("| ")][1:]
    assert rows == ["| sst2 (copy)", "| rte", "| rte (rte-lr3e-4)"]
    assert report["average"] is None and "**average**" not in report["markdown"]
    assert "No average over tasks: rte has more than one run here." in report["markdown"]


def test_report_marks_scores_not_above_the_frozen_start_and_validation_selection(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 52.0, 1: 53.0}, frozen=55.0)  # training did not beat epoch 0
    fake_run(runs, "cola", "matthews_correlation", {0: 20.0, 1: 22.0}, select_on=None)  # an old run
    text = write_report(str(runs), str(tmp_path / "reports"), tasks=["rte", "cola"])["markdown"]
    rte, cola = (next(line for line in text.splitlines() if line.startswith(f"| {t} |")) for t in ("rte", "cola"))
    assert "**52.50** ± 1.00 ⚠ | 55.00 |" in rte and "ON VALIDATION" not in rte
    assert "⚠" not in cola and "ON VALIDATION" in cola
    assert "rte: a fresh head" in text


def test_report_finds_every_run_and_the_stage_prints_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 60.0})
    params = write_params(tmp_path / "params.yaml", tasks=None)
    out = tmp_path / "reports"
    assert report_stage.main(["--runs", str(runs), "--out", str(out), "--params", str(params)]) == 0
    printed = capsys.readouterr().out
    assert "| rte | accuracy | 60.00 |" in printed and (out / "summary.png").is_file()


def test_report_without_runs_names_the_fix(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="train first"):
        write_report(str(tmp_path / "runs"), str(tmp_path / "reports"))
    params = write_params(tmp_path / "params.yaml", tasks=["rte"])
    assert report_stage.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--params", str(params)]) == 2
    assert "pipeline train --cache data/rte.zarr" in capsys.readouterr().err


def test_report_command_prints_the_table_and_refuses_a_missing_runs_folder(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    fake_run(tmp_path / "runs", "rte", "accuracy", {0: 60.0, 1: 62.0})
    result = CliRunner().invoke(main, ["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "| rte | accuracy |" in result.output
    assert (tmp_path / "rep" / "summary.md").is_file() and (tmp_path / "rep" / "summary.png").is_file()
    missing = CliRunner().invoke(main, ["report", "--runs", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "train first" in missing.output
