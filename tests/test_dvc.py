"""`dvc repro` end to end on a copy of the repository, with a reduced embedded default.

Checks what a user relies on: the pipeline runs from params.yaml alone, a second `dvc repro` does
nothing, and a changed training parameter reruns training (and the report) but not extraction.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this venv's dvc and python

pytestmark = pytest.mark.slow


def copy_repo(dest: Path) -> Path:
    """The repository's files as git sees them (tracked, plus new files not ignored), in a new git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.pop("GLUE_DIR", None)  # the data must come from params.yaml's glue_dir
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_end_to_end(tmp_path, glue_dir):
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tasks"] = ["rte"]
    params["glue_dir"] = str(Path(glue_dir).resolve())
    params["extract"].update(limit=40)
    params["train"].update(epochs=1, seeds=[0, 1], rnn_dim=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = dvc(repo, "repro")
    assert ran(first) == {"extract@rte", "train@rte", "report"}
    metrics = json.loads((repo / "runs" / "rte" / "metrics.json").read_text())
    assert metrics["task"] == "rte" and metrics["primary_metric"] == "accuracy"
    assert set(metrics["seeds"]) == {"0", "1"}
    predictions = list(csv.DictReader((repo / "runs" / "rte" / "predictions" / "validation.csv").open()))
    assert len(predictions) == 40  # extract.limit
    for seed in ("0", "1"):  # the reported accuracy is the one of the saved predictions, by hand
        hits = sum(int(float(row["label"])) == int(float(row[f"seed_{seed}"])) for row in predictions)
        assert metrics["seeds"][seed]["accuracy"] == pytest.approx(100 * hits / len(predictions), abs=1e-3)
    assert (repo / "runs" / "rte" / "history.csv").is_file()
    assert "| rte | accuracy |" in (repo / "reports" / "summary.md").read_text()
    assert (repo / "reports" / "summary.png").stat().st_size > 0
    shown = dvc(repo, "metrics", "show")
    assert "runs/rte/scores.json" in shown and "runs/rte/metrics.json" not in shown
    assert max(map(len, shown.splitlines())) < 250, shown  # the headline figures, not every per-seed field

    second = dvc(repo, "repro")
    assert ran(second) == set(), second
    assert "didn't change" in second or "up to date" in second

    store_lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["extract@rte"]["outs"]
    params["train"]["lr"] = 3.0e-3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(repo, "repro")
    assert ran(third) == {"train@rte", "report"}, third
    assert "Stage 'extract@rte' didn't change" in third
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["extract@rte"]["outs"] == store_lock
    assert json.loads((repo / "runs" / "rte" / "config.json").read_text())["train"]["lr"] == 3.0e-3

    # An extraction setting (here max_length; the model alike) reruns both stages, and the stale store
    # (persist: true keeps it for resuming) is replaced rather than refused.
    params["extract"]["max_length"] = 64
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc(repo, "repro")
    assert ran(fourth) == {"extract@rte", "train@rte", "report"}, fourth
    new_fingerprint = json.loads((repo / "runs" / "rte" / "metrics.json").read_text())["fingerprint"]
    assert new_fingerprint != metrics["fingerprint"]

    # A training stage killed after a checkpoint: `dvc repro` reruns it, DVC leaves the checkpoint (not an output)
    # in place, and the stage goes on from it.
    params["train"].update(epochs=400, patience=None, checkpoint_seconds=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoint = repo / "runs" / "rte" / "checkpoint.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    stage = subprocess.Popen([sys.executable, "-m", "stages.train", "--task", "rte", "--cache", "data/rte.zarr",
                              "--out", "runs/rte", "--quiet"], cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
    while stage.poll() is None and not checkpoint.exists():
        time.sleep(0.01)
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    assert stage.returncode == -signal.SIGKILL and checkpoint.is_file(), stage.stderr.read()
    fifth = dvc(repo, "repro")
    assert "train@rte" in ran(fifth) and "resuming from runs/rte/checkpoint.pt, saved after epoch" in fifth, fifth
    assert not checkpoint.exists()
    assert json.loads((repo / "runs" / "rte" / "metrics.json").read_text())["resources"]["resumed_after_epoch"] >= 1
    # A checkpoint set aside (or left) in a run folder is not a result: the report, which depends on runs/, is
    # up to date with it there.
    (repo / "runs" / "rte" / "checkpoint.replaced.pt").write_bytes(b"set aside by a rerun")
    assert "up to date" in dvc(repo, "status")
