"""Each setting declared once: the CLI, params.yaml, sweeps, ReadConfig and the README all follow it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.common.config import (
    ExtractConfig,
    SideConfig,
    SweepConfig,
    TrainConfig,
    readme_settings,
    with_readme_settings,
)
from pipeline.common.errors import ConfigError
from pipeline.common.settings import kind_of, option_name, parse_text
from pipeline.training.sweep import parse_grid, parse_settings
from stages import extract as extract_stage
from stages import train as train_stage

REPO = Path(__file__).resolve().parents[1]
CLI_ONLY = {"quiet"}


def command_options(name: str) -> dict[str, click.Option]:
    return {p.name: p for p in main.commands[name].params if isinstance(p, click.Option) and p.name != "help"}


def one_line_error(result, *needles: str) -> None:
    """Exit code 2, one line starting with 'Error:', naming every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


# ---- one declaration, every consumer ------------------------------------------------------------
def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_settings() in readme, "run: python -m pipeline.common.config --update-readme README.md"
    assert with_readme_settings(readme) == readme


@pytest.mark.parametrize("command, cls", [("extract", ExtractConfig), ("train", TrainConfig)])
def test_every_setting_is_a_cli_option_with_the_same_default(command, cls):
    options = command_options(command)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(options) - CLI_ONLY == set(fields)
    for name, field in fields.items():
        option = options[name]
        assert option.opts[0] == option_name(field).split("/")[0] == "--" + name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            assert option.required, name
        else:
            assert option.default == field.default, name
        assert option.help.startswith(field.metadata["setting"].help), name


def test_booleans_are_flags_and_choices_complete():
    train, extract = command_options("train"), command_options("extract")
    assert train["encoder_side"].is_flag and train["encoder_side"].secondary_opts == ["--no-encoder-side"]
    assert extract["overwrite"].is_flag and not extract["overwrite"].secondary_opts
    assert "[gru|rnn|lstm]" in train["rnn"].make_metavar(click.Context(main.commands["train"]))
    assert "0" in extract["part"].help and "counts from 0" in extract["part"].help


def test_readconfig_embeds_the_side_settings():
    from pipeline.training.model import ReadConfig

    side = [f.name for f in dataclasses.fields(SideConfig)]
    assert side == ["method", "rnn", "rnn_dim", "aggregate", "h0", "pooling", "dropout", "encoder_side", "out_init",
                    "out_scale"]
    assert issubclass(ReadConfig, SideConfig) and issubclass(TrainConfig, SideConfig)
    for name in side:  # one declaration: the very same field, default, checks and help
        assert ReadConfig.__dataclass_fields__[name] is SideConfig.__dataclass_fields__[name]
        assert TrainConfig.__dataclass_fields__[name] is SideConfig.__dataclass_fields__[name]
    # adapter_config.json keeps its keys
    cfg = ReadConfig(family="encoder", d_model=8, num_labels=2, task_kind="classification")
    assert set(cfg.to_dict()) == {"family", "d_model", "num_labels", "task_kind", "method", "rnn", "rnn_dim",
                                  "aggregate", "h0", "pooling", "dropout", "has_embedding", "encoder_side",
                                  "out_init", "out_scale"}
    with pytest.raises(ConfigError, match="rnn_dim 0 must be an integer >= 1"):
        ReadConfig(family="encoder", d_model=8, num_labels=2, task_kind="classification", rnn_dim=0)


def test_to_dict_is_unchanged():
    assert TrainConfig(cache="c").to_dict() == {
        "cache": "c", "out": None, "seeds": [0, 1, 2], "epochs": 10, "method": "read", "rnn": "gru", "rnn_dim": 128,
        "aggregate": "mean", "h0": "zero", "pooling": "mean", "encoder_side": True, "out_init": "zeros",
        "out_scale": 1.0, "dropout": 0.1, "lr": 1e-3,
        "weight_decay": 0.01, "warmup_ratio": 0.06, "batch_size": 32, "patience": 5, "max_grad_norm": 1.0,
        "device": "auto", "compile": False, "cuda_graphs": False, "tf32": False, "memory_budget": 8 * 1024**3,
        "host_memory_budget": 16 * 1024**3, "train_split": "train", "eval_splits": None,
        "select_on": "selection", "data_seed": 0,
        "shuffle_buffer": 8, "threads": None, "checkpoint_seconds": 60.0, "resume": True,
    }
    cfg = ExtractConfig(model="m", task="rte", splits="train,validation", layers="0,-1")
    assert cfg.to_dict()["splits"] == ["train", "validation"] and cfg.to_dict()["layers"] == [0, -1]
    assert ExtractConfig(model="m", task="rte", layers="all").to_dict()["layers"] is None


