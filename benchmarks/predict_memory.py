"""What `pipeline predict` holds for a long input: its token ids, tokenized all at once or in windows.

Run from the repository root:

    .venv/bin/python benchmarks/predict_memory.py --examples 200000

`Predictor.predict` tokenizes and batches ``PREDICT_WINDOW`` examples at a time. Before, the whole input was
tokenized at once, and the token ids (and the fast tokenizer's working memory) grew with the input. Each way
runs in a fresh process (so that one's peak does not hide the other's): SST-2 training sentences repeated to
``--examples``, tokenized with all-MiniLM-L6-v2's tokenizer at max_length 128 as predict tokenizes them; the
figure is the growth of the process's peak resident memory (VmHWM) over its level after loading the backbone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pipeline, whichever is installed


def peak_mib() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmHWM:")[1].split()[0]) // 1024


def measure(mode: str, examples: int, glue_dir: str) -> None:
    """One way, in this process: print mode, examples, tokens, peak growth (MiB)."""
    from pipeline.common.tasks import get_task
    from pipeline.extraction.backbones import load_backbone
    from pipeline.inference.predictor import PREDICT_WINDOW

    lines = (Path(glue_dir) / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0] for line in lines]
    texts = [{"sentence": sentences[i % len(sentences)]} for i in range(examples)]
    backbone, task = load_backbone("all-MiniLM-L6-v2", device="cpu"), get_task("sst2")
    before = peak_mib()
    window = examples if mode == "whole" else PREDICT_WINDOW
    tokens, held = 0, []
    for start in range(0, examples, window):
        held = backbone.tokenize(task, texts[start : start + window], 128)  # a window's ids, held while predicted
        tokens += sum(map(len, held))
    print(mode, examples, window, tokens, peak_mib() - before, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR") or str(REPO / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--measure", choices=("whole", "windows"), help=argparse.SUPPRESS)  # one way, in a child
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.examples, args.glue_dir)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print("| tokenized | examples | window | tokens | peak growth MiB |\n|---|---:|---:|---:|---:|")
    for mode in ("whole", "windows"):
        out = subprocess.run([sys.executable, __file__, "--measure", mode, "--examples", str(args.examples),
                              "--glue-dir", args.glue_dir], env=env, check=True, capture_output=True, text=True)
        name, examples, window, tokens, growth = out.stdout.split()[-5:]
        print(f"| {'all at once (before)' if name == 'whole' else 'in windows (now)'} | {int(examples):,} | "
              f"{int(window):,} | {int(tokens):,} | {growth} |")


if __name__ == "__main__":
    main()
