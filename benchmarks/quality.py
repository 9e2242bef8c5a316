"""Stage two's quality on real GLUE data with the real pretrained MiniLM (all-MiniLM-L6-v2).

Run from the repository root, in this order (each step writes JSON under bench_out/quality/):

    .venv/bin/python benchmarks/quality.py extract            # the stores (capped train, full validation)
    .venv/bin/python benchmarks/finetune.py                   # full fine-tuning, same data (separate script)
    .venv/bin/python benchmarks/quality.py read               # READ variants + frozen linear probe
    .venv/bin/python benchmarks/quality.py table              # the table -> BENCHMARKS.md

Same data for all three methods: the first ``--cap`` training examples of each task (the caps are
printed in the table), the complete validation split, max_length 128. READ and the probe train from
the store (``pipeline.training.train``); full fine-tuning (benchmarks/finetune.py) reads the same
examples through ``pipeline.glue.load_split`` with the same caps.

Only the "## Quality (stage two)" section of BENCHMARKS.md is rewritten; the rest is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GLUE = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue")
OUT = REPO / "bench_out" / "quality"
STORES = REPO / "bench_out" / "stores"
MODEL = "all-MiniLM-L6-v2"
MAX_LENGTH = 128
TASKS = ("rte", "stsb", "cola", "sst2")
# Whole tasks; SST-2 (67k) only its first 20,000 examples (ExtractConfig.limit; its validation split has 872).
LIMITS: dict[str, int | None] = {"rte": None, "stsb": None, "cola": None, "sst2": 20_000}
SECTION = "## Quality (stage two)"


def store_path(task: str, tokens: str) -> Path:
    limit = LIMITS[task]
    return STORES / f"{task}-{'whole' if limit is None else f'first{limit}'}-{tokens}.zarr"


def cmd_extract(args: argparse.Namespace) -> None:
    """Both stores of each task (per-token and pooled), through the public ``extract``."""
    from pipeline.common.config import ExtractConfig
    from pipeline.common.tasks import get_task
    from pipeline.extraction import extract

    timings_path = OUT / "extract_times.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for task in args.tasks:
        for tokens in args.tokens:
            out = store_path(task, tokens)
            cfg = ExtractConfig(model=MODEL, task=task, out=str(out), glue_dir=GLUE, limit=LIMITS[task],
                                splits=("train", *get_task(task).validation_splits), max_length=MAX_LENGTH,
                                dtype="bfloat16", tokens=tokens, device="cpu")
            started = time.perf_counter()
            extract(cfg, progress=False)  # resumes, or returns at once, when the store is already complete
            timings[out.name] = round(time.perf_counter() - started, 1)
            print(f"{out}: {timings[out.name]} s", flush=True)
            OUT.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ READ

# The shared recipe: what every READ variant starts from (CLI defaults otherwise: patience 5, dropout 0.1,
# GRU, mean aggregation, mean pooling, AdamW wd 0.01, 6% warm-up then linear decay).
READ_DEFAULTS: dict[str, Any] = {"epochs": 10, "rnn_dim": 128, "lr": 1e-3, "batch_size": 32}
# name -> (store tokens, overrides of READ_DEFAULTS). Every variant chooses its epochs on the selection
# split; recipes are compared on the selection split too (the table says which one won there).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # The probe reads the final layer's mean over tokens: the pooled store holds exactly that row.
    "probe": ("pooled", {"method": "probe", "lr": 1e-2}),
    "read_tokens": ("all", {}),
    "read_pooled": ("pooled", {}),
    "read_pooled_lr3e-3": ("pooled", {"lr": 3e-3}),
    "read_pooled_r256": ("pooled", {"rnn_dim": 256}),
    "read_pooled_20ep": ("pooled", {"epochs": 20}),
    "read_tokens_lr3e-3": ("all", {"lr": 3e-3}),
    "read_tokens_r256": ("all", {"rnn_dim": 256}),
}


def run_variant(task: str, name: str, seeds: tuple[int, ...], threads: int) -> dict[str, Any]:
    """One variant on one task, all seeds in lockstep, through the public ``train``; its record for the table."""
    from pipeline.common.config import TrainConfig
    from pipeline.training import train

    tokens, overrides = VARIANTS[name]
    settings = {**READ_DEFAULTS, **overrides}
    out = OUT / "runs" / f"{task}-{name}"
    cfg = TrainConfig(cache=str(store_path(task, tokens)), out=str(out), seeds=seeds, device="cpu",
                      threads=threads, **settings)
    metrics = train(cfg, progress=False)
    primary, select = metrics["primary_metric"], metrics["select_metric"]
    with open(out / "history.csv") as handle:
        last = list(csv.DictReader(handle))[-1]
    resources = metrics["resources"]
    return {
        "task": task, "variant": name, "tokens": tokens, "settings": settings, "primary": primary,
        "validation": [metrics["seeds"][str(s)][primary] for s in seeds],
        "selection": [metrics["seeds"][str(s)][select] for s in seeds],
        "last_epoch_validation": [float(last[f"{primary}_seed{s}"]) for s in seeds],
        "chosen_epochs": [metrics["seeds"][str(s)]["best_epoch"] for s in seeds],
        "epochs_run": metrics["epochs_run"],
        "frozen_start": metrics["frozen_start"]["mean"][primary],
        "majority": metrics["majority_baseline"][primary],
        "selection_split": metrics["selection"],
        "wall_s": resources.get("wall_time_s"), "peak_rss_mb": resources.get("peak_rss_mb"),
    }


def cmd_read(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / args.results
    seeds = tuple(int(s) for s in args.seeds.split(","))
    for task in args.tasks:
        for name in args.variants:
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            key = f"{task}/{name}"
            if key in results and not args.force:
                continue
            res = run_variant(task, name, seeds, args.threads)
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            results[key] = res
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{key}: validation {fmt(res['validation'])} selection {fmt(res['selection'])} "
                  f"(frozen {res['frozen_start']:.2f}, {res['wall_s']} s)", flush=True)


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.2f} (1 seed)"
    text = f"{mean:.2f} ± {statistics.stdev(values):.2f}"
    return text if len(values) == 3 else f"{text} ({len(values)} seeds)"


# ----------------------------------------------------------------------------------------- table


def cmd_table(args: argparse.Namespace) -> None:
    read: dict[str, Any] = {}
    for path in sorted(OUT.glob("read*.json")):  # one file per `read` process (--results)
        read.update(json.loads(path.read_text()))
    ft: dict[str, Any] = {}
    for path in sorted(OUT.glob("finetune*.json")):  # one file per finetune.py process (--out)
        for key, value in json.loads(path.read_text()).items():
            if key == "_settings":
                ft[key] = value
                continue
            entry = ft.setdefault(key, {"per_seed": {}})
            entry["per_seed"].update(value["per_seed"])
    for key, entry in ft.items():
        if key != "_settings":
            seeds = sorted(entry["per_seed"], key=int)
            entry["scores"] = [entry["per_seed"][k]["score"] for k in seeds]
            entry["wall_s"] = round(sum(entry["per_seed"][k]["wall_s"] for k in seeds), 1)
            entry["seeds"] = seeds
    names = {"rte": "RTE (acc)", "sst2": "SST-2 (acc)", "cola": "CoLA (MCC)", "stsb": "STS-B ((Pearson+Spearman)/2)"}
    lines = [SECTION, ""]
    lines.append(f"all-MiniLM-L6-v2 (real weights), real GLUE (`../shared/data/glue`), max_length {MAX_LENGTH}, "
                 "seeds 0,1,2, mean ± std (sample std) of each seed's validation score, x100. "
                 "Same examples for every method. Train caps (first N training examples): "
                 + ", ".join(f"{t.upper()} {CAPS[t]}" for t in TASKS)
                 + "; validation splits complete (RTE 277, SST-2 872, CoLA 1043, STS-B 1500). "
                 "CPU only (2 shared cores).")
    lines.append("")
    lines.append("READ and the probe: best epoch per seed on validation (what `pipeline train` keeps), and in "
                 "brackets the last epoch; full fine-tuning: last epoch (evaluated once, at the end).")
    lines.append("")
    variants = [v for v in ["probe", "read", "read_cls", *EXTRA_VARIANTS] if any(k.endswith("/" + v) for k in read)]
    header = ["task"] + [f"{v}" for v in variants] + ["full fine-tuning"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    gaps_best, gaps_last = [], []
    for t in TASKS:
        row = [names[t]]
        for v in variants:
            r = read.get(f"{t}/{v}")
            row.append(f"{fmt(r['best_epoch'])} ({fmt(r['last_epoch'])})" if r else "—")
        f = ft.get(t)
        row.append(fmt(f["scores"]) if f else "—")
        lines.append("| " + " | ".join(row) + " |")
        if f and f"{t}/read" in read:
            gaps_best.append(statistics.mean(read[f"{t}/read"]["best_epoch"]) - statistics.mean(f["scores"]))
            gaps_last.append(statistics.mean(read[f"{t}/read"]["last_epoch"]) - statistics.mean(f["scores"]))
    lines.append("")
    if gaps_best:
        over = [t for t in TASKS if t in ft and f"{t}/read" in read]
        lines.append(f"**Average gap READ − full fine-tuning over {len(over)} task(s) ({', '.join(over)}), on the "
                     f"means of the seeds run: {statistics.mean(gaps_best):+.2f} points (READ best epoch), "
                     f"{statistics.mean(gaps_last):+.2f} points (READ last epoch).**")
        lines.append("")
    lines.append("Settings. READ (`read`): " + ", ".join(f"{k}={v}" for k, v in READ_DEFAULTS.items())
                 + ", GRU, mean aggregation, mean pooling, dropout 0.1, AdamW wd 0.01, warm-up 6% then linear decay. "
                 "Variants change one setting: " + "; ".join(
                     f"`{v}`: {VARIANTS.get(v, EXTRA_VARIANTS.get(v, ('', {})))[1]}" for v in variants if v != "read")
                 + ". Full fine-tuning: see benchmarks/finetune.py (" + (ft.get("_settings", "") or "") + ").")
    lines.append("")
    if "stsb/read_pooled" in read:
        p, a = read["stsb/read_pooled"], read["stsb/read"]
        lines.append(f"Per-token vs pooled store on STS-B (READ, same settings): per-token {fmt(a['best_epoch'])}, "
                     f"pooled {fmt(p['best_epoch'])} (best epoch); last epoch {fmt(a['last_epoch'])} vs "
                     f"{fmt(p['last_epoch'])}. Difference (pooled − per-token, best epoch): "
                     f"{statistics.mean(p['best_epoch']) - statistics.mean(a['best_epoch']):+.2f} points.")
        lines.append("")
    lines.append("Wall time (s; READ/probe: 3 seeds in lockstep, one process; fine-tuning: sum over the seeds run, one "
                 "after another). READ and the probe ran on a quiet machine (load average about 1, two processes "
                 "side by side); full fine-tuning ran earlier while other jobs shared the 2 cores (load average "
                 "4-12), so its times are upper bounds, not throughput figures:")
    lines.append("")
    lines.append("| task | " + " | ".join(variants) + " | full fine-tuning |")
    lines.append("|" + "---|" * (len(variants) + 2))
    for t in TASKS:
        row = [t] + [str(read[f"{t}/{v}"]["wall_s"]) if f"{t}/{v}" in read else "—" for v in variants]
        row.append(str(ft[t]["wall_s"]) if t in ft else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if args.notes and Path(args.notes).exists():
        lines.append(Path(args.notes).read_text().strip())
        lines.append("")
    lines.append("Commands for a clean rerun (from the repository root):")
    lines.append("")
    lines.append("```")
    lines.append(".venv/bin/python benchmarks/quality.py extract")
    lines.append(".venv/bin/python benchmarks/finetune.py")
    lines.append(".venv/bin/python benchmarks/quality.py read --variants " + " ".join(variants))
    lines.append(".venv/bin/python benchmarks/quality.py table")
    lines.append("```")
    write_section(SECTION, "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_section(section: str, body: str) -> None:
    """Replace (or append) one '## ' section of BENCHMARKS.md, leaving every other section as it is."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--tasks", nargs="+", default=list(TASKS))
    e.add_argument("--tokens", nargs="+", default=["pooled", "all"], choices=["pooled", "all"])
    r = sub.add_parser("read")
    r.add_argument("--tasks", nargs="+", default=list(TASKS))
    r.add_argument("--variants", nargs="+", default=["probe", "read_pooled", "read_tokens"], choices=list(VARIANTS))
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--force", action="store_true")
    r.add_argument("--results", default="read.json", help="file under bench_out/quality/ (one per process)")
    t = sub.add_parser("table")
    t.add_argument("--notes", default=str(OUT / "notes.md"))
    args = parser.parse_args()
    {"extract": cmd_extract, "read": cmd_read, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
