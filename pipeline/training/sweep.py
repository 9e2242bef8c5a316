"""Hyper-parameter sweeps spread over Dask workers: a LocalCluster by default, or a running scheduler.

Each grid point is one ordinary `pipeline train` run (all its seeds in lockstep) writing its own run
directory; the store is read-only, so any number of workers can share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.common.config import SweepConfig, TrainConfig
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.common.files import atomic_write_text
from pipeline.common.settings import parse_text, show
from pipeline.training.checkpoint import CHECKPOINT_NAME, result_settings

SET_BY_SWEEP = ("cache", "out", "seeds")  # the sweep's own options, the same for every run
SAME_FOR_EVERY_POINT = ("select_on",)  # what the ranking compares on: varied, it would rank scores of two splits


def _assignments(items: Sequence[str], option: str, form: str) -> dict[str, str]:
    """['rnn-dim=8,16'] -> {'rnn_dim': '8,16'}: each name a TrainConfig setting the sweep does not set itself,
    given once."""
    found: dict[str, str] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"{option} {item!r} must look like {form}")
        if key in SET_BY_SWEEP:
            raise ConfigError(f"{option} {key}: the sweep's own --{key} sets it, the same for every run")
        settings = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SET_BY_SWEEP]
        if key not in settings:
            raise ConfigError(f"{option} {key!r}: no such train setting; the settings: {', '.join(sorted(settings))}")
        if key in found:
            raise ConfigError(f"{option} {key} is given twice ({found[key]!r} and {values!r}); give it once")
        found[key] = values
    return found


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """['lr=1e-3,3e-4', 'rnn=gru,lstm'] -> {'lr': [0.001, 0.0003], 'rnn': ['gru', 'lstm']}, read as declared.

    Each value once, as read (1e-3 and 0.001 are one value): a repeated one would train the same run folder twice,
    at once on two workers. An empty value ('1e-3,,3e-4') is a typo, not a value."""
    grid: dict[str, list[Any]] = {}
    for key, values in _assignments(items, "--grid", "name=v1,v2").items():
        if key in SAME_FOR_EVERY_POINT:
            raise ConfigError(f"--grid {key}: the points are ranked on one split, so it is the same for every point; "
                              f"give it once with --set {key.replace('_', '-')}=VALUE")
        texts = values.split(",")
        if any(not text.strip() for text in texts):
            raise ConfigError(f"--grid {key}={values} has an empty value; write one comma between two values, "
                              f"e.g. {key}={','.join(t.strip() for t in texts if t.strip())}")
        grid[key], said = [], []
        for text in texts:
            value = parse_text(TrainConfig, key, text.strip())  # 'train, x': the space is no part of the value
            if value in grid[key]:
                first = said[grid[key].index(value)].strip()
                spellings = f" ({first} and {text.strip()})" if first != text.strip() else ""
                raise ConfigError(f"--grid {key} lists {show(value)} twice{spellings}; give each value once")
            grid[key].append(value)
            said.append(text)
    return grid


def parse_settings(items: Sequence[str], grid: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """['epochs=3', 'eval_splits=a,b'] -> {'epochs': 3, 'eval_splits': ('a', 'b')}: one value each, read as declared;
    none of them one that ``grid`` varies."""
    fixed = _assignments(items, "--set", "name=value")
    both = [key for key in fixed if key in (grid or {})]
    if both:
        raise ConfigError(f"{', '.join(both)}: both in --grid and in --set; a setting is either varied or fixed")
    return {key: parse_text(TrainConfig, key, value.strip()) for key, value in fixed.items()}


def expand(base: TrainConfig, grid: dict[str, list[Any]], out_root: str) -> list[tuple[str, TrainConfig]]:
    """Every combination of the grid, each with its own run directory named after its values."""
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "-".join(f"{k}={v}" for k, v in zip(keys, values)) or "base"
        runs.append((name, dataclasses.replace(base, out=str(Path(out_root) / name), **dict(zip(keys, values)))))
    return runs


def finished_run(cfg: TrainConfig, fingerprint: str) -> dict[str, Any] | None:
    """metrics.json of a run that finished in ``cfg.out`` with exactly these settings from this store, else None.

    Finished: its config.json records these settings (but those that change how a run goes, not what it computes:
    the store's path, threads, device, budgets) and its metrics.json this store, and no checkpoint is left (a run
    removes it only once every output is written)."""
    out = Path(cfg.out)  # a sweep names every point's folder
    try:
        config = json.loads((out / "config.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    recorded = config.get("train")
    same = (isinstance(recorded, dict) and result_settings(recorded) == result_settings(cfg.to_dict())
            and metrics.get("fingerprint") == fingerprint)  # the store: by its fingerprint, not its path
    return metrics if same and not (out / CHECKPOINT_NAME).exists() else None


def local_cluster(workers: int, threads_per_worker: int) -> Any:
    """A LocalCluster of worker processes that ignore Ctrl-C: a terminal sends SIGINT to the whole process group,
    and the sweep itself stops them by closing the cluster, so each would only print its KeyboardInterrupt
    traceback before the one line that says what a rerun does. They start with SIGINT ignored, which Python then
    keeps (it installs its Ctrl-C handler only where SIGINT is not ignored at start-up)."""
    from distributed import LocalCluster

    # The workers' own log lines are not the user's news: a failed point is the CLI's one line, and closing the
    # cluster under the points still running (after a failure, on Ctrl-C) logs cancelled tasks and lost
    # heartbeats with tracebacks. A bug still reaches the client, which raises it with its traceback.
    # The dashboard on any free port: None means the default 8787, and a second cluster warned that it was taken.
    def start() -> Any:
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                            dashboard_address=":0", silence_logs=logging.CRITICAL)

    # Workers stopped mid-run leave semaphores that multiprocessing's resource tracker (started here, with the
    # workers) removes at exit, warning about each: cleaned up, so no news either.
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    env = {"PYTHONWARNINGS": ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), quiet)))}
    main = threading.current_thread() is threading.main_thread()  # signal handlers are the main thread's
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        with _environ(env):
            return start()
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set while the block runs (for the processes it starts), then as it was."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train_quietly(cfg: TrainConfig) -> dict[str, Any] | PipelineError | OSError:
    """One grid point's metrics, or its expected failure returned as a value: raised, the Dask worker would log it
    with its traceback (on the worker's stderr, which is the sweep's for a LocalCluster) before the client's one-line
    message. Anything else is a bug and is raised, traceback and all."""
    from pipeline.training import train

    try:
        return train(cfg, progress=False)
    except (PipelineError, OSError) as error:
        return error


def _point_result(name: str, result: dict[str, Any] | PipelineError | OSError) -> dict[str, Any]:
    """The metrics of a grid point, or its failure raised here, its message naming the point (``name``)."""
    if isinstance(result, PipelineError):
        result.args = (f"{name}: {result}",)  # the one line the CLI prints: which point, then what
    if isinstance(result, BaseException):
        raise result
    return result


def run_sweep(
    base: TrainConfig,
    grid: dict[str, list[Any]],
    out_root: str,
    *,
    scheduler: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    retrain: bool = False,
) -> list[dict[str, Any]]:
    """Train every grid point on Dask workers; write and return one summary row per point.

    A point whose run folder holds a finished run of the same settings and store is kept as it is (``retrain``:
    trained again), so a sweep rerun after a crash trains only what had not finished; a stopped point goes
    on from its checkpoint."""
    from distributed import Client, as_completed

    from pipeline.store import CacheStore

    SweepConfig(workers=workers, threads_per_worker=threads_per_worker)  # refused here, not by a cluster that waits
    runs = expand(base, grid, out_root)
    fingerprint = CacheStore(base.cache).fingerprint
    kept = {} if retrain else {name: m for name, cfg in runs if (m := finished_run(cfg, fingerprint)) is not None}
    rows = [summary_row(name, cfg, grid, kept[name], kept=True) for name, cfg in runs if name in kept]
    runs = [(name, cfg) for name, cfg in runs if name not in kept]
    if not runs:
        return _ranked(rows, out_root)
    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = local_cluster(workers, threads_per_worker)
        client = Client(cluster)
    try:
        futures = {client.submit(_train_quietly, cfg, pure=False): (name, cfg) for name, cfg in runs}
        for future in as_completed(futures):
            name, cfg = futures[future]
            rows.append(summary_row(name, cfg, grid, _point_result(name, future.result()), kept=False))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return _ranked(rows, out_root)


def summary_row(name: str, cfg: TrainConfig, grid: dict[str, list[Any]], metrics: dict[str, Any],
                kept: bool) -> dict[str, Any]:
    """sweep.json's row of one grid point; ``kept``: its finished run was kept, not trained again."""
    return {"run": name, "out": cfg.out, **{k: getattr(cfg, k) for k in grid},
            "primary_metric": metrics["primary_metric"],
            "mean": metrics["mean"][metrics["primary_metric"]],
            "std": metrics["std"][metrics["primary_metric"]],
            "ranked_by": metrics["select_metric"],
            "rank_score": metrics["mean"][metrics["select_metric"]],
            "kept": kept}


def _ranked(rows: list[dict[str, Any]], out_root: str) -> list[dict[str, Any]]:
    """The rows best first, written to sweep.json. The winner is chosen on the selection split (the same one that
    chose each run's epochs), never on the reported validation scores, unless select_on=validation says so."""
    rows = sorted(rows, key=lambda r: -r["rank_score"])
    Path(out_root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_root) / "sweep.json", json.dumps(rows, indent=2) + "\n")
    return rows
