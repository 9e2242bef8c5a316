"""`pipeline`: the command line. Heavy imports happen inside commands so --help is instant."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def reports_errors(command: Callable) -> Callable:
    """Turn the pipeline's typed errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.common.errors import PipelineError

        try:
            return command(*args, **kwargs)
        except PipelineError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except FileNotFoundError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted; rerun the same command to resume.", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings=CONTEXT)
def main() -> None:
    """READ: extract a frozen backbone's hidden states once, then train recurrent side networks from them."""


@main.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="Hugging Face model id or local folder (T5, BERT-like encoder, or causal LM).")
@click.option("--task", required=True, help="GLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli.")
@click.option("--out", default=None, help="Store path (any fsspec URL zarr supports).  [default: data/<task>.zarr]")
@click.option("--glue-dir", envvar="GLUE_DIR", default=None,
              help="Local glue_data folder (<dir>/RTE/train.tsv ...); unset: the Hugging Face Hub.  [env: GLUE_DIR]")
@click.option("--splits", default=None, help="Comma-separated splits.  [default: every split the source has]")
@click.option("--max-length", default=256, type=int, help="Tokens per example after truncation.")
@click.option("--batch-tokens", default=16384, type=int, help="Padded tokens per forward batch.")
@click.option("--dtype", default="bfloat16", type=click.Choice(["bfloat16", "float32", "float16"]),
              help="Storage dtype (T5 refuses float16: it overflows).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--layers", default="all", help="'all' or a comma-separated list of state indices (0 = embeddings, -1 = final).")
@click.option("--tokens", default="all", type=click.Choice(["all", "pooled"]),
              help="all: every token's states; pooled: per layer the mean over tokens (a compact store).")
@click.option("--limit", default=None, type=int, help="Only the first N examples of each split.")
@click.option("--block-tokens", default=None, type=int, help="Rows per block and shard.  [default: about 128 MiB a shard]")
@click.option("--codec", default="blosc-zstd", type=click.Choice(["zstd", "blosc-zstd", "none"]), help="Lossless codec (blosc-zstd: bit shuffle + zstd; measured 1.38x on bf16 activations, zstd 1.26x).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store made with other settings.")
@click.option("--part", default=None, metavar="I/N",
              help="Extract only blocks j with j % N == I, so N processes (GPUs, hosts) fill one store together.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def extract(quiet: bool, **options: Any) -> None:
    """Run a frozen backbone once over a GLUE task and store every layer's hidden states."""
    from pipeline.common.config import ExtractConfig
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
@click.option("--cache", required=True, help="Store written by `pipeline extract` (the only input; the backbone is never loaded).")
@click.option("--out", default=None, help="Run directory.  [default: runs/<task>]")
@click.option("--seeds", default="0,1,2", help="Comma-separated seeds, trained in lockstep on the same batches.")
@click.option("--epochs", default=10, type=int)
@click.option("--method", default="read", type=click.Choice(["read", "probe"]),
              help="read: the recurrent side network; probe: a linear head on the frozen final state (baseline).")
@click.option("--rnn", default="gru", type=click.Choice(["gru", "rnn", "lstm"]), help="Recurrent cell over the layers.")
@click.option("--rnn-dim", default=256, type=int, help="Hidden size r of the side network.")
@click.option("--aggregate", default="mean", type=click.Choice(["mean", "last"]), help="Summary of the layer recurrence.")
@click.option("--h0", default="zero", type=click.Choice(["zero", "embedding"]), help="Initial RNN state.")
@click.option("--pooling", default="mean", type=click.Choice(["mean", "cls"]), help="Encoder family: pooling before the head.")
@click.option("--encoder-side/--no-encoder-side", default=True,
              help="Seq2seq: join the encoder side through its pooled summary (off: decoder side alone).")
@click.option("--dropout", default=0.1, type=float)
@click.option("--lr", default=1e-3, type=float, help="Peak AdamW learning rate.")
@click.option("--weight-decay", default=0.01, type=float)
@click.option("--warmup-ratio", default=0.06, type=float, help="Share of steps for linear warm-up (then linear decay).")
@click.option("--batch-size", default=32, type=int)
@click.option("--patience", default=5, type=int, help="Epochs without improvement before a seed's best is final (0: never stop early).")
@click.option("--max-grad-norm", default=1.0, type=float, help="Gradient clipping, per seed.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--memory-budget", default="8GB", help="Splits larger than this are streamed from the store by block.")
@click.option("--train-split", default="train")
@click.option("--eval-splits", default=None, help="Comma-separated.  [default: the task's validation split(s)]")
@click.option("--data-seed", default=0, type=int, help="Seed of the batch order (shared by all seeds).")
@click.option("--shuffle-buffer", default=8, type=int, help="Streaming: blocks mixed in memory at once.")
@click.option("--threads", default=None, type=int, help="Torch CPU threads.  [default: torch's own]")
@click.option("--quiet", is_flag=True, help="No progress output.")
@reports_errors
def train(quiet: bool, patience: int, **options: Any) -> None:
    """Train READ side networks (several seeds in lockstep) from a store, never loading the backbone."""
    from pipeline.common.config import TrainConfig
    from pipeline.training import train as run

    metrics = run(TrainConfig(patience=patience or None, **options), progress=not quiet)
    mean, std = metrics["mean"], metrics["std"]
    shown = ", ".join(f"{m} {mean[m]:.2f} ± {std[m]:.2f}" for m in mean if "/" not in m)
    click.echo(f"{metrics['task']} ({metrics['method']}, {metrics['num_seeds']} seeds): {shown}")


@main.command(context_settings=CONTEXT)
@click.option("--runs", "runs_dir", default="runs", help="Folder of run directories (<runs>/<task>/metrics.json).")
@click.option("--out", "out_dir", default="reports", help="Where summary.md and summary.png are written.")
@click.option("--tasks", default=None, help="Comma-separated tasks, in table order.  [default: every run under --runs]")
@reports_errors
def report(runs_dir: str, out_dir: str, tasks: str | None) -> None:
    """Summarise trained runs: one table over tasks and seeds (summary.md) and a plot (summary.png)."""
    from pipeline.common.config import parse_list
    from pipeline.report import write_report

    result = write_report(runs_dir, out_dir, tasks=list(parse_list(tasks) or []) or None)
    click.echo(result["markdown"])
    click.echo(f"wrote {result['paths']['markdown']} and {result['paths']['image']}")


@main.command(context_settings=CONTEXT)
@click.option("--cache", required=True, help="Store written by `pipeline extract`.")
@click.option("--grid", "grid_items", multiple=True, required=True, metavar="NAME=V1,V2",
              help="A train setting and its values; repeat for a product grid, e.g. --grid lr=1e-3,3e-4 --grid rnn-dim=64,256.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE", help="A fixed train setting for every run (repeatable).")
@click.option("--seeds", default="0,1,2", help="Seeds of every run (trained in lockstep within a run).")
@click.option("--out", default=None, help="Root folder of the runs.  [default: runs/<task>-sweep]")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler.  [default: a LocalCluster]")
@click.option("--workers", default=2, type=int, help="LocalCluster worker processes.")
@click.option("--threads-per-worker", default=1, type=int, help="LocalCluster threads (torch threads) per worker.")
@reports_errors
def sweep(cache: str, grid_items: tuple[str, ...], settings: tuple[str, ...], seeds: str, out: str | None,
          scheduler: str | None, workers: int, threads_per_worker: int) -> None:
    """Train a grid of settings from one store, spread over Dask workers; print the runs best first."""
    from pipeline.common.config import TrainConfig
    from pipeline.store import CacheStore
    from pipeline.training.sweep import parse_grid, run_sweep

    fixed = {k: v[0] for k, v in parse_grid(settings).items()} if settings else {}
    base = TrainConfig(cache=cache, seeds=seeds, **fixed)
    out_root = out or f"runs/{CacheStore(cache).meta['task']['name']}-sweep"
    rows = run_sweep(base, parse_grid(grid_items), out_root, scheduler=scheduler, workers=workers,
                     threads_per_worker=threads_per_worker)
    for row in rows:
        click.echo(f"{row['mean']:7.2f} ± {row['std']:5.2f}  {row['primary_metric']}  {row['run']}")
    click.echo(f"summary: {out_root}/sweep.json")


@main.command(context_settings=CONTEXT)
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="PATH",
              help="An adapter folder (runs/T/adapters/seed_<k>) or a run folder meaning every seed; repeat it: "
              "every adapter shares one forward pass.")
