"""DVC's last stage: one table and one picture over every task in params.yaml's ``tasks``.

    python -m stages.report [--runs runs] [--out reports] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys

from stages import read_params, run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of run directories (default: %(default)s)")
    parser.add_argument("--out", default="reports", help="where summary.md and summary.png go (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    args = parser.parse_args(argv)

    def body() -> None:
        from pipeline.report import write_report

        tasks = read_params(args.params).get("tasks")
        report = write_report(args.runs, args.out, tasks=list(tasks) if tasks else None)
        print(report["markdown"])
        print(f"wrote {report['paths']['markdown']} and {report['paths']['image']}")

    return run_stage(body, stopped="stage restarts")


if __name__ == "__main__":
    sys.exit(main())
