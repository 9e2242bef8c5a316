"""The aggregate report after training: one table over tasks and seeds, and one picture.

Reads only what stage two wrote (``runs/<task>/metrics.json`` and ``history.csv``) and writes
``reports/summary.md`` (a Markdown table: per task the primary metric of every seed, mean ± std,
the other metrics, best epochs, time and memory) and ``reports/summary.png`` (per task the seeds'
scores around their mean, and the validation curves per epoch), so nobody has to read JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.common.errors import RunFormatError, mean_std, plural
from pipeline.common.files import atomic_write_bytes, atomic_write_text, check_writable_folder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# pipeline.training.checkpoint.CHECKPOINT_NAME and pipeline.training.adapter.WRITING_MARKER, not imported: the
# report reads outputs and never imports torch.
CHECKPOINT_NAME = "checkpoint.pt"
WRITING_MARKER = ".writing"


def load_run(run_dir: Path) -> dict[str, Any]:
    """One task's metrics.json plus its history.csv (a list of rows), as stage two wrote them."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: " + (_not_a_run(run_dir) or "train that task first (`pipeline train "
                                                  f"--cache data/{run_dir.name}.zarr` or `dvc repro`)"))
    metrics = _read_metrics(path)
    history = _read_history(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []
    return {"dir": str(run_dir), "metrics": metrics, "history": history}


def _damaged(path: Path, problem: str) -> RunFormatError:
    """The one-line refusal of a run's file that is not as training writes it: the file, the fault, the fix."""
    run_dir = path.parent
    return RunFormatError(
        f"{path}: {problem} (a run's {path.name} as `pipeline train` writes it); rerun the training that wrote it "
        f"(`pipeline train --cache data/<task>.zarr --out {run_dir}` or `dvc repro`), or remove {run_dir}"
    )


def _read_history(path: Path) -> list[dict[str, float | str]]:
    """history.csv's rows, empty cells left out; a row cut short or with cells beyond the header is refused in one
    line, since the curves would otherwise fail with a traceback (a file cut short ends in such a row)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for row in reader:
                cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                if cells != len(reader.fieldnames or []):
                    raise _damaged(path, f"line {reader.line_num} has {cells} cells, the header "
                                         f"{len(reader.fieldnames or [])}: damaged or cut short")
                parsed = {k: _number(v) for k, v in row.items() if v != ""}
                if not isinstance(parsed.get("epoch"), float):
                    raise _damaged(path, f"line {reader.line_num} has no epoch number")
                rows.append(parsed)
    except UnicodeDecodeError as exc:
        raise _damaged(path, f"not UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise _damaged(path, f"not CSV ({exc})") from None
    return rows


def _number(text: str) -> float | str:
    """A history cell: a number, or text such as the select_on column's split name."""
    try:
        return float(text)
    except ValueError:
        return text


def _score(row: dict[str, float | str], column: str) -> float:
    """A history cell as a number; NaN when empty or text (a hand edit), so the curve has a gap there, not a crash."""
    value = row.get(column)
    return value if isinstance(value, float) else math.nan


def _read_metrics(path: Path) -> dict[str, Any]:
    """metrics.json, refused in one line naming the file, the fault and the fix when it is not as training writes it.

    A file cut short or edited by hand would otherwise fail deep in the table with a traceback. Checked here, once:
    what the report reads (``primary_metric``, ``mean``, ``std``, ``seeds``, and the optional parts when present);
    older runs, without ``task``, ``select_on``, ``frozen_start`` or ``resources``, still pass.
    """
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise _damaged(path, f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        where = f"{exc.msg}: line {exc.lineno}, column {exc.colno}"
        raise _damaged(path, f"not valid JSON, damaged or cut short ({where})") from None
    if not isinstance(metrics, dict):
        raise _damaged(path, f"a JSON {_json_type(metrics)} where an object was expected")
    for key in ("primary_metric", "mean", "std", "seeds"):
        if key not in metrics:
            raise _damaged(path, f"no {key!r}")
    primary = metrics["primary_metric"]
    if not isinstance(primary, str):
        raise _damaged(path, f"'primary_metric' is {primary!r}, not a metric's name")
    if metrics.get("task") is not None and not isinstance(metrics["task"], str):
        raise _damaged(path, f"'task' is {metrics['task']!r}, not a task's name")
    if not isinstance(metrics["seeds"], dict):
        raise _damaged(path, f"'seeds' is a JSON {_json_type(metrics['seeds'])}, "
                             "not an object of seed number to scores")
    for seed in metrics["seeds"]:
        try:
            int(seed)
        except ValueError:
            raise _damaged(path, f"'seeds' has the key {seed!r}, not a seed number such as '0'") from None
    frozen = metrics.get("frozen_start")
    # Each object the table reads (name, value, whether it may be absent) and the figures of it that it prints.
    read: list[tuple[str, Any, bool, list[str] | None]] = [
        ("", metrics, False, ["trainable_parameters"]),
        ("mean", metrics["mean"], False, None),  # every metric's mean is printed
        ("std", metrics["std"], False, [primary]),
        *((f"seeds.{seed}", values, False, [primary]) for seed, values in metrics["seeds"].items()),
        ("frozen_start", frozen, True, []),
        ("frozen_start.mean", frozen.get("mean") if isinstance(frozen, dict) else None, True, [primary]),
        ("majority_baseline", metrics.get("majority_baseline"), True, [primary]),
        ("resources", metrics.get("resources"), True, list(_RESOURCE_FIGURES)),
    ]
    for name, values, optional, figures in read:
        if values is None and optional:
            continue
        if not isinstance(values, dict):
            raise _damaged(path, f"{name!r} is a JSON {_json_type(values)}, not an object")
        for key in values if figures is None else [f for f in figures if f in values]:
            if not _is_number(values[key]):
                label = f"{name}.{key}" if name else key
                raise _damaged(path, f"{label!r} is {values[key]!r}, not a number")
    return metrics


_RESOURCE_FIGURES = ("wall_time_s", "peak_rss_mb", "cuda_max_allocated_mb", "energy_j", "cpu_energy_j", "gpu_energy_j")


def _is_number(value: Any) -> bool:
    """A score or figure the table formats: a number, or null for one not measured."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value, as a person who edited the file would call it."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def discover_tasks(runs_dir: Path) -> list[str]:
    """Every folder of ``runs_dir`` with a metrics.json, by name; one note on stderr per folder passed over and why.

    An unfinished run (a checkpoint, no metrics.json yet) and a sweep's folder (its runs one level down) are left
    out of the table, but said, so that a missing row is never a surprise.
    """
    if not runs_dir.is_dir():
        return []
    names = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if (folder / "metrics.json").is_file():
            names.append(folder.name)
        elif why := _not_a_run(folder):
            print(f"note: {folder} left out: {why}", file=sys.stderr)
    return names


def _not_a_run(folder: Path) -> str | None:
    """What a folder without metrics.json is, and what to do, when it is a run not finished or a sweep's folder."""
    if (folder / CHECKPOINT_NAME).is_file():
        return (f"an unfinished run ({CHECKPOINT_NAME}, no metrics.json yet); rerun its `pipeline train` command (it "
                "goes on from the checkpoint), then the report")
    if (folder / "adapters" / WRITING_MARKER).is_file():
        return ("an unfinished run (stopped while it wrote its outputs: no metrics.json); rerun its `pipeline train` "
                "command, then the report")
    if points := sorted(p.parent.name for p in folder.glob("*/metrics.json")):
        sweep = folder / "sweep.json"
        ranking = f", or read {sweep} for their ranking" if sweep.is_file() else ""
        return (f"a sweep of {len(points)} {plural(len(points), 'run')}; pass --tasks '{folder.name}/{points[0]}' "
                f"(a run's folder under it) to report one{ranking}")
    return None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows of the table, one per run folder: its task's primary metric per seed, mean, std and the rest.

    A row is named by the task its metrics.json records, and by its folder too when that is another name (a
    variant's folder, say). The average is over tasks, so it is given only when it compares like with like: no
    task has two rows, and every row has one method, backbone and epoch selection (see ``_no_average_reason``).
    """
    seeds = sorted({int(s) for run in runs.values() for s in run["metrics"]["seeds"]})
    rows = []
    for folder, run in runs.items():
        m = run["metrics"]
        primary = m["primary_metric"]
        per_seed = {int(s): values.get(primary) for s, values in m["seeds"].items()}
        resources = m.get("resources") or {}
        task = m.get("task", folder)
        rows.append({
            "run": folder,
            "task": task if task == folder else f"{task} ({folder})",
            "task_name": task,
            "metric": primary,
            "method": m.get("method"),
            "backbone": m.get("backbone"),
            "seeds": per_seed,
            "num_seeds": len(per_seed),
            "mean": m["mean"].get(primary),
            "std": m["std"].get(primary),
            "other": {k: v for k, v in m["mean"].items() if k != primary},
            "best_epochs": {int(s): values.get("best_epoch") for s, values in m["seeds"].items()},
            "select_on": m.get("select_on", "validation"),  # runs from before the selection split chose on validation
            "frozen": (m.get("frozen_start") or {}).get("mean", {}).get(primary),
            "frozen_meaning": (m.get("frozen_start") or {}).get("meaning"),
            "majority": (m.get("majority_baseline") or {}).get(primary),
            "epochs_run": m.get("epochs_run"),
            "trainable_parameters": m.get("trainable_parameters"),
            "wall_time_s": resources.get("wall_time_s"),
            "peak_rss_mb": resources.get("peak_rss_mb"),
            "cuda_max_allocated_mb": resources.get("cuda_max_allocated_mb"),
            "energy_j": _energy(resources),
        })
    for r in rows:
        floors = [v for v in (r["frozen"], r["majority"]) if v is not None]
        r["above_start"] = None if r["mean"] is None or not floors else r["mean"] > max(floors)
    means = [r["mean"] for r in rows if r["mean"] is not None]
    no_average = _no_average_reason(rows)
    return {
        "seeds": seeds,
        "rows": rows,
        "average": sum(means) / len(means) if means and no_average is None else None,
        "no_average": no_average,
        "total_wall_time_s": sum(r["wall_time_s"] or 0.0 for r in rows),
    }


def _no_average_reason(rows: list[dict[str, Any]]) -> str | None:
    """Why an average over these rows would mislead, or None: it must be one score per task, all made one way.

    A mean over a probe's row and READ's rows, or over an epoch chosen on validation and epochs chosen on the
    selection split, is a number of no method.
    """
    tasks = [r["task_name"] for r in rows]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        return f"{', '.join(repeated)} {'has' if len(repeated) == 1 else 'have'} more than one run here"
    for key, what in (("method", "methods"), ("backbone", "backbones"), ("select_on", "epoch selections")):
        values = sorted({str(r[key]) for r in rows if r[key] is not None})  # None: a run too old to say
        if len(values) > 1:
            return f"the rows mix {what} ({', '.join(values)})"
    return None


def _energy(resources: dict[str, Any]) -> float | None:
    parts = [resources.get(k) for k in ("energy_j", "cpu_energy_j", "gpu_energy_j")]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def seed_counts(rows: list[dict[str, Any]]) -> str:
    """How many seeds the rows have: one number when they agree, else the range (each row's n is shown with it)."""
    counts = sorted({r["num_seeds"] for r in rows})
    if len(counts) == 1:
        return f"{counts[0]} {plural(counts[0], 'seed')}"
    return f"{counts[0]}-{counts[-1]} seeds"


def markdown(summary: dict[str, Any]) -> str:
    rows, seeds = summary["rows"], summary["seeds"]
    uneven = len({r["num_seeds"] for r in rows}) > 1
    backbones = sorted({str(r["backbone"]) for r in rows})
    methods = sorted({str(r["method"]) for r in rows})
    gpu = any(r["cuda_max_allocated_mb"] for r in rows)
    energy = any(r["energy_j"] for r in rows)
    lines = [
        "# READ results",
        "",
        f"Backbone {', '.join(backbones)}; method {', '.join(methods)}; {seed_counts(rows)}"
        f"{' (per task: n in the mean column)' if uneven else ''}. "
        "Validation score of each seed (GLUE metrics x100) at the epoch chosen on the selection split (a fixed part "
        "of the training split, never trained on), unless a row says ON VALIDATION (then the reported split chose "
        "the epoch: optimistic); mean ± sample std over seeds (a run's seeds vary the initialisation and dropout, and "
        "share one batch order, `data_seed`). Frozen start: the score before any training "
        "(epoch 0); majority: a constant prediction. ⚠ marks a mean not above both.",
        "",
    ]
    mixed = [key for key in ("method", "backbone") if len({r[key] for r in rows if r[key] is not None}) > 1]
    header = ["task", *mixed, "metric", *[f"seed {s}" for s in seeds], "mean ± std", "frozen start", "majority",
              "other metrics (mean)", "chosen epoch per seed", "trainable params", "train time", "peak RSS"]
    if gpu:
        header.append("CUDA peak")
    if energy:
        header.append("energy")
    lines += ["| " + " | ".join(header) + " |",
              "|" + "|".join("---:" if h.startswith("seed") or h in ("mean ± std", "trainable params") else "---"
                             for h in header) + "|"]
    for r in rows:
        cells = [r["task"], *[str(r[key] or "") for key in mixed], r["metric"], *[_fmt(r["seeds"].get(s)) for s in seeds],
                 f"**{_fmt(r['mean'])}**" + ("" if r["std"] is None else f" ± {_fmt(r['std'])}")
                 + (f" (n={r['num_seeds']})" if uneven else "")
                 + (" ⚠" if r["above_start"] is False else ""),
                 _fmt(r["frozen"]), _fmt(r["majority"]),
                 ", ".join(f"{k} {_fmt(v)}" for k, v in r["other"].items()),
                 ", ".join(str(r["best_epochs"][s]) for s in seeds if s in r["best_epochs"])
                 + (f" (of {r['epochs_run']})" if r["epochs_run"] else "")
                 + (" ON VALIDATION" if r["select_on"] == "validation" else ""),
                 f"{r['trainable_parameters']:,}" if r["trainable_parameters"] else "",
                 _duration(r["wall_time_s"]),
                 f"{r['peak_rss_mb']:,.0f} MB" if r["peak_rss_mb"] else ""]
        if gpu:
            cells.append(f"{r['cuda_max_allocated_mb']:,.0f} MB" if r["cuda_max_allocated_mb"] else "")
        if energy:
            cells.append(f"{r['energy_j'] / 1000:.1f} kJ" if r["energy_j"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1 and summary["average"] is not None:
        blank = [""] * len(seeds)
        tail = ["", "", "", "", "", _duration(summary["total_wall_time_s"]), ""] + [""] * (gpu + energy)
        lines.append("| **average** | primary | " + " | ".join(blank) + (" | " if blank else "")
                     + f"**{_fmt(summary['average'])}** | " + " | ".join(tail) + " |")
    if len(rows) > 1 and summary["no_average"]:
        lines += ["", f"No average over tasks: {summary['no_average']}."]
    meanings = sorted({f"{r['task_name']}: {r['frozen_meaning']}" for r in rows if r["frozen_meaning"]})
    if meanings:
        lines += ["", "Frozen start, per task: " + "; ".join(meanings) + "."]
    return "\n".join(lines) + "\n"


def _score_limits(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """The left panel's y range: 0 to 105, reaching below 0 (with room for the labels) to show negative scores.

    MCC, and any frozen start, can be below zero; a fixed floor at 0 would hide those bars, dots and labels.
    """
    shown = [v for r in rows for v in ((r["mean"] or 0.0) - (r["std"] or 0.0), *r["seeds"].values())
             if v is not None and math.isfinite(v)]
    lowest = min([0.0, *shown])
    return (lowest - 0.1 * (105 - lowest) if lowest < 0 else 0.0), 105.0


def plot(summary: dict[str, Any], runs: dict[str, dict[str, Any]], path: Path) -> Figure:
    """Left: per task the seeds' best scores around their mean. Right: validation curves per epoch.

    Returns the figure written to ``path``, so that what it shows can be checked.
    """
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, the Agg canvas is implied by savefig
    )

    rows = summary["rows"]
    uneven = len({r["num_seeds"] for r in rows}) > 1
    colors = [f"C{i}" for i in range(len(rows))]
    fig = Figure(figsize=(12, 4.6), dpi=120, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.35])

    x = list(range(len(rows)))
    means = [r["mean"] or 0.0 for r in rows]
    left.bar(x, means, yerr=[r["std"] or 0.0 for r in rows], color=colors, alpha=0.35, capsize=6,
             edgecolor=colors, linewidth=1.5)
    for i, r in enumerate(rows):
        values = [v for v in r["seeds"].values() if v is not None]
        offsets = [(j - (len(values) - 1) / 2) * 0.12 for j in range(len(values))]
        left.scatter([i + o for o in offsets], values, color=colors[i], zorder=3, s=22, label=None)
        mean, std = r["mean"] or 0.0, r["std"] or 0.0
        below = mean < 0  # a negative mean's label goes under its bar, error bar and dots, as a positive one over
        finite = [v for v in values if math.isfinite(v)]
        edge = min([mean - std, *finite]) if below else max([mean + std, *finite])
        left.annotate(mean_std(r["mean"], r["std"], 1), (i, edge),
                      xytext=(0, -6 if below else 6), textcoords="offset points", ha="center",
                      va="top" if below else "baseline", fontsize=9)
    methods = sorted({str(r["method"]) for r in rows if r["method"] is not None})
    left.set_xticks(x, [f"{r['task']}\n{r['metric']}" + (f"\n{r['method']}" if len(methods) > 1 else "")
                        + (f"\nn={r['num_seeds']}" if uneven else "") for r in rows])
    bottom, top = _score_limits(rows)
    left.set_ylim(bottom, top)
    if bottom < 0:
        left.axhline(0.0, color="0.2", linewidth=0.8, zorder=2)
    left.set_ylabel("validation score at the chosen epoch (x100)")
    left.set_title("Score per task at the chosen epoch\nmean ± std, dots = seeds")
    left.grid(axis="y", alpha=0.3)

    for i, r in enumerate(rows):
        history = runs[r["run"]]["history"]
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        seed_columns = list(dict.fromkeys(k for h in history for k in h if k.startswith(f"{r['metric']}_seed")))
        right.plot(epochs, [_score(h, r["metric"]) for h in history], color=colors[i], marker="o",
                   markersize=3, label=f"{r['task']} ({r['metric']})")
        if seed_columns:
            cells = [[v for c in seed_columns if math.isfinite(v := _score(h, c))] for h in history]
            low = [min(v) if v else math.nan for v in cells]
            high = [max(v) if v else math.nan for v in cells]
            right.fill_between(epochs, low, high, color=colors[i], alpha=0.15, linewidth=0)
    right.set_xlabel("epoch")
    right.set_ylabel("validation score (x100)")
    right.set_title("Validation curves from the frozen start (epoch 0)\nmean over seeds, band = seed range")
    right.grid(alpha=0.3)
    if any(runs[r["run"]]["history"] for r in rows):
        right.legend(loc="best", fontsize=9)
        right.xaxis.get_major_locator().set_params(integer=True)

    backbones = ", ".join(sorted({str(r["backbone"]) for r in rows}))
    what = "READ side networks" if methods in (["read"], []) else f"Methods {', '.join(methods)}"
    fig.suptitle(f"{what} on {backbones}: {seed_counts(rows)} per task"
                 + (" (n under each task)" if uneven else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png")
    atomic_write_bytes(path, image.getvalue())
    return fig


def write_report(runs_dir: str = "runs", out_dir: str = "reports", tasks: list[str] | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/summary.md`` and ``<out_dir>/summary.png`` from ``<runs_dir>/<task>/``.

    ``tasks``: the run directories to include, in this order; None: every one with a metrics.json.
    Returns the summary (rows, average, markdown text, paths written).
    """
    check_writable_folder(out_dir)  # a file in the way of --out is named before the runs are read
    runs_path = Path(runs_dir)
    names = list(tasks) if tasks else discover_tasks(runs_path)
    if not names:
        raise FileNotFoundError(
            f"no {runs_path}/<task>/metrics.json found: train first (`pipeline train --cache data/<task>.zarr` or `dvc repro`)"
        )
    runs = {name: load_run(runs_path / name) for name in names}
    summary = summarize(runs)
    text = markdown(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.md", text)
    plot(summary, runs, out / "summary.png")
    return {**summary, "markdown": text, "paths": {"markdown": str(out / "summary.md"), "image": str(out / "summary.png")}}
