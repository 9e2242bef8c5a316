"""`pipeline`: the command line. Heavy imports happen inside commands so --help is instant."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.common.config import ExtractConfig, SweepConfig, TrainConfig
from pipeline.common.settings import (
    default_text,
    field_of,
    kind_of,
    option_name,
    ordered_fields,
    parse_text,
    spec_of,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def reports_errors(command: Callable | None = None, *, stopped: str = "restarts") -> Callable:
    """Turn expected failures into one line on stderr and exit code 2, never a traceback.

    Expected: the pipeline's typed errors and OS errors (disk full, permission denied, a file where
    a folder should be). Anything else is a bug and keeps its traceback. Ctrl-C exits 130, saying what
    a rerun does: ``stopped`` is a key of ``errors.INTERRUPTED`` (an extraction resumes, training goes on
    from its checkpoint, the others start again).
    Bare (``@reports_errors``) or with ``stopped`` (``@reports_errors(stopped="resumes")``).
    """
    if command is None:
        return functools.partial(reports_errors, stopped=stopped)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.common.errors import (
            PipelineError,
            error_message,
            interrupted_message,
        )
        from pipeline.common.progress import close_bars

        rerun = "the same command"
        try:
            return command(*args, **kwargs)
        except (PipelineError, OSError) as exc:
            message = error_message(exc, rerun=rerun, out=kwargs.get("out"), stopped=stopped)
            close_bars()
            click.echo(f"Error: {message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            close_bars()
            click.echo(interrupted_message(rerun, stopped), err=True)
            sys.exit(130)

    return wrapper


class SettingType(click.ParamType):
    """Command-line text read with a setting's declared type; a refused value is a one-line ConfigError."""

    def __init__(self, cls: type, field: dataclasses.Field) -> None:
        self.cls, self.field = cls, field
        self.name = field.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return parse_text(self.cls, self.field.name, value) if isinstance(value, str) else value  # defaults pass

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in spec_of(self.field).choices or () if c.startswith(incomplete)]


def _metavar(cls: type, field: dataclasses.Field) -> str:
    spec, kind = spec_of(field), kind_of(cls, field.name)
    if spec.metavar or spec.choices:
        return spec.metavar or f"[{'|'.join(spec.choices)}]"
    word = "LIST" if kind.is_list else {int: "INTEGER", float: "NUMBER"}.get(kind.types[0], "TEXT")
    return f"{word}|none" if kind.optional and word in ("INTEGER", "NUMBER") else word


def setting_option(cls: type, name: str) -> Callable:
    """One setting of a config as a click option: name, default, choices and help from its declaration."""
    field = field_of(cls, name)
    spec, default = spec_of(field), default_text(field)
    required = field.default is dataclasses.MISSING
    if field.default is True:
        default = f"--{name.replace('_', '-')}"
    shown = f"  [default: {default}]" if default is not None and field.default is not False else ""
    common: dict[str, Any] = {"help": spec.help + shown, "show_default": False, "envvar": spec.env}
    if kind_of(cls, name).types == (bool,):
        return click.option(option_name(field), name, is_flag=True, default=field.default, **common)
    return click.option(option_name(field), name, type=SettingType(cls, field), metavar=_metavar(cls, field),
                        required=required, default=None if required else field.default, **common)


def setting_options(cls: type) -> Callable:
    """Every setting of a config as click options, required ones first."""

    def decorate(command: Callable) -> Callable:
        for field in reversed(ordered_fields(cls)):
            command = setting_option(cls, field.name)(command)
        return command

    return decorate


class Commands(click.Group):
    """The command group: a setting refused while click reads the command line is one line too, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        return reports_errors(super().invoke)(ctx)


@click.group(cls=Commands, context_settings=CONTEXT)
def main() -> None:
    """READ: extract a frozen backbone's hidden states once, then train recurrent side networks from them."""


@main.command(context_settings=CONTEXT)
@setting_options(ExtractConfig)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors(stopped="resumes")
def extract(quiet: bool, **options: Any) -> None:
    """Run a frozen backbone once over a GLUE task and store every layer's hidden states."""
    from pipeline.extraction import extract as run
    from pipeline.store import CacheStore

    path = run(ExtractConfig(**options), progress=not quiet)
    click.echo(CacheStore(path).completion_message())


