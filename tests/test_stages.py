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
from pipeline.report import load_run, plot, summarize, write_report
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
    assert "; 3 seeds. " in text and "(n=" not in text  # every task had three: one count, said once
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
    fake_run(runs, "sst2", "accuracy", {0: 80.0, 1: 82.0}, folder="oldest")
    oldest = json.loads((runs / "oldest" / "metrics.json").read_text())  # only what the table cannot do without
    (runs / "oldest" / "metrics.json").write_text(json.dumps(
        {k: oldest[k] for k in ("primary_metric", "mean", "std", "seeds")} | {"frozen_start": None}))
    text = write_report(str(runs), str(tmp_path / "reports"), tasks=["rte", "cola", "oldest"])["markdown"]
    assert "| oldest | accuracy | 80.00 | 82.00 | **81.00** ± 1.00 |  |  |" in text
    rte, cola = (next(line for line in text.splitlines() if line.startswith(f"| {t} |")) for t in ("rte", "cola"))
    assert "**52.50** ± 1.00 ⚠ | 55.00 |" in rte and "ON VALIDATION" not in rte
    assert "⚠" not in cola and "ON VALIDATION" in cola
    assert "rte: a fresh head" in text


def drawn(fig):
    """The report figure's left panel (scores per task), drawn, so that its artists have their places in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.axes[0]


def zero_line(axes) -> bool:
    """Whether a horizontal line across the panel marks the score 0."""
    return any(list(line.get_ydata()) == [0.0, 0.0] for line in axes.get_lines())


def cola_and_rte(runs: Path) -> dict:
    """MCC below zero (cola, two seeds) next to accuracy (rte, three seeds), as the report reads them."""
    fake_run(runs, "cola", "matthews_correlation", {0: -7.0, 1: -9.92}, frozen=-1.4)
    fake_run(runs, "rte", "accuracy", {0: 60.0, 1: 62.0, 2: 64.0})
    return {t: load_run(runs / t) for t in ("cola", "rte")}


def test_report_image_shows_negative_scores(tmp_path):
    # The bar, the dots and the label of a negative score are inside the panel, with a line at zero.
    from matplotlib.collections import PathCollection

    read = cola_and_rte(tmp_path / "runs")
    left = drawn(plot(summarize(read), read, tmp_path / "summary.png"))
    bottom, top = left.get_ylim()
    assert bottom < -9.92 - 1.0 and top == 105  # the lowest seed and the error bar (mean - std = -9.46) fit
    assert [bar.get_height() for bar in left.patches] == pytest.approx([-8.46, 62.0])
    dots = [y for points in left.collections if isinstance(points, PathCollection) for y in points.get_offsets()[:, 1]]
    assert sorted(dots) == pytest.approx([-9.92, -7.0, 60.0, 62.0, 64.0]) and all(bottom < y < top for y in dots)
    assert zero_line(left)
    label = next(t for t in left.texts if t.get_text() == "-8.5 ± 1.0").get_window_extent()
    assert left.get_window_extent().y0 <= label.y0 and label.y1 <= left.transData.transform((0, -9.92))[1]
    only_rte = {"rte": read["rte"]}  # scores all above zero: the panel keeps its 0 to 105, with no zero line
    left = drawn(plot(summarize(only_rte), only_rte, tmp_path / "rte.png"))
    assert left.get_ylim() == (0.0, 105.0) and not zero_line(left)


def test_report_states_each_tasks_seed_count(tmp_path):
    # Two seeds for cola, three for rte: neither the picture nor the table claims one count for both.
    read = cola_and_rte(tmp_path / "runs")
    fig = plot(summarize(read), read, tmp_path / "summary.png")
    assert fig.get_suptitle().endswith(": 2-3 seeds per task (n under each task)")
    assert [t.get_text().split("\n")[-1] for t in drawn(fig).get_xticklabels()] == ["n=2", "n=3"]
    text = write_report(str(tmp_path / "runs"), str(tmp_path / "reports"))["markdown"]
    assert "; 2-3 seeds (per task: n in the mean column). " in text
    assert "**-8.46** ± 1.00 (n=2) ⚠" in text and "**62.00** ± 1.00 (n=3) |" in text
    only_rte = {"rte": read["rte"]}
    assert plot(summarize(only_rte), only_rte, tmp_path / "rte.png").get_suptitle().endswith(": 3 seeds per task")


def test_report_finds_every_run_and_the_stage_prints_it(tmp_path, capsys):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.training.checkpoint import CHECKPOINT_NAME

    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 60.0})
    (runs / "cola").mkdir()
    (runs / "cola" / CHECKPOINT_NAME).write_bytes(b"state")  # an unfinished run
    fake_run(runs / "cola-sweep", "cola", "matthews_correlation", {0: 20.0}, folder="lr=0.001")
    fake_run(runs / "cola-sweep", "cola", "matthews_correlation", {0: 22.0}, folder="lr=0.0003")
    (runs / "cola-sweep" / "sweep.json").write_text("[]")
    (runs / "notes").mkdir()  # any other folder is no run: passed over without a word
    params = write_params(tmp_path / "params.yaml", tasks=None)
    out = tmp_path / "reports"
    assert report_stage.main(["--runs", str(runs), "--out", str(out), "--params", str(params)]) == 0
    printed = capsys.readouterr()
    assert "| rte | accuracy | 60.00 |" in printed.out and (out / "summary.png").is_file()
    assert "| cola" not in printed.out
    assert printed.err.splitlines() == [
        f"note: {runs / 'cola'} left out: an unfinished run (checkpoint.pt, no metrics.json yet); rerun its "
        "`pipeline train` command (it goes on from the checkpoint), then the report",
        f"note: {runs / 'cola-sweep'} left out: a sweep of 2 runs; pass --tasks 'cola-sweep/lr=0.0003' (a run's "
        f"folder under it) to report one, or read {runs / 'cola-sweep' / 'sweep.json'} for their ranking",
    ]
    named = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out", str(out), "--tasks", "cola-sweep/lr=0.001"])
    assert named.exit_code == 0 and "note:" not in named.output  # --tasks reads what it names, and only that
    assert "| cola (cola-sweep/lr=0.001) | matthews_correlation | 20.00 |" in named.output
    # Named on their own, the sweep's folder and the unfinished run get the same fix, not "train that task first".
    for folder, fix in (("cola-sweep", "pass --tasks 'cola-sweep/lr=0.0003'"), ("cola", "rerun its `pipeline train`")):
        refused = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out", str(out), "--tasks", folder])
        assert refused.exit_code == 2 and fix in refused.output and "train that task first" not in refused.output


@pytest.mark.parametrize("damage, problem", [
    ("no mean", "metrics.json: no 'mean' (a run's metrics.json as `pipeline train` writes it)"),
    ("no std", "metrics.json: no 'std'"),
    ("no primary_metric", "metrics.json: no 'primary_metric'"),
    ("seeds a list", "metrics.json: 'seeds' is a JSON array, not an object of seed number to scores"),
    ("seed key renamed", "metrics.json: 'seeds' has the key 'seed_0', not a seed number such as '0'"),
    ("mean a text", "metrics.json: 'mean.accuracy' is '61.0', not a number"),
    ("cut short", "metrics.json: not valid JSON, damaged or cut short ("),
    ("history cut short", "history.csv: line 5 has 3 cells, the header 6: damaged or cut short"),
])
def test_report_of_a_damaged_run_names_the_file_the_fault_and_the_fix(tmp_path, capsys, damage, problem):
    from click.testing import CliRunner

    from pipeline.cli import main

    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 60.0, 1: 62.0})
    path = runs / "rte" / "metrics.json"
    metrics = json.loads(path.read_text())
    edit = {"no mean": lambda: metrics.pop("mean"), "no std": lambda: metrics.pop("std"),
            "no primary_metric": lambda: metrics.pop("primary_metric"),
            "seeds a list": lambda: metrics.update(seeds=list(metrics["seeds"].values())),
            "seed key renamed": lambda: metrics["seeds"].update(seed_0=metrics["seeds"].pop("0")),
            "mean a text": lambda: metrics["mean"].update(accuracy="61.0")}
    if damage in edit:
        edit[damage]()
        path.write_text(json.dumps(metrics))
    elif damage == "cut short":
        path.write_text(path.read_text()[:100])
    else:
        history = runs / "rte" / "history.csv"
        history.write_text(history.read_text()[:-20])
    fix = f"rerun the training that wrote it (`pipeline train --cache data/<task>.zarr --out {runs / 'rte'}`"
    result = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out", str(tmp_path / "reports")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {runs / 'rte'}/{problem}") and fix in result.output
    params = write_params(tmp_path / "params.yaml", tasks=["rte"])
    assert report_stage.main(["--runs", str(runs), "--out", str(tmp_path / "r"), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert problem in err and fix in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "reports").exists() and not (tmp_path / "r" / "summary.md").exists()


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


def test_report_shows_the_method_and_leaves_out_an_average_of_mixed_methods_or_selections(tmp_path):
    # A probe's row beside READ's: each row says its method, and a mean over both would be a number of no method.
    runs = tmp_path / "runs"
    fake_run(runs, "rte", "accuracy", {0: 60.0})
    fake_run(runs, "cola", "matthews_correlation", {0: 20.0})
    probe = json.loads((runs / "cola" / "metrics.json").read_text())
    (runs / "cola" / "metrics.json").write_text(json.dumps(probe | {"method": "probe"}))
    report = write_report(str(runs), str(tmp_path / "reports"))
    lines = [line for line in report["markdown"].splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| task | method | metric | seed 0 |")
    assert lines[1].startswith("| cola | probe | matthews_correlation | 20.00 |")
    assert lines[2].startswith("| rte | read | accuracy | 60.00 |")
    assert report["average"] is None and "**average**" not in report["markdown"]
    assert "No average over tasks: the rows mix methods (probe, read)." in report["markdown"]

    # One method, but one row's epoch chosen on the reported split: its optimism would leak into the average.
    (runs / "cola" / "metrics.json").write_text(json.dumps(probe | {"select_on": "validation"}))
    report = write_report(str(runs), str(tmp_path / "reports"))
    assert "| method |" not in report["markdown"] and report["average"] is None
    assert "No average over tasks: the rows mix epoch selections (selection, validation)." in report["markdown"]
