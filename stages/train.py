"""DVC stage two: the ``train`` section of params.yaml -> READ side networks for one task's store.

    python -m stages.train --task rte --cache data/rte.zarr --out runs/rte [--params params.yaml]

Reads only the store; writes metrics.json, scores.json, history.csv, predictions and per-seed adapters to --out.
"""

from __future__ import annotations

import sys
from typing import Any

from stages import read_params, run_stage, section, stage_parser


def train_config(params: dict[str, Any], cache: str, out: str | None, *, path: str = "params.yaml"):
    """TrainConfig from the ``train`` section and the per-task paths."""
    from pipeline.common.config import TrainConfig, from_mapping

    values = section(params, "train", set_here=("cache", "out"), path=path)
    values.update(cache=cache, out=out)
    return from_mapping(TrainConfig, values)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="the task's store (default: data/<task>.zarr)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<task>)")
    args = parser.parse_args(argv)

    def body() -> None:
        from pipeline.training import train
        from pipeline.training.trainer import result_line

        cache = args.cache or f"data/{args.task}.zarr"
        cfg = train_config(read_params(args.params), cache, args.out or f"runs/{args.task}", path=args.params)
        print(result_line(train(cfg, progress=not args.quiet)))

    return run_stage(body, stopped="stage checkpoints")


if __name__ == "__main__":
    sys.exit(main())
