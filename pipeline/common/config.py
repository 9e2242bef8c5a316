"""One frozen config per stage; the same field names in params.yaml, the CLI and the store.

Each field is the single declaration of its setting (type, default, allowed values, help; see
``pipeline.common.settings``): the CLI options, the checks and the README's table all come from here.
Cross-setting checks live in ``__post_init__`` and do no I/O, so a bad setting fails before any work.

    python -m pipeline.common.config --markdown                # print the README's tables of settings
    python -m pipeline.common.config --update-readme README.md # put them between the README's markers
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.errors import ConfigError
from pipeline.common.settings import (
    FRACTION,
    Settings,
    above,
    at_least,
    from_mapping,
    parse_list,
    parse_size,
    setting,
    settings_table,
)
from pipeline.common.tasks import TASKS

__all__ = [
    "AGGREGATES", "CELLS", "DTYPES", "H0_OPTIONS", "METHODS", "POOLINGS", "SELECT_ON", "ExtractConfig", "SideConfig",
    "SweepConfig", "TrainConfig", "from_mapping", "parse_list", "parse_size", "readme_settings", "with_readme_settings",
]

DTYPES = ("bfloat16", "float32", "float16")
METHODS = ("read", "probe")
CELLS = ("gru", "rnn", "lstm")
AGGREGATES = ("mean", "last")
H0_OPTIONS = ("zero", "embedding")
POOLINGS = ("mean", "cls")
OUT_INITS = ("zeros", "linear")
SELECT_ON = ("selection", "validation")


def device_setting() -> Any:
    """Both stages' ``device``: one declaration, a fresh field for each class."""
    return setting("auto", "Where to run: auto (CUDA if available), cpu, cuda, cuda:N or mps.",
                   pattern=r"auto|cpu|cuda(:\d+)?|mps", allowed="auto, cpu, cuda, cuda:N or mps")


def size_setting(default: str, help: str) -> Any:
    """A number of bytes, given as a size such as 8GB or 512MiB."""
    return setting(default, help, parse=parse_size, allowed="a size such as 8GB or 512MiB, or a number of bytes",
                   metavar="SIZE")


def _parse_part(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"part {value!r} must be I/N with 0 <= I < N (I counts from 0), e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ExtractConfig(Settings):
    """Stage one: which backbone over which task, and how the store is laid out."""

    model: str = setting(help="Hugging Face model id or local folder (T5, BERT-like encoder, or causal LM).")
    task: str = setting(help=f"GLUE task: {' '.join(TASKS)}.")
    out: str | None = setting(None, "Store path (any fsspec URL zarr supports).", none="data/<task>.zarr")
    glue_dir: str | None = setting(
        None, "Local glue_data folder (<dir>/RTE/train.tsv ...).", none="$GLUE_DIR, else the Hugging Face Hub",
        env="GLUE_DIR")
    splits: tuple[str, ...] | None = setting(
        None, "Splits to extract, comma-separated: train, validation and test (MNLI: validation_matched, "
        "validation_mismatched, test_matched, test_mismatched).",
        none="train, the validation split(s), and test where the source has it",
        example="train,validation")
    max_length: int = setting(
        256, "Tokens per example at most. A longer one is cut as its family reads it: T5's input at its end (as T5's "
        "GLUE code cuts it), a sentence pair for an encoder longest sentence first, a decoder prompt longest field "
        "first, its answer cue kept.", bounds=at_least(2))
    batch_tokens: int = setting(16384, "Padded tokens per forward batch (batches are built by length).",
                                bounds=at_least(1))
    dtype: str = setting("bfloat16", "Storage dtype; bfloat16 is kept as uint16 bits (T5 refuses float16: it overflows).",
                         choices=DTYPES)
    device: str = device_setting()
    layers: tuple[int, ...] | None = setting(
        None, "States to keep: 'all' or a comma-separated list of state indices (0 = embeddings, -1 = final).",
        none="all: every state", example="0,-1")
    tokens: str = setting("all", "all: every token's states; pooled: per layer the masked mean over tokens (a compact store).",
                          choices=("all", "pooled"))
    limit: int | None = setting(None, "Only the first N examples of each split (smoke tests).", bounds=at_least(1),
                                none="every example", example="1500")
    block_tokens: int | None = setting(None, "Rows per block and shard.", bounds=at_least(1),
                                       none="about 128 MiB a shard", example="65536")
    codec: str = setting(
        "blosc-lz4", "Lossless codec for the states. On real bf16 activations (BENCHMARKS.md): blosc-lz4 (bit shuffle + "
        "LZ4) 1.34x smaller, and writes 2-3x faster a thread than blosc-zstd (bit shuffle + zstd, 1.40x), so a few "
        "writer threads keep up with a GPU's forward; zstd 1.26x; none stores raw bytes.",
        choices=("blosc-lz4", "blosc-zstd", "zstd", "none"))
    overwrite: bool = setting(False, "Replace an existing store made with other settings.")
    writers: int = setting(4, "Threads compressing and writing blocks in parallel (the store's bytes do not depend on it).",
                           bounds=at_least(1))
    part: str | None = setting(
        None, "Extract only blocks j with j % N == I, where I counts from 0, so N processes (GPUs, hosts) "
        "fill one store together: e.g. 0/2 and 1/2.", none="the whole store", metavar="I/N",
        allowed="I/N with 0 <= I < N")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_tokens < self.max_length:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens}) must be at least max_length ({self.max_length}) "
                "so the longest example fits in a batch"
            )
        if self.block_tokens is not None and self.block_tokens < self.max_length:
            raise ConfigError(f"block_tokens ({self.block_tokens}) must be at least max_length ({self.max_length})")
        if self.part is not None:
            _parse_part(self.part)
            if self.overwrite:
                raise ConfigError("--overwrite cannot be combined with --part: one part would delete the others' work")

    @property
    def part_index(self) -> tuple[int, int]:
        """(I, N) of --part I/N; (0, 1) when the whole store is this process's."""
        if self.part is None:
            return (0, 1)
        return _parse_part(self.part)

    @property
    def out_path(self) -> str:
        return self.out or f"data/{self.task.lower()}.zarr"


