"""benchmarks/gpu.py runs end to end on CPU with a tiny shape and writes only the file it is given."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pipeline.common.config import ExtractConfig
from pipeline.common.settings import field_of

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_into_a_copy(tiny_t5, glue_dir, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage_two = module.stage_two

    def failing_once(args, cache, seeds, *rest, **options):  # a phase that fails where it first runs
        if cache.stem == "pooled" and seeds == 1:
            raise RuntimeError("CUDA error: injected\nsecond line")
        return stage_two(args, cache, seeds, *rest, **options)

    monkeypatch.setattr(module, "stage_two", failing_once)
    real = (REPO / "BENCHMARKS.md").read_bytes()
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    assert module.main(["--shape", "t5-tiny", "--device", "cpu", "--limit", "24", "--task", "rte",
                        "--glue-dir", str(glue_dir), "--tokenizer", str(tiny_t5), "--max-length", "64",
                        "--seeds", "2", "--rnn-dim", "8", "--writers", "2", "--disk-probe-mib", "64",
                        "--work", str(tmp_path / "work"), "--benchmarks", str(copy), "--no-compiled",
                        "--results", str(tmp_path / "gpu.json")]) == 0
    text = copy.read_text()
    assert "## Other\n\nkept" in text and "## GPU" in text and "no GPU (CPU run)" in text
    assert f"codec {field_of(ExtractConfig, 'codec').default}." in text  # the stores' codec: the pipeline's default
    for phase in ("plain forward epoch", "extraction, per-token store", "extraction, pooled store",
                  "per-token store: one epoch, 2 seed(s)", "pooled store: one epoch, 2 seed(s)",
                  "per-token store: evaluation, 2 seed(s)",
                  "extraction, pooled store, batches of <= ", "pooled store extracted in fine-tuning's batch size",
                  "| stage two, pooled store, 1 seed(s) | failed: RuntimeError: CUDA error: injected second line |",
                  "per-token store streamed from the store (memory_budget=0): one epoch, 2 seed(s) |",
                  "per-token store streamed from pinned host memory (memory_budget=0): one epoch, 2 seed(s) |",
                  "GRU steps in torch operators (no fused cell kernels): one epoch, 2 seed(s) |",
                  "Eager GRU layer steps through the fused cell kernels / in torch operators, a 2-seed epoch: **",
                  "stage two --cuda-graphs, per-token store: one epoch, 2 seed(s) |",
                  "stage two --cuda-graphs, pooled store: warm-up epoch, 2 seed(s) |",
                  "stage two --cuda-graphs --tf32, per-token store: one epoch, 2 seed(s) |",
                  "READ from the cache (--cuda-graphs, pooled store), 2 seeds",
                  "full fine-tuning: warm-up epoch", "full fine-tuning, one epoch", "Disk: sequential write",
                  "MiB/s into the page cache, not fsync'd", "Command: `python benchmarks/gpu.py --shape t5-tiny"):
        assert phase in text, phase
    assert (REPO / "BENCHMARKS.md").read_bytes() == real
    # --render rebuilds the section from the saved figures alone; a compile that failed is said in its row.
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["args"]["seeds"] == 2 and results["finetune"]["epoch"]["wall"] > 0
    assert results["extract_all"]["writers_busy_s"] > 0 and "writers busy" in text
    assert 0 < results["train_all_2"]["read"]["store_reads_s"] <= results["train_all_2"]["read"]["wall"]
    assert "of which reading the states: " in text and ", copying them to the device: " in text
    assert results["train_all_2"]["read"]["copies_s"] >= 0
    assert results["train_all_2"]["evaluation"]["wall"] > 0
    assert "failing_once" in results["train_pooled_1"]["trace"]  # the traceback, for whoever reads the file
    results["extract_pooled"] = {"error": "OSError: disk full"}
    results["args"]["compiled"] = True
    results["compiled_all_1"] = results["train_all_1"]
    results["compiled_all_2"] = {"error": "BackendCompilerFailed: no compiler"}
    results["graphs_all_1"], results["graphs_all_2"] = results["train_all_1"], results["train_all_2"]
    results["graphs_warm_all_2"] = results["graphs_streamed_all_2"] = results["train_all_2"]
    (tmp_path / "edited.json").write_text(json.dumps(results))
    assert module.main(["--render", str(tmp_path / "edited.json"), "--benchmarks", str(copy)]) == 0
    rendered = copy.read_text()
    assert rendered.count("## GPU") == 1 and "## Other\n\nkept" in rendered
    assert "stage two --compile, per-token store: one epoch, 1 seed(s)" in rendered
    assert "| extraction, pooled store | failed: OSError: disk full |" in rendered
    assert "stage two --compile, per-token store, 2 seed(s) | failed: BackendCompilerFailed: no compiler" in rendered
    assert "stage two --compile --cuda-graphs --tf32, per-token store: warm-up epoch, 2 seed(s)" in rendered
    assert "Stage two (--compile --cuda-graphs --tf32): a 2-seed epoch" in rendered
    assert "READ from the cache (--compile --cuda-graphs --tf32)" in rendered
    assert "READ from the cache (eager, pooled store)" not in rendered  # its extraction failed above
    assert "Extraction throughput / plain forward, per-token store: **" in rendered
    assert "READ from the cache (--compile --cuda-graphs --tf32, compile caches warm)" in rendered
    assert "READ from the cache (eager, streamed from the store: rows not held on the device)" in rendered
    assert "READ from the cache (--compile --cuda-graphs --tf32, streamed 2 blocks at a time)" in rendered
    assert "compile caches warm (a second run on this machine): one epoch, 2 seed(s)" in rendered
    t, ft = results["train_all_2"], results["finetune"]
    read = results["extract_all"]["wall"] + t["read"]["wall"] + t["warm_up"]["wall"] + 9 * t["epoch"]["wall"]
    full = 2 * (ft["warm_up"]["wall"] + 9 * ft["epoch"]["wall"])  # each seed's fine-tuning has its first epoch
    assert f"**{full / read:.1f}x** less wall time" in rendered
    assert (REPO / "BENCHMARKS.md").read_bytes() == real
