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
from pathlib import Path
from typing import Any

from pipeline.common.files import atomic_write_bytes, atomic_write_text, check_writable_folder


def load_run(run_dir: Path) -> dict[str, Any]:
    """One task's metrics.json plus its history.csv (a list of rows), as stage two wrote them."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path}: train that task first (`pipeline train --cache data/{run_dir.name}.zarr` or `dvc repro`)"
        )
    metrics = json.loads(path.read_text())
    history: list[dict[str, float]] = []
    if (run_dir / "history.csv").is_file():
        with open(run_dir / "history.csv", newline="") as handle:
            history = [{k: _number(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    return {"dir": str(run_dir), "metrics": metrics, "history": history}


def _number(text: str) -> float | str:
    """A history cell: a number, or text such as the select_on column's split name."""
    try:
        return float(text)
    except ValueError:
        return text


def discover_tasks(runs_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in runs_dir.glob("*/metrics.json"))


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
    variant's folder, say). The average is over tasks, so it is given only when no task has two rows.
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
    tasks = [r["task_name"] for r in rows]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    return {
        "seeds": seeds,
        "rows": rows,
        "average": sum(means) / len(means) if means and not repeated else None,
        "repeated_tasks": repeated,
        "total_wall_time_s": sum(r["wall_time_s"] or 0.0 for r in rows),
    }


def _energy(resources: dict[str, Any]) -> float | None:
    parts = [resources.get(k) for k in ("energy_j", "cpu_energy_j", "gpu_energy_j")]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def markdown(summary: dict[str, Any]) -> str:
    rows, seeds = summary["rows"], summary["seeds"]
    backbones = sorted({str(r["backbone"]) for r in rows})
    methods = sorted({str(r["method"]) for r in rows})
    gpu = any(r["cuda_max_allocated_mb"] for r in rows)
    energy = any(r["energy_j"] for r in rows)
    lines = [
        "# READ results",
        "",
        f"Backbone {', '.join(backbones)}; method {', '.join(methods)}; {len(seeds)} seed(s). "
        "Validation score of each seed (GLUE metrics x100) at the epoch chosen on the selection split (a fixed part "
        "of the training split, never trained on), unless a row says ON VALIDATION (then the reported split chose "
        "the epoch: optimistic); mean ± sample std over seeds. Frozen start: the score before any training "
        "(epoch 0); majority: a constant prediction. ⚠ marks a mean not above both.",
        "",
    ]
    header = ["task", "metric", *[f"seed {s}" for s in seeds], "mean ± std", "frozen start", "majority",
              "other metrics (mean)", "chosen epoch per seed", "trainable params", "train time", "peak RSS"]
    if gpu:
        header.append("CUDA peak")
    if energy:
        header.append("energy")
    lines += ["| " + " | ".join(header) + " |",
              "|" + "|".join("---:" if h.startswith("seed") or h in ("mean ± std", "trainable params") else "---"
                             for h in header) + "|"]
    for r in rows:
        cells = [r["task"], r["metric"], *[_fmt(r["seeds"].get(s)) for s in seeds],
                 f"**{_fmt(r['mean'])}** ± {_fmt(r['std'])}" + (" ⚠" if r["above_start"] is False else ""),
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
    if summary["repeated_tasks"]:
        lines += ["", f"No average over tasks: {', '.join(summary['repeated_tasks'])} "
                  f"{'has' if len(summary['repeated_tasks']) == 1 else 'have'} more than one run here."]
    meanings = sorted({f"{r['task_name']}: {r['frozen_meaning']}" for r in rows if r["frozen_meaning"]})
    if meanings:
        lines += ["", "Frozen start, per task: " + "; ".join(meanings) + "."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: per task the seeds' best scores around their mean. Right: validation curves per epoch."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, the Agg canvas is implied by savefig
    )

    rows = summary["rows"]
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
        left.annotate(f"{_fmt(r['mean'], 1)} ± {_fmt(r['std'], 1)}", (i, (r["mean"] or 0.0) + (r["std"] or 0.0)),
                      xytext=(0, 6), textcoords="offset points", ha="center", fontsize=9)
    left.set_xticks(x, [f"{r['task']}\n{r['metric']}" for r in rows])
    left.set_ylim(0, 105)
    left.set_ylabel("validation score at the chosen epoch (x100)")
    left.set_title("Score per task: mean ± std, dots = seeds")
    left.grid(axis="y", alpha=0.3)

    for i, r in enumerate(rows):
        history = runs[r["run"]]["history"]
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        seed_columns = [k for k in history[0] if k.startswith(f"{r['metric']}_seed")]
        right.plot(epochs, [h.get(r["metric"], math.nan) for h in history], color=colors[i], marker="o",
                   markersize=3, label=f"{r['task']} ({r['metric']})")
        if seed_columns:
            low = [min(h[c] for c in seed_columns) for h in history]
            high = [max(h[c] for c in seed_columns) for h in history]
            right.fill_between(epochs, low, high, color=colors[i], alpha=0.15, linewidth=0)
    right.set_xlabel("epoch")
    right.set_ylabel("validation score (x100)")
    right.set_title("Validation curves from the frozen start (epoch 0): mean over seeds, band = seed range")
    right.grid(alpha=0.3)
    if any(runs[r["run"]]["history"] for r in rows):
        right.legend(loc="best", fontsize=9)
        right.xaxis.get_major_locator().set_params(integer=True)

    backbones = ", ".join(sorted({str(r["backbone"]) for r in rows}))
    fig.suptitle(f"READ side networks on {backbones}: {len(summary['seeds'])} seed(s) per task")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png")
    atomic_write_bytes(path, image.getvalue())


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