@dataclass(frozen=True, kw_only=True)
class SideConfig(Settings):
    """The side network's own settings: TrainConfig says what to train, ReadConfig records what was trained."""

    method: str = setting("read", "read: the recurrent side network; probe: a linear head on the frozen final state "
                          "(baseline).", choices=METHODS)
    rnn: str = setting("gru", "Recurrent cell over the layers.", choices=CELLS)
    rnn_dim: int = setting(128, "Hidden size r of the side network.", bounds=at_least(1))
    aggregate: str = setting("mean", "Summary of the layer recurrence: the mean of its states or the last one.",
                             choices=AGGREGATES)
    h0: str = setting("zero", "Initial RNN state: zero, or a projection of the embedding output (state 0).",
                      choices=H0_OPTIONS)
    pooling: str = setting("mean", "Encoder family: pooling over tokens before the head.", choices=POOLINGS)
    dropout: float = setting(0.1, "Dropout on the side network's summary, per seed.", bounds=FRACTION)
    encoder_side: bool = setting(True, "Seq2seq: join the encoder side through its pooled summary (off: the decoder "
                                 "side alone).")
    out_init: str = setting("zeros", "Output projection W_out at the start: zeros (the untrained network changes "
                            "nothing) or linear (nn.Linear's random init, as in the authors' code).", choices=OUT_INITS)
    out_scale: float = setting(1.0, "Factor on the correction, delta = out_scale * (W_out a + b_out) (the authors' code "
                               "tunes it with out_init=linear, e.g. 0.8551).", bounds=above(0))

    def side_settings(self) -> dict[str, Any]:
        """Just the SideConfig fields, to build a ReadConfig from a TrainConfig."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SideConfig)}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(SideConfig):
    """Stage two: READ side networks for several seeds, trained from a store alone."""

    cache: str = setting(help="Store written by `pipeline extract` (the only input; the backbone is never loaded).")
    out: str | None = setting(None, "Run directory.", none="runs/<task>")
    seeds: tuple[int, ...] = setting((0, 1, 2), "Seeds, comma-separated, trained in lockstep on the same batches.")
    epochs: int = setting(10, "Passes over the training split.", bounds=at_least(1))
    lr: float = setting(1e-3, "Peak AdamW learning rate.", bounds=above(0))
    weight_decay: float = setting(0.01, "AdamW weight decay.", bounds=at_least(0))
    warmup_ratio: float = setting(0.06, "Share of the steps for linear warm-up (then linear decay to 0).",
                                  bounds=FRACTION)
    batch_size: int = setting(32, "Examples per batch.", bounds=at_least(1))
    patience: int | None = setting(5, "Epochs without improvement before a seed's best is final; null (--patience "
                                   "none): never stop early.", bounds=at_least(1), none="never stop early")
    max_grad_norm: float = setting(1.0, "Gradient clipping, per seed.", bounds=above(0))
    device: str = device_setting()
    compile: bool = setting(
        False, "torch.compile the side network's training step (forward and backward): the gates of each layer "
        "step fuse into a few kernels. A one-off compile (about a minute) per run; for GPUs, where the eager step "
        "is bound by kernel launches, not arithmetic. Evaluation stays eager.")
    cuda_graphs: bool = setting(
        False, "On a CUDA device, replay each training step (forward, backward, clipping, AdamW) as a CUDA graph "
        "recorded from the eager step: one launch per step instead of one per kernel, with no compile (each batch "
        "shape's first step runs eagerly, its second is recorded). With --compile: the compiled step in "
        "torch.compile's reduce-overhead mode instead. Each batch's tokens are padded with dropped rows up to one of "
        "a few sizes (at most 1/8 more), so that a few graphs serve every batch. Ignored, with a note, without CUDA.")
    tf32: bool = setting(
        False, "On a CUDA device, float32 matrix products on TensorFloat-32 tensor cores (10-bit mantissa in the "
        "products, float32 sums; several times float32's speed from Ampere on), as Hugging Face's --tf32. Off: full "
        "float32, as on a CPU, which this setting leaves alone.")
    memory_budget: str | int = size_setting(
        "8GB", "Splits larger than this are streamed by block, not held on the training device (on a CPU: in memory). "
        "Streamed batches come in another order than held ones, so the two train different weights (each "
        "reproducible); a streamed split keeps about (--shuffle-buffer + 1) blocks in memory at once.")
    host_memory_budget: str | int = size_setting(
        "16GB", "On an accelerator, a streamed split (larger than --memory-budget) that fits this is read from the "
        "store once into pinned host memory, and each epoch copies its blocks to the device from there; a larger one "
        "is read and decoded from the store every epoch. Unused on a CPU, where --memory-budget is the host's.")
    train_split: str = setting("train", "Split to train on.")
    eval_splits: tuple[str, ...] | None = setting(None, "Splits to evaluate on, comma-separated; the first is the one reported (never the split trained on).",
                                                  none="the task's validation split(s)", example="validation")
    select_on: str = setting(
        "selection", "Split whose scores choose each seed's epoch, stop early and rank sweeps. selection: a fixed "
        "held-out part of the training split (10%, at most 1,000 examples, by a hash of the GLUE idx), never "
        "trained on; validation: the reported split itself (optimistic, labelled so in every output).",
        choices=SELECT_ON)
    data_seed: int = setting(0, "Seed of the batch order (shared by all seeds).", bounds=at_least(0))
    shuffle_buffer: int = setting(8, "Streaming: blocks mixed in memory at once (each about 128 MiB by default; "
                                  "lower it to bound a streamed run's memory).", bounds=at_least(1))
    threads: int | None = setting(
        None, "Torch CPU threads; 1 avoids oversubscription on small side networks and busy machines (measured 14x "
        "faster under load on 2 cores).", bounds=at_least(1), none="torch's own",
        example="1")
    checkpoint_seconds: float | None = setting(
        60.0, "Save the run's state to <out>/checkpoint.pt between two steps (within an epoch too) once this many "
        "seconds have passed since the last save (0: after every epoch only), so that the same command, rerun after a "
        "crash or Ctrl-C, goes on from there with the results of an uninterrupted run. Removed when the run's outputs "
        "are written.",
        bounds=at_least(0), none="never save", example="0")
    resume: bool = setting(
        True, "Go on from <out>/checkpoint.pt when a run of the same store and settings left it (--no-resume: start "
        "over, moving a checkpoint of these settings to <out>/checkpoint.discarded.pt, which no run reads). A checkpoint of "
        "other settings is moved to <out>/checkpoint.replaced.pt with a note naming what differs, over the one set "
        "aside before, and a run with its settings goes on from it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {list(self.seeds)}")

    def out_dir(self, task: str) -> str:
        return self.out or f"runs/{task}"


@dataclass(frozen=True)
class SweepConfig(Settings):
    """`pipeline sweep`'s own LocalCluster settings (each run's are TrainConfig's): bounded, since a cluster of
    zero workers never runs a task and the sweep would wait forever."""

    workers: int = setting(2, "LocalCluster worker processes.", bounds=at_least(1))
    threads_per_worker: int = setting(1, "Dask task threads per LocalCluster worker (each run's torch threads: --set threads=N).", bounds=at_least(1))
    retrain: bool = setting(False, "Train every grid point again, also those whose run folder holds a finished run of "
                            "the same settings from the same store (kept as they are by default).")


SETTINGS_BEGIN, SETTINGS_END = "<!-- settings:begin -->", "<!-- settings:end -->"


def readme_settings() -> str:
    """The README's settings section: one table per stage, generated so that it cannot drift."""
    return (
        "**`pipeline extract`**, params.yaml section `extract:`\n\n" + settings_table(ExtractConfig)
        + "\n**`pipeline train`**, params.yaml section `train:`\n\n" + settings_table(TrainConfig)
    )


def with_readme_settings(readme: str) -> str:
    """The README text with the generated tables between its settings markers."""
    head, begin, rest = readme.partition(SETTINGS_BEGIN)
    _, end, tail = rest.partition(SETTINGS_END)
    if not begin or not end:
        raise ConfigError(f"the README lacks the markers {SETTINGS_BEGIN} ... {SETTINGS_END}")
    return f"{head}{SETTINGS_BEGIN}\n{readme_settings()}{SETTINGS_END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(readme_settings())
    elif len(sys.argv) == 3 and sys.argv[1] == "--update-readme":
        path = Path(sys.argv[2])
        path.write_text(with_readme_settings(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        sys.exit("usage: python -m pipeline.common.config --markdown | --update-readme README.md")