@click.option("--task", default=None, help="GLUE task; must be the adapters'.  [default: the adapters' task]")
@click.option("--split", default=None, help="A GLUE split to predict, written in GLUE submission format "
              "(index<TAB>prediction); a labeled split also prints its official metric.")
@click.option("--glue-dir", envvar="GLUE_DIR", default=None,
              help="Local glue_data folder for --split; unset: the Hugging Face Hub.  [env: GLUE_DIR]")
@click.option("--input", "input_path", default=None, metavar="FILE|-",
              help="Text to predict: a TSV whose header names the task's text columns, or JSONL objects with those "
              "fields; - reads stdin.")
@click.option("--out", default="-", help="Where predictions go (.tsv or .jsonl for --input; - is stdout).")
@click.option("--ensemble", is_flag=True, help="One prediction from the mean class probabilities (STS-B: scores) of the adapters.")
@click.option("--model", default=None,
              help="Load the backbone from here instead of the adapters' base model (its revision must still match).")
@click.option("--limit", default=None, type=int, help="Only the first N examples.")
@click.option("--batch-tokens", default=16384, type=int, help="Padded tokens per forward batch (batches are built by length).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (the backbone runs as the extraction ran it: bfloat16 on CUDA for a bfloat16 store).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def predict(input_path: str | None, quiet: bool, **options: Any) -> None:
    """Run trained adapters on a GLUE split or new text: the backbone's live states, exactly as the store holds them."""
    from pipeline.inference import PredictRequest, metric_lines, run_predict

    request = PredictRequest(input=input_path, **options)
    result = run_predict(request, progress=not quiet)
    to_stderr = request.out == "-"  # stdout carries the predictions
    for line in metric_lines(result, request.split):
        click.echo(line, err=to_stderr)
    if not to_stderr:
        click.echo(f"wrote {result.examples} predictions ({result.task}) to {result.out}")


if __name__ == "__main__":
    main()
