"""The CUDA paths, where there is a GPU: the same work on the accelerator and on the CPU, compared.

tests/test_device_paths.py checks the logic of these paths on the CPU; what only an accelerator runs is
checked here: a split's batches, held on the device or streamed (from the store or from pinned host memory, a
copy stream, events), equal the CPU's bit for bit; training (fused AdamW, the deferred finite check) reaches the
CPU's losses and weights up to float rounding, and its ``--cuda-graphs`` forms (the eager step recorded, held or
streamed; the compiled step, with no step left out of its graphs) the eager weights; a run stopped and resumed
from its checkpoint (device generators, fused AdamW's state, graphs recorded again) the uninterrupted run's;
torch's fused GRU cell kernels, which the eager step runs there, compute what their CPU stand-ins compute;
extraction's device-side block buffer and its pinned copy hold what the CPU writes, up to float rounding.

Skipped without CUDA. ``READ_TEST_DEVICE=cpu`` runs them with the CPU standing in for the accelerator, which
checks the tests themselves. On a GPU machine: ``python -m pytest tests/test_cuda.py`` (the command that
``benchmarks/gpu_prepare.sh`` prints runs it before the benchmark).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_device_paths import check_block_buffer
from test_resume import Stop, stopped_at, stopped_within

from pipeline.common.config import ExtractConfig, TrainConfig
from pipeline.extraction.stage import extract
from pipeline.store import CacheStore, logical_view
from pipeline.training import Trainer, fused_gru
from pipeline.training.network import SideBatch

DEVICE = os.environ.get("READ_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="no CUDA device (READ_TEST_DEVICE=cpu runs these on the CPU)")


def trainer(cache: str, out: Path, device: str, **kw) -> Trainer:
    cfg = TrainConfig(cache=cache, out=str(out), epochs=2, rnn_dim=16, batch_size=8, device=device, seeds=(0, 1),
                      patience=None, **kw)
    return Trainer(cfg, progress=False)


def batches(t: Trainer) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Two shuffled training epochs and the validation split, each batch brought back to the host."""
    def host(batch: SideBatch) -> dict[str, torch.Tensor]:
        return {f.name: getattr(batch, f.name).cpu() for f in dataclasses.fields(batch)
                if getattr(batch, f.name) is not None}

    out = [(index, host(b)) for epoch in (1, 2) for index, b in t.train_data.epoch(8, shuffle=True, seed=epoch)]
    return out + [(index, host(b)) for index, b in t.eval_data["validation"].epoch(16, shuffle=False)]


@pytest.mark.parametrize("memory_budget, host_memory_budget", [(2**40, 0), (0, 2**40), (0, 0)],
                         ids=["held", "streamed-from-host-memory", "streamed-from-the-store"])
def test_a_split_yields_the_cpu_batches_bit_for_bit(synthetic_store, tmp_path, memory_budget, host_memory_budget):
    # Several blocks, streamed two at a time: the next group is read (or taken from pinned host memory) and copied
    # while the current one is used.
    cache = synthetic_store(splits={"train": 80, "validation": 30}, block_tokens=40).path
    budgets = dict(memory_budget=memory_budget, host_memory_budget=host_memory_budget, shuffle_buffer=2)
    on_cpu = trainer(cache, tmp_path / "cpu", "cpu", **budgets)
    on_device = trainer(cache, tmp_path / "dev", DEVICE, **budgets)
    assert on_device.train_data.device.type == DEVICE and on_device.train_data.split.num_blocks >= 4
    assert on_device.train_data.in_memory == bool(memory_budget)
    assert on_device.train_data.host_held == (DEVICE == "cuda" and bool(host_memory_budget) and not memory_budget)
    expected, got = batches(on_cpu), batches(on_device)
    assert len(expected) == len(got) > 10
    for (index_a, a), (index_b, b) in zip(expected, got):
        np.testing.assert_array_equal(index_a, index_b)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def trained(t: Trainer) -> tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor]:
    """Two epochs with the Trainer's own optimiser (fused AdamW on CUDA): losses, weights, validation outputs."""
    optimizer, scheduler = t.optimizer()
    losses = np.stack([t.train_epoch(epoch, optimizer, scheduler) for epoch in (1, 2)])
    t.model.eval()
    with torch.no_grad():
        validation = t.eval_data["validation"].epoch(16, shuffle=False)
        outputs = torch.cat([t.model(b.to(t.device)).cpu() for _, b in validation], dim=1)
    return losses, {n: p.detach().cpu() for n, p in t.model.named_parameters()}, outputs


