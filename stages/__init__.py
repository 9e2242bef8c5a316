"""The DVC stages: thin scripts that read ``params.yaml``, build a config and call the library.

``params.yaml`` holds one section per stage (``extract:``, ``train:``) whose keys are exactly the
fields of ``ExtractConfig`` / ``TrainConfig``, plus two top-level keys shared by the stages:
``tasks`` (what ``dvc.yaml`` loops over) and ``glue_dir`` (where the GLUE data is; null means
$GLUE_DIR, else the Hugging Face Hub). Per-task paths (``task``, ``out``, ``cache``) come from the
command line that ``dvc.yaml`` writes, so a stage never hard-codes a path its stage declares.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.common.errors import (
    ConfigError,
    DataNotFoundError,
    PipelineError,
    error_message,
    interrupted_message,
    one_line,
)
from pipeline.common.progress import close_bars

TOP_LEVEL = ("tasks", "glue_dir", "extract", "train")


def _yaml_loader() -> type:
    """PyYAML's safe loader, reading floats as YAML 1.2 does (and DVC, which writes `-S` values).

    PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string: the learning rate that
    `dvc exp run -S train.lr=1e-3` writes would reach TrainConfig as text.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file, its top-level keys checked (unknown ones refused, not ignored)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file {path}; run from the repository root or pass --params PATH")
    try:
        with open(path, encoding="utf-8") as handle:
            params = yaml.load(handle, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(params).__name__}")
    unknown = sorted(set(params) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; known: {list(TOP_LEVEL)}")
    return params


def _yaml_error_message(path: str | Path, exc: Exception) -> str:
    """One line for YAML that does not parse: where (line and column, counted from 1 as editors count), what, and
    the fix; PyYAML's own text spans several lines and points with a caret. What was left open (a bracket, a quote,
    a mapping) is named with the place it opens, which is where an unclosed bracket needs its fix."""
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, problem_mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if problem_mark is None:  # no position (e.g. a control character): PyYAML's own words
        return f"{path}: {one_line(str(exc))}; fix the YAML"
    fix = "indent with spaces, not tabs" if "'\\t'" in (problem or "") else "fix the YAML"
    where = f" from {at(context_mark)}" if context_mark is not None else ""
    opened = f" ({context}{where})" if context else ""
    return f"{path} {at(problem_mark)}: {problem}{opened}; {fix}"


def section(params: dict[str, Any], name: str, *, set_here: tuple[str, ...], top_level: tuple[str, ...] = (),
            path: str | Path) -> dict[str, Any]:
    """One stage's section; keys that the stage sets itself (per task, from dvc.yaml) or takes from the top
    level of the params file (``top_level``) are refused."""
    values = params.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: section {name!r} must be a mapping of settings, got {type(values).__name__}")
    misplaced = sorted(set(values) & set(top_level))
    if misplaced:
        raise ConfigError(f"{path}: {name}.{misplaced[0]} is a top-level setting; move it out of the {name!r} "
                          f"section to the top level of the file ({misplaced[0]}: ...)")
    clash = sorted(set(values) & set(set_here))
    if clash:
        raise ConfigError(
            f"{path}: {name}.{clash[0]} is set per task by dvc.yaml (--{clash[0].replace('_', '-')}); "
            f"remove it from the {name!r} section"
        )
    return dict(values)


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", required=True, help="GLUE task (one item of params.yaml's tasks)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_stage(body: Callable[[], None], *, stopped: str) -> int:
    """Run a stage body; typed errors and OS errors become one line on stderr and exit code 2.

    The same translation as the `pipeline` CLI (``error_message``); any other exception is a bug
    and keeps its traceback. Ctrl-C returns 130, saying what a rerun does (``stopped``: a key of
    ``errors.INTERRUPTED``: extraction resumes, training goes on from its checkpoint).
    """
    rerun = "`dvc repro`"
    try:
        try:
            body()
        finally:
            close_bars()  # a message below starts a line of its own, and no bar redraws itself after it
    except DataNotFoundError as exc:
        print(f"Error: {error_message(exc, rerun=rerun, stopped=stopped)}. In params.yaml: set glue_dir, e.g. "
              "`dvc exp run -S glue_dir=../shared/data/glue`, or export GLUE_DIR", file=sys.stderr)
        return 2
    except (PipelineError, OSError) as exc:
        print(f"Error: {error_message(exc, rerun=rerun, stopped=stopped)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(rerun, stopped), file=sys.stderr)
        return 130
    return 0