# ---- types: one line naming the setting, the value, the type and the fix --------------------------
@pytest.mark.parametrize("key, value, needles", [
    ("epochs", "ten", ["epochs 'ten'", "an integer", "not a string", "e.g. epochs: 10"]),
    ("lr", "fast", ["lr 'fast'", "a finite number", "e.g. lr: 0.001"]),
    ("lr", float("inf"), ["lr inf must be a finite number > 0"]),  # YAML's .inf
    ("checkpoint_seconds", float("inf"), ["checkpoint_seconds inf must be a finite number >= 0 or null (never save)"]),
    ("rnn_dim", None, ["rnn_dim null", "an integer >= 1", "e.g. rnn_dim: 128"]),
    ("epochs", 2.5, ["epochs 2.5", "an integer"]),
    ("dropout", "0.1", ["dropout '0.1'", "a number in [0, 1)"]),
    ("encoder_side", "yes", ["encoder_side 'yes'", "true or false"]),
    ("seeds", [0, 0.5], ["seeds [0, 0.5]", "list of integers"]),
    ("seeds", "0,,1", ["seeds '0,,1' has an empty item; it must be a comma-separated list of integers"]),
    ("patience", 0, ["patience 0", "or null (never stop early)"]),
])
def test_bad_train_values_in_params_yaml(tmp_path, capsys, key, value, needles):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert train_stage.main(["--task", "rte", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("key, value, needles", [
    ("splits", 5, ["splits 5", "list of strings", "not an integer"]),
    ("max_length", "long", ["max_length 'long'", "an integer >= 2"]),
    ("layers", [0, "last"], ["layers [0, 'last']", "list of integers"]),
    ("splits", "train,,validation", ["splits 'train,,validation' has an empty item"]),
    ("model", None, ["ExtractConfig needs model; set it"]),
])
def test_bad_extract_values_in_params_yaml(tmp_path, capsys, key, value, needles):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["extract"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert extract_stage.main(["--task", "rte", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_missing_required_setting_is_named(tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["extract"]["model"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert extract_stage.main(["--task", "rte", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "ExtractConfig needs model" in capsys.readouterr().err


@pytest.mark.parametrize("args, needles", [
    (["train"], ["--cache is required: Store written by `pipeline extract`"]),
    (["extract", "--model", "m"], ["--task is required: GLUE task: cola"]),
    (["extract", "--task", "rte"], ["--model is required: Hugging Face model id"]),
    (["sweep", "--grid", "lr=1e-3"], ["--cache is required"]),
])
def test_a_required_option_left_out_is_named_with_what_it_is_for(args, needles):
    one_line_error(CliRunner().invoke(main, args), *needles)
    with pytest.raises(ConfigError, match="--cache is required"):  # params.yaml's `cache: null` too
        TrainConfig(cache=None)


def test_every_number_setting_refuses_infinity_and_nan():
    """inf passes '> 0' and nan fails every comparison: both are refused by name, whatever the bounds (a null, not
    inf, says 'never' where a setting has a 'never')."""
    numbers = [f.name for f in dataclasses.fields(TrainConfig) if float in kind_of(TrainConfig, f.name).types]
    assert {"lr", "weight_decay", "dropout", "out_scale", "max_grad_norm", "warmup_ratio",
            "checkpoint_seconds"} <= set(numbers)
    assert not [f.name for cls in (ExtractConfig, SweepConfig) for f in dataclasses.fields(cls)
                if float in kind_of(cls, f.name).types]
    for name in numbers:
        for text in ("inf", "-inf", "Infinity", "nan"):
            with pytest.raises(ConfigError, match=rf"^{name} {text.lower().replace('infinity', 'inf')} must be a "):
                parse_text(TrainConfig, name, text)
        with pytest.raises(ConfigError, match=rf"^{name} inf must be a"):
            TrainConfig(cache="c", **{name: float("inf")})


def test_ints_refuse_floats_and_bools_floats_take_ints():
    with pytest.raises(ConfigError, match="batch_size 2.0"):
        TrainConfig(cache="c", batch_size=2.0)
    with pytest.raises(ConfigError, match="epochs True"):
        TrainConfig(cache="c", epochs=True)
    cfg = TrainConfig(cache="c", lr=1, seeds=7, memory_budget="1GiB")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.seeds == (7,) and cfg.memory_budget == 1024**3
    assert dataclasses.replace(cfg, epochs=3).memory_budget == 1024**3  # normalising twice changes nothing


@pytest.mark.parametrize("args, needles", [
    (["train", "--cache", "x", "--epochs", "ten"], ["epochs 'ten'", "an integer"]),
    (["train", "--cache", "x", "--epochs", "2.5"], ["epochs 2.5", "an integer"]),
    (["train", "--cache", "x", "--lr", "fast"], ["lr 'fast'", "a finite number"]),
    (["train", "--cache", "x", "--lr", "inf"], ["lr inf must be a finite number > 0; e.g. lr: 0.001"]),
    (["train", "--cache", "x", "--seeds", "0,,1"], ["seeds '0,,1' has an empty item", "e.g. seeds: 0,1,2"]),
    (["train", "--cache", "x", "--seeds", "0,1,"], ["seeds '0,1,' has an empty item"]),
    (["train", "--cache", "x", "--eval-splits", "validation,"], ["eval_splits 'validation,' has an empty item"]),
    (["extract", "--model", "m", "--task", "rte", "--layers", "0,,-1"], ["layers '0,,-1' has an empty item"]),
    (["report", "--tasks", "rte,,sst2"], ["--tasks 'rte,,sst2' has an empty item", "e.g. rte,sst2"]),
    (["train", "--cache", "x", "--rnn", "transformer"], ["rnn 'transformer' must be gru, rnn or lstm"]),
    (["train", "--cache", "x", "--patience", "0"], ["patience 0", "null"]),
    (["train", "--cache", "x", "--seeds", "0,a"], ["seeds '0,a'", "list of integers"]),
    (["train", "--cache", "x", "--memory-budget", "lots"], ["memory_budget 'lots'", "8GB"]),
    (["extract", "--model", "m", "--task", "rte", "--max-length", "1"], ["max_length 1", ">= 2"]),
    (["extract", "--model", "m", "--task", "rte", "--dtype", "int8"], ["dtype 'int8'", "bfloat16"]),
    (["extract", "--model", "m", "--task", "rte", "--part", "2/2"], ["part '2/2'", "0 <= I < N"]),
])
def test_bad_cli_values_are_one_line(args, needles):
    one_line_error(CliRunner().invoke(main, args), *needles)


# ---- patience: null in params.yaml, none on the command line --------------------------------------
def test_patience_off_is_none_everywhere(monkeypatch, tmp_path):
    import pipeline.training

    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig, progress: bool = True) -> dict:
        seen.append(cfg)
        return {"task": "rte", "method": "read", "num_seeds": 1, "mean": {}, "std": {}, "primary_metric": "accuracy",
                "select_on": "selection", "frozen_start": {"mean": {"accuracy": 50.0}},
                "majority_baseline": {"accuracy": 52.7}}

    monkeypatch.setattr(pipeline.training, "train", fake_train)
    for spelling in ("none", "None", "null"):
        result = CliRunner().invoke(main, ["train", "--cache", "x", "--patience", spelling])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["train", "--cache", "x", "--patience", "3", "--threads", "none"])
    assert result.exit_code == 0, result.output
    assert [c.patience for c in seen] == [None, None, None, 3] and seen[-1].threads is None
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["patience"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from stages import read_params

    assert train_stage.train_config(read_params(tmp_path / "params.yaml"), "c", None).patience is None
    assert parse_grid(["patience=none,3"]) == {"patience": [None, 3]}


# ---- sweeps: values read as declared --------------------------------------------------------------
def test_grid_and_set_read_values_as_declared():
    assert parse_grid(["threads=1,2", "dropout=0,0.5", "rnn=gru,lstm", "memory-budget=1GB"]) == {
        "threads": [1, 2], "dropout": [0.0, 0.5], "rnn": ["gru", "lstm"], "memory_budget": [1024**3]}
    assert parse_settings(["epochs=3", "eval_splits=validation,test", "encoder-side=off"]) == {
        "epochs": 3, "eval_splits": ("validation", "test"), "encoder_side": False}
    assert parse_text(TrainConfig, "lr", "3e-4") == 3e-4
    with pytest.raises(ConfigError, match="threads 1.5 must be an integer"):
        parse_grid(["threads=1.5"])
    with pytest.raises(ConfigError, match="--set seeds: the sweep's own --seeds sets it, the same for every run"):
        parse_settings(["seeds=1"])


@pytest.mark.parametrize("args, needles", [
    (["--grid", "lr=fast"], ["lr 'fast'", "a finite number"]),
    (["--grid", "rnn=gru,transformer"], ["rnn 'transformer'"]),
    (["--grid", "nope=1"], ["--grid 'nope': no such train setting", "the settings:", "rnn_dim", "threads"]),
    (["--grid", "lr=1e-3", "--set", "epochs=1", "--set", "epochs=2"], ["--set epochs is given twice"]),
    (["--grid", "lr=1e-3,3e-4", "--set", "lr=1e-3"], ["lr: both in --grid and in --set"]),
    (["--grid", "threads=1,2", "--set", "epochs=2.5"], ["epochs 2.5"]),
    (["--grid", "threads=1,2", "--set", "epochs"], ["name=value"]),
    (["--grid", "lr=1e-3", "--workers", "0"], ["workers 0 must be an integer >= 1"]),  # zero workers: a silent hang
    (["--grid", "lr=1e-3", "--threads-per-worker", "0"], ["threads_per_worker 0 must be an integer >= 1"]),
])
def test_bad_sweep_settings_are_one_line_before_any_work(tmp_path, args, needles):
    result = CliRunner().invoke(main, ["sweep", "--cache", str(tmp_path / "none.zarr"), *args])
    one_line_error(result, *needles)


def test_a_pathlib_path_is_taken_where_a_path_is_due():
    from pathlib import Path

    cfg = TrainConfig(cache=Path("data") / "rte.zarr", out=Path("runs") / "rte")
    assert (cfg.cache, cfg.out) == ("data/rte.zarr", "runs/rte") and cfg.to_dict()["cache"] == "data/rte.zarr"
    with pytest.raises(ConfigError, match=r"lr PosixPath\('x'\) must be a finite number"):
        TrainConfig(cache="c", lr=Path("x"))