def assert_trained_alike(a: tuple, b: tuple) -> None:
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4)
    for name in a[1]:
        torch.testing.assert_close(b[1][name], a[1][name], rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(b[2], a[2], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["seq2seq", "encoder"])
def test_training_on_the_device_reaches_the_cpu_weights(synthetic_store, tmp_path, family):
    # No dropout: the CPU and CUDA generators draw different masks from the same seed (Mersenne Twister, Philox).
    cache = synthetic_store(family=family, splits={"train": 60, "validation": 20}).path
    on_cpu = trainer(cache, tmp_path / "cpu", "cpu", dropout=0.0)
    on_device = trainer(cache, tmp_path / "dev", DEVICE, dropout=0.0)
    assert next(on_device.model.parameters()).device.type == DEVICE
    assert_trained_alike(trained(on_cpu), trained(on_device))


def test_the_fused_gru_kernels_compute_what_their_stand_ins_compute():
    g = torch.Generator().manual_seed(0)
    M, r = 300, 24
    gx, gh = (torch.randn(M, 3 * r, generator=g).to(DEVICE) for _ in range(2))
    h, grad = (torch.randn(M, r, generator=g).to(DEVICE) for _ in range(2))
    hy, workspace = fused_gru._cell(gx, gh, h)
    want_hy, want_workspace = fused_gru.reference_cell(gx, gh, h)
    torch.testing.assert_close(hy, want_hy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(workspace, want_workspace, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_gru._cell_backward(grad, workspace), fused_gru.reference_cell_backward(grad, workspace)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_eager_step_on_the_device_runs_the_fused_gru_kernels(synthetic_store, tmp_path, monkeypatch):
    calls = []
    cell = fused_gru._cell
    monkeypatch.setattr(fused_gru, "_cell", lambda *a: calls.append(a[0].device.type) or cell(*a))
    cache = synthetic_store(splits={"train": 24, "validation": 8}).path
    t = trainer(cache, tmp_path / "dev", DEVICE)
    t.train_epoch(1, *t.optimizer())
    # every GRU layer step on CUDA goes through the kernels; on the CPU none does (it keeps the composite step)
    assert (len(calls) > 0 and set(calls) == {"cuda"}) if DEVICE == "cuda" else calls == []


@pytest.mark.parametrize("memory_budget", [2**40, 0], ids=["held", "streamed"])
def test_recorded_cuda_graphs_train_the_eager_weights(synthetic_store, tmp_path, monkeypatch, memory_budget):
    # The whole step (forward, backward, clipping, fused AdamW with its learning rate as a tensor) recorded per
    # batch shape and replayed; streamed: the reader copies the next blocks from another thread during recordings.
    from pipeline.training import graphs as step_graphs

    replays = []
    record = step_graphs.CudaGraphRecorder.record

    def counted(self, run):
        replay, out = record(self, run)
        return (lambda: replays.append(1) or replay()), out

    monkeypatch.setattr(step_graphs.CudaGraphRecorder, "record", counted)
    cache = synthetic_store(splits={"train": 60, "validation": 20}, block_tokens=40).path
    eager = trainer(cache, tmp_path / "eager", DEVICE, memory_budget=memory_budget, shuffle_buffer=2)
    graphs = trainer(cache, tmp_path / "graphs", DEVICE, memory_budget=memory_budget, shuffle_buffer=2,
                     cuda_graphs=True)
    on_cuda = DEVICE == "cuda"
    assert not graphs.compiled and (graphs.recorder is not None) == graphs.pad_tokens == on_cuda
    expected, got = trained(eager), trained(graphs)
    if on_cuda:
        assert graphs._step_graphs[1].recordings >= 1 and len(replays) >= 3
    assert_trained_alike(expected, got)


def test_compiled_cuda_graphs_train_the_eager_weights_with_every_step_graphed(synthetic_store, tmp_path):
    cache = synthetic_store(splits={"train": 60, "validation": 20}).path
    eager = trainer(cache, tmp_path / "eager", DEVICE)
    graphs = trainer(cache, tmp_path / "graphs", DEVICE, compile=True, cuda_graphs=True)
    assert graphs.compiled and graphs.recorder is None and graphs.cuda_graphs == graphs.pad_tokens == (DEVICE == "cuda")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected, got = trained(eager), trained(graphs)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0  # Inductor graphed the whole step
    if graphs.cuda_graphs:  # and recorded graphs (torch's own bookkeeping of them)
        from torch._inductor.cudagraph_trees import get_manager

        manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        assert manager is not None and sum(len(nodes) for nodes in manager.roots.values()) >= 1
    assert_trained_alike(expected, got)


@pytest.mark.parametrize("within", [False, True], ids=["between-epochs", "within-an-epoch"])
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "recorded"])
def test_a_run_resumed_on_the_device_writes_what_the_uninterrupted_run_writes(synthetic_store, tmp_path, monkeypatch,
                                                                             cuda_graphs, within):
    # The checkpoint holds the device's dropout generators (Philox) and fused AdamW's state; under --cuda-graphs the
    # learning rate stays in its device tensor and the resumed run records its graphs again. 2 epochs, stopped
    # before the second, or after its second batch (a checkpoint due after every step).
    cache = synthetic_store(splits={"train": 60, "validation": 20}).path
    options = dict(checkpoint_seconds=1e-9 if within else 0, cuda_graphs=cuda_graphs)
    whole = trainer(cache, tmp_path / "whole", DEVICE, **options).run()
    with monkeypatch.context() as patch:
        stopped_within(patch, 2, 2) if within else stopped_at(patch, 2)
        with pytest.raises(Stop):
            trainer(cache, tmp_path / "resumed", DEVICE, **options).run()
    resumed = trainer(cache, tmp_path / "resumed", DEVICE, **options).run()
    assert resumed["resources"]["resumed_after_epoch"] == 1
    assert resumed["resources"].get("resumed_after_batches") == (2 if within else None)
    for seed, metrics in whole["seeds"].items():
        assert resumed["seeds"][seed] == pytest.approx(metrics, abs=1e-6)
    for seed in (0, 1):
        a, b = (load_file(str(tmp_path / run / "adapters" / f"seed_{seed}" / "adapter_model.safetensors"))
                for run in ("whole", "resumed"))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("pooled", [False, True])
def test_the_device_block_buffer_holds_what_the_host_path_writes(pooled):
    check_block_buffer(pooled, DEVICE)


@pytest.mark.parametrize("dtype, tokens, tolerance", [("float32", "all", 1e-4), ("float32", "pooled", 1e-4),
                                                      ("bfloat16", "all", 5e-2)])
def test_extraction_on_the_device_stores_the_cpu_states(tiny_t5, tmp_path, glue_dir, dtype, tokens, tolerance):
    # bfloat16: the backbone itself runs in bfloat16 on CUDA, so the states agree to bfloat16's precision only.
    stores = {}
    for device in ("cpu", DEVICE):
        cfg = ExtractConfig(model=str(tiny_t5), task="rte", out=str(tmp_path / f"{device}.zarr"),
                            glue_dir=str(glue_dir), splits="validation", limit=40, max_length=64, batch_tokens=256,
                            block_tokens=128, dtype=dtype, tokens=tokens, device=device, writers=2)
        extract(cfg, progress=False)
        stores[device] = CacheStore(cfg.out_path).split("validation")
    cpu, dev = stores["cpu"], stores[DEVICE]
    assert cpu.num_blocks == dev.num_blocks >= (2 if tokens == "all" else 1)
    np.testing.assert_array_equal(np.asarray(cpu.ids), np.asarray(dev.ids))
    for side in cpu.sides:
        for block in range(cpu.num_blocks):
            a = logical_view(cpu.read_block(block, side), dtype).astype(np.float32)
            b = logical_view(dev.read_block(block, side), dtype).astype(np.float32)
            assert a.shape == b.shape and np.isfinite(b).all()
            assert np.linalg.norm(b - a) <= tolerance * np.linalg.norm(a), (side, block)
