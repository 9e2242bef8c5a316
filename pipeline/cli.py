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
        from pipeline.errors import PipelineError

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
@click.option("--codec", default="zstd", type=click.Choice(["zstd", "blosc-zstd", "none"]), help="Lossless codec.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def extract(quiet: bool, **options: Any) -> None:
    """Run a frozen backbone once over a GLUE task and store every layer's hidden states."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract as run

    path = run(ExtractConfig(**options), progress=not quiet)
    click.echo(f"store complete: {path}")


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


if __name__ == "__main__":
    main()
