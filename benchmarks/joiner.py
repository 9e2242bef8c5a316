"""The cache-compatible Joiner, measured: seq2seq READ with the encoder side joined vs the decoder side alone.

With a cache we cannot re-run the frozen decoder on a corrected encoder output, so the
encoder side reaches the decoder side only through its pooled summary (h_0 = tanh(W_e e)). This
script trains both variants from one seq2seq store (same seeds, same batches) and prints them side
by side. It needs a store of a real T5 (e.g. t5-base on a GPU):

    pipeline extract --model t5-base --task rte --out data/rte-t5.zarr
    python benchmarks/joiner.py --cache data/rte-t5.zarr --epochs 20
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError, mean_std, plural
from pipeline.common.settings import field_of, option_name, parse_text, show
from pipeline.store import CacheStore
from pipeline.training import train


def setting_reader(name: str):
    """An argparse type that reads a TrainConfig setting as declared (a bad value is argparse's usage error)."""

    def read(text: str):
        try:
            return parse_text(TrainConfig, name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a seq2seq (T5) store")
    for name in ("seeds", "epochs", "rnn_dim", "device"):  # read and defaulted as `pipeline train` does
        field = field_of(TrainConfig, name)
        parser.add_argument(option_name(field), type=setting_reader(name), default=field.default,
                            help=f"(default: {show(field.default)})")
    args = parser.parse_args()
    family = CacheStore(args.cache).meta.backbone.family
    if family != "seq2seq":
        parser.error(f"{args.cache} holds a backbone of the {family} family; the Joiner exists only for seq2seq "
                     "(T5) stores")
    base = TrainConfig(cache=args.cache, seeds=args.seeds, epochs=args.epochs, rnn_dim=args.rnn_dim, device=args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, joined in (("decoder side alone", False), ("encoder + decoder (pooled join)", True)):
            cfg = dataclasses.replace(base, encoder_side=joined, out=f"{tmp}/{int(joined)}")
            metrics = train(cfg, progress=False)
            primary = metrics["primary_metric"]
            rows.append((label, metrics["mean"][primary], metrics["std"][primary], metrics["trainable_parameters"],
                         metrics["resources"]["wall_time_s"], primary))
    print(f"| variant | {rows[0][5]} (mean ± std, {len(base.seeds)} {plural(len(base.seeds), 'seed')}) | trainable parameters | wall s |")
    print("|---|---:|---:|---:|")
    for label, mean, std, params, wall, _ in rows:
        print(f"| {label} | {mean_std(mean, std)} | {params:,} | {wall:.1f} |")


if __name__ == "__main__":
    main()