@main.command(context_settings=CONTEXT)
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@reports_errors
def info(store: str, as_json: bool) -> None:
    """Summarise a store: backbone, task, splits, counts, dtype, bytes on disk, completeness."""
    from pipeline.store import summarize_store

    summary = summarize_store(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(summary["text"])


@main.command(context_settings=CONTEXT)
@click.argument("store")
@reports_errors
def verify(store: str) -> None:
    """Check every block is present and finite and the metadata is consistent; exit 1 if not."""
    from pipeline.store import verify_store

    problems = verify_store(store)
    if problems:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        sys.exit(1)
    click.echo(f"OK {store}")


@main.command(context_settings=CONTEXT)
@setting_options(TrainConfig)
@click.option("--quiet", is_flag=True, help="No progress output.")
@reports_errors(stopped="checkpoints")
def train(quiet: bool, **options: Any) -> None:
    """Train READ side networks (several seeds in lockstep) from a store, never loading the backbone."""
    from pipeline.training import train as run
    from pipeline.training.trainer import result_line

    click.echo(result_line(run(TrainConfig(**options), progress=not quiet)))


@main.command(context_settings=CONTEXT)
@click.option("--runs", "runs_dir", default="runs", help="Folder of run directories (<runs>/<task>/metrics.json).")
@click.option("--out", "out_dir", default="reports", help="Where summary.md and summary.png are written.")
@click.option("--tasks", default=None, help="Comma-separated run folders under --runs, in table order: a task's "
              "(cola), or one of a sweep's (cola-sweep/rnn_dim=32).  [default: every finished run under --runs]")
@reports_errors
def report(runs_dir: str, out_dir: str, tasks: str | None) -> None:
    """Summarise trained runs: one table over tasks and seeds (summary.md) and a plot (summary.png)."""
    from pipeline.common.settings import parse_list
    from pipeline.report import write_report

    result = write_report(runs_dir, out_dir, tasks=list(parse_list(tasks, name="--tasks") or []) or None)
    click.echo(result["markdown"])
    click.echo(f"wrote {result['paths']['markdown']} and {result['paths']['image']}")


@main.command(context_settings=CONTEXT)
@setting_option(TrainConfig, "cache")
@click.option("--grid", "grid_items", multiple=True, required=True, metavar="NAME=V1,V2",
              help="A train setting and its values; repeat for a product grid, e.g. --grid lr=1e-3,3e-4 --grid rnn-dim=64,256.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE", help="A fixed train setting for every run (repeatable).")
@setting_option(TrainConfig, "seeds")
@click.option("--out", default=None, help="Root folder of the runs.  [default: runs/<task>-sweep]")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler.  [default: a LocalCluster]")
@setting_option(SweepConfig, "workers")
@setting_option(SweepConfig, "threads_per_worker")
@setting_option(SweepConfig, "retrain")
@reports_errors(stopped="sweep")
def sweep(cache: str, grid_items: tuple[str, ...], settings: tuple[str, ...], seeds: tuple[int, ...], out: str | None,
          scheduler: str | None, workers: int, threads_per_worker: int, retrain: bool) -> None:
    """Train a grid of settings from one store, spread over Dask workers; print the runs best first."""
    from pipeline.common.errors import plural
    from pipeline.store import CacheStore
    from pipeline.training.sweep import parse_grid, parse_settings, run_sweep

    grid = parse_grid(grid_items)
    base = TrainConfig(cache=cache, seeds=seeds, **parse_settings(settings, grid))
    out_root = out or f"runs/{CacheStore(cache).meta.task.name}-sweep"
    rows = run_sweep(base, grid, out_root, scheduler=scheduler, workers=workers,
                     threads_per_worker=threads_per_worker, retrain=retrain)
    kept = sum(row["kept"] for row in rows)
    if kept:
        click.echo(f"kept {kept} finished {plural(kept, 'run')} of the same settings and store (marked *); "
                   "--retrain trains them again")
    click.echo(f"ranked by {rows[0]['ranked_by']} (mean over seeds); validation {rows[0]['primary_metric']} shown")
    for row in rows:
        spread = "" if row["std"] is None else f" ± {row['std']:5.2f}"
        click.echo(f"{row['rank_score']:7.2f}  |  {row['mean']:7.2f}{spread:8}  {row['run']}"
                   + (" *" if row["kept"] else ""))
    click.echo(f"summary: {out_root}/sweep.json")


@main.command(context_settings=CONTEXT)
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="PATH",
              help="An adapter folder (runs/T/adapters/seed_<k>) or a run folder meaning every seed; repeat it: "
              "every adapter shares one forward pass.")
@click.option("--task", default=None, help="GLUE task; must be the adapters'.  [default: the adapters' task]")
@click.option("--split", default=None, help="A GLUE split to predict (train, validation, test; MNLI: "
              "validation_matched, test_mismatched, ...), written in GLUE submission format (index and prediction "
              "columns); a labeled split also prints its official metric.")
@click.option("--glue-dir", envvar="GLUE_DIR", default=None,
              help="Local glue_data folder for --split; unset: the Hugging Face Hub.  [env: GLUE_DIR]")
@click.option("--input", "input_path", default=None, metavar="FILE|-",
              help="Text to predict: a TSV whose header names the task's text columns, or JSONL objects with those "
              "fields; - reads stdin.")
@click.option("--out", default="-", help="Where predictions go, written as the extension says: .tsv (.txt) "
              "tab-separated, .csv comma-separated, .jsonl (.json) JSON lines; - (stdout) or no extension: "
              "tab-separated for --split (as GLUE's server reads it), the input's format for --input; another "
              "extension is refused.")
@click.option("--ensemble", is_flag=True, help="One prediction from the mean class probabilities (STS-B: scores) of the adapters.")
@click.option("--model", default=None,
              help="Load the backbone from here instead of the adapters' base model (its revision must still match).")
@click.option("--limit", default=None, type=int, help="Only the first N examples.")
@click.option("--batch-tokens", default=16384, type=int, help="Padded tokens per forward batch (batches are built by length).")
@setting_option(ExtractConfig, "device")  # the backbone runs as the extraction ran it: bfloat16 on CUDA for a bfloat16 store
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def predict(input_path: str | None, quiet: bool, **options: Any) -> None:
    """Run trained adapters on a GLUE split or new text: the backbone's live states, exactly as the store holds them."""
    from pipeline.inference import PredictRequest, metric_lines, run_predict

    request = PredictRequest(input=input_path, **options)
    result = run_predict(request, progress=not quiet)
    if result.cut:  # about the user's text: said under --quiet too
        click.echo(f"note: {result.cut} of {result.examples} examples reached max_length ({result.max_length} tokens, "
                   "the adapters' extraction setting) and were cut to fit it, as in training", err=True)
    to_stderr = request.out == "-"  # stdout carries the predictions
    for line in metric_lines(result, request.split):
        click.echo(line, err=to_stderr)
    if not to_stderr:
        from pipeline.common.errors import plural

        click.echo(f"wrote {result.examples} {plural(result.examples, 'prediction')} ({result.task}) to {result.out}")


if __name__ == "__main__":
    main()
