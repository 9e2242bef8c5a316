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

GLUE = str(REPO.parent / "shared" / "data" / "glue")
OUT = REPO / "bench_out" / "quality"
STORES = REPO / "bench_out" / "stores"
MODEL = "all-MiniLM-L6-v2"
MAX_LENGTH = 128
TASKS = ("rte", "sst2", "cola", "stsb")
# Training examples kept per task (first N of the train split); validation is always complete.
# Sized for two shared CPU cores and full fine-tuning of 3 seeds (benchmarks/finetune.py).
CAPS = {"rte": 300, "sst2": 800, "cola": 800, "stsb": 400}
SECTION = "## Quality (stage two)"


def store_path(task: str, tokens: str = "all") -> Path:
    return STORES / f"{task}-train{CAPS[task]}-{tokens}.zarr"


def capped_load_split(task: str):
    """``load_split`` with the train split cut to ``CAPS[task]`` (validation untouched)."""
    from pipeline.extraction.glue import load_split

    def load(spec, name, glue_dir=None, *, limit=None):
        if name == "train":
            limit = CAPS[task] if limit is None else min(limit, CAPS[task])
        return load_split(spec, name, glue_dir, limit=limit)

    return load


def cmd_extract(args: argparse.Namespace) -> None:
    import pipeline.extraction.stage as extraction_module
    from pipeline.common.config import ExtractConfig
    from pipeline.common.tasks import get_task

    jobs = [(t, "all") for t in args.tasks] + ([("stsb", "pooled")] if "stsb" in args.tasks else [])
    timings = {}
    for task, tokens in jobs:
        extraction_module.load_split = capped_load_split(task)
        out = store_path(task, tokens)
        cfg = ExtractConfig(model=MODEL, task=task, out=str(out), glue_dir=GLUE,
                            splits=("train", *get_task(task).validation_splits), max_length=MAX_LENGTH,
                            dtype="bfloat16", tokens=tokens, device="cpu", overwrite=True)
        started = time.perf_counter()
        extraction_module.extract(cfg, progress=False)
        timings[f"{task}-{tokens}"] = round(time.perf_counter() - started, 1)
        print(f"{out}: {timings[f'{task}-{tokens}']} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "extract_times.json").write_text(json.dumps(timings, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ READ

# name -> (store tokens, TrainConfig overrides). "read" is the default recipe; the others are the
# variants tried to close the gap to full fine-tuning (pooling, rnn size, learning rate, epochs).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "probe": ("all", {"method": "probe", "lr": 1e-2, "epochs": 10}),
    "read": ("all", {}),
    "read_cls": ("all", {"pooling": "cls"}),
    "read_pooled": ("pooled", {}),
}
READ_DEFAULTS: dict[str, Any] = {"epochs": 10, "rnn_dim": 128, "lr": 3e-3, "batch_size": 32, "patience": None}


def run_variant(task: str, name: str, overrides: dict[str, Any], tokens: str, seeds: tuple[int, ...]) -> dict:
    import torch

    from pipeline.common.config import TrainConfig
    from pipeline.training import train

    settings = {**READ_DEFAULTS, **overrides}
    out = OUT / "runs" / f"{task}-{name}"
    cfg = TrainConfig(cache=str(store_path(task, tokens)), out=str(out), seeds=seeds, device="cpu", **settings)
    torch.manual_seed(0)
    started = time.perf_counter()
    metrics = train(cfg, progress=False)
    wall = time.perf_counter() - started
    primary = metrics["primary_metric"]
    best = [metrics["seeds"][str(s)][primary] for s in seeds]
    # The last epoch's value per seed, from history.csv (fine-tuning reports its last epoch only).
    import csv

    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    last = [float(rows[-1][f"{primary}_seed{s}"]) for s in seeds]
    return {"task": task, "variant": name, "settings": settings, "tokens": tokens, "primary": primary,
            "best_epoch": best, "last_epoch": last, "wall_s": round(wall, 1),
            "best_epochs": [metrics["seeds"][str(s)]["best_epoch"] for s in seeds]}


def cmd_read(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / args.results
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    seeds = tuple(int(s) for s in args.seeds.split(","))
    for task in args.tasks:
        for name in args.variants:
            tokens, overrides = VARIANTS[name] if name in VARIANTS else EXTRA_VARIANTS[name]
            if tokens == "pooled" and task != "stsb":
                continue
            key = f"{task}/{name}"
            if key in results and not args.force:
                continue
            res = run_variant(task, name, overrides, tokens, seeds)
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            results[key] = res
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{key}: best {fmt(res['best_epoch'])} last {fmt(res['last_epoch'])} ({res['wall_s']} s)", flush=True)


# Extra variants tried to close the gap (added as they were tried).
EXTRA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "read_r256": ("all", {"rnn_dim": 256}),
    "read_lr1e-3": ("all", {"lr": 1e-3}),
    "read_20ep": ("all", {"epochs": 20}),
}


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


def write_section(section: str, body: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace (or append) one '## ' section of BENCHMARKS.md (or ``path``), leaving every other section as it is."""
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
    r = sub.add_parser("read")
    r.add_argument("--tasks", nargs="+", default=list(TASKS))
    r.add_argument("--variants", nargs="+", default=["probe", "read", "read_cls", "read_pooled"])
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--force", action="store_true")
    r.add_argument("--results", default="read.json", help="file under bench_out/quality/ (one per process)")
    t = sub.add_parser("table")
    t.add_argument("--notes", default=str(OUT / "notes.md"))
    args = parser.parse_args()
    {"extract": cmd_extract, "read": cmd_read, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
