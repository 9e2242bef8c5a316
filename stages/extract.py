"""DVC stage one: the ``extract`` section of params.yaml -> one task's activation store.

    python -m stages.extract --task rte --out data/rte.zarr [--params params.yaml]

The store is a ``persist: true`` output in dvc.yaml, so a killed extraction resumes where it
stopped (re-extracting any block whose shards were damaged). A store left by other settings (say,
another model), other data or an older format is stale for DVC; it is replaced. Anything at the
path that is not a READ store is refused, never deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

from stages import read_params, run_stage, section, stage_parser

log = logging.getLogger("stages.extract")


def extract_config(params: dict[str, Any], task: str, out: str | None, *, path: str = "params.yaml"):
    """ExtractConfig from the ``extract`` section, the top-level ``glue_dir`` and the per-task paths."""
    from pipeline.common.config import ExtractConfig, from_mapping

    values = section(params, "extract", set_here=("task", "out"), top_level=("glue_dir",), path=path)
    values.update(task=task, out=out, glue_dir=params.get("glue_dir"))
    return from_mapping(ExtractConfig, values)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="store path (default: data/<task>.zarr)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> None:
        from pipeline.common.errors import StoreMismatchError
        from pipeline.extraction import extract
        from pipeline.store import CacheStore

        cfg = extract_config(read_params(args.params), args.task, args.out, path=args.params)
        try:
            path = extract(cfg, progress=not args.quiet)
        except StoreMismatchError as exc:
            # The same store resumes; other settings or data mean DVC wants a new output: start afresh.
            log.info("%s; replacing it with a store of the current params and data", exc.what)
            path = extract(dataclasses.replace(cfg, overwrite=True), progress=not args.quiet)
        print(CacheStore(path).completion_message())

    return run_stage(body, stopped="resumes")


if __name__ == "__main__":
    sys.exit(main())
