"""The paths that make both stages fast on an accelerator, checked on CPU against the plain ones.

Stage two: rows held on the device vs streamed give the same batches and the same trained weights; a
non-finite loss, checked only every few steps, still names the seeds a per-step check would. Stage
one: the device-side block buffer holds what the host path writes; a pool of writers writes the same
bytes as one writer (the kill -9 resume with a pool is in tests/test_extract.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import ensure_split, tree_bytes

from pipeline.common.config import ExtractConfig, TrainConfig
from pipeline.common.errors import TrainingError
from pipeline.extraction.stage import StateSink, copy_states, extract
from pipeline.store import STORED_DTYPES, CacheStore, stored_view, torch_dtype
from pipeline.training import Trainer
from pipeline.training.trainer import NEVER


def trainer(cache: str, out: Path, **kw) -> Trainer:
    cfg = TrainConfig(cache=cache, out=str(out), epochs=1, rnn_dim=16, batch_size=8, device="cpu",
                      seeds=kw.pop("seeds", (0, 1)), patience=None, **kw)
    return Trainer(cfg, progress=False)


def one_epoch(t: Trainer) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    optimizer = torch.optim.AdamW(t.model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = t.train_epoch(1, optimizer, scheduler)
    return loss, {name: p.detach().clone() for name, p in t.model.named_parameters()}


def test_held_and_streamed_rows_train_the_same_weights(synthetic_store, tmp_path):
    # One block: the streamed order is the held order, so batches and weights must agree bit for bit.
    cache = synthetic_store(splits={"train": 60, "validation": 20}, block_tokens=10_000).path
    held = trainer(cache, tmp_path / "a", memory_budget=2**40)
    streamed = trainer(cache, tmp_path / "b", memory_budget=0)
    assert held.train_data.in_memory and not streamed.train_data.in_memory
    assert held.train_data.split.num_blocks == 1 and held.train_data.device == torch.device("cpu")
    untrained = dict(held.model.named_parameters())
    untrained = {n: p.detach().clone() for n, p in untrained.items()}
    loss_a, weights_a = one_epoch(held)
    loss_b, weights_b = one_epoch(streamed)
    np.testing.assert_array_equal(loss_a, loss_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert any(not torch.equal(weights_a[n], p) for n, p in untrained.items())  # it did train
    np.testing.assert_array_equal(held.predict("validation")[0], streamed.predict("validation")[0])


def test_the_phase_hook_times_the_real_loop_and_changes_nothing(synthetic_store, tmp_path):
    cache = synthetic_store(splits={"train": 30, "validation": 10}, block_tokens=10_000).path
    plain, hooked = trainer(cache, tmp_path / "a"), trainer(cache, tmp_path / "b")
    calls: list[str] = []
    optimizer = torch.optim.AdamW(hooked.model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_b = hooked.train_epoch(1, optimizer, scheduler, phase=calls.append)
    loss_a, weights_a = one_epoch(plain)
    np.testing.assert_array_equal(loss_a, loss_b)
    for name, p in hooked.model.named_parameters():
        assert torch.equal(weights_a[name], p), name
    assert calls == ["batch", "forward", "backward", "step"] * 4  # 30 examples in batches of 8


def test_a_non_finite_loss_names_the_seed_that_went_bad(t5_store, tmp_path):
    t = trainer(t5_store, tmp_path, seeds=(0, 1, 2))
    t.model.load_seed_state_dict(1, {n: torch.full_like(v, float("nan")) for n, v in t.model.seed_state_dict(1).items()})
    with pytest.raises(TrainingError, match=r"non-finite training loss at epoch 1 for seed\(s\) \[1\];"):
        one_epoch(t)


def test_the_deferred_check_names_the_earliest_step_only(t5_store, tmp_path):
    t = trainer(t5_store, tmp_path, seeds=(0, 7, 9))
    t._check_finite(torch.full((3,), NEVER), 2)  # nothing went bad: no error
    with pytest.raises(TrainingError, match=r"at epoch 2 for seed\(s\) \[7, 9\];"):
        t._check_finite(torch.tensor([5, 3, 3]), 2)


def check_block_buffer(pooled: bool, device: str) -> None:
    """The accelerator's gather/convert/scatter into a block buffer on ``device`` against the per-slice host path."""
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(3, 7, 16, generator=gen) for _ in range(4)]
    lengths, layers, dtype = [7, 2, 5], [0, 2, 3], "bfloat16"
    rows = [1, 1, 1] if pooled else lengths
    starts = [int(s) for s in np.cumsum([0, *rows[:-1]]) + 3]  # not from row 0: the scatter must place them
    shape = (sum(rows) + 5, len(layers), 16)
    host = np.zeros(shape, dtype=STORED_DTYPES[dtype])
    copy_states(host, dtype, states, layers, lengths, starts, pooled=pooled)
    block = torch.zeros(shape, dtype=torch_dtype(dtype), device=device)
    copy_states(block, dtype, [s.to(device) for s in states], layers, lengths, starts, pooled=pooled)
    from_device_to_host = np.zeros(shape, dtype=STORED_DTYPES[dtype])  # a device's states into a host block
    copy_states(from_device_to_host, dtype, [s.to(device) for s in states], layers, lengths, starts, pooled=pooled)
    one_at_a_time = torch.zeros(shape, dtype=torch_dtype(dtype), device=device)  # as the forward hands them over
    sink = StateSink(one_at_a_time, dtype, lengths, starts, pooled=pooled)
    for j, layer in enumerate(layers):
        sink(j, states[layer].to(device))
    for device_rows in (stored_view(block.cpu(), dtype), from_device_to_host,
                        stored_view(one_at_a_time.cpu(), dtype)):
        if pooled:  # float32 means summed in another order: equal up to one bf16 rounding step
            np.testing.assert_allclose(torch.from_numpy(device_rows.view(np.int16)).view(torch.bfloat16).float(),
                                       torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).float(), rtol=1e-2)
        else:
            np.testing.assert_array_equal(device_rows, host)
        assert not device_rows[: starts[0]].any()


@pytest.mark.parametrize("pooled", [False, True])
def test_a_device_block_buffer_holds_what_the_host_path_writes(pooled):
    check_block_buffer(pooled, "cpu")  # run on CPU tensors; tests/test_cuda.py runs it on a GPU


def test_the_device_gather_holds_one_layer_s_rows_at_a_time():
    # Stacking every kept layer's float32 rows before converting them held 2 x layers x rows x d floats on top of
    # the forward's own memory (1.3 GB for a T5-base batch of 16,384 tokens); a layer at a time holds one layer's.
    from pipeline.common.resources import peak_tensor_bytes

    B, T, d, n_states = 8, 128, 64, 13
    states = [torch.randn(B, T, d) for _ in range(n_states)]
    lengths = [T] * B
    block = torch.zeros((B * T, n_states, d), dtype=torch.bfloat16)
    peak = peak_tensor_bytes(lambda: copy_states(block, "bfloat16", states, list(range(n_states)), lengths,
                                                 [k * T for k in range(B)], pooled=False))
    one_layer = B * T * d * 4  # float32 rows of one layer
    assert peak < 2 * one_layer, peak / one_layer


@pytest.mark.parametrize("family", ["seq2seq", "encoder"])
def test_rows_held_on_the_host_stream_the_chunks_the_store_gives_reading_it_once(synthetic_store, monkeypatch,
                                                                                 family):
    # A streamed split that fits the host budget is read once; every epoch's chunks, copied from the host's rows,
    # are the ones read from the store again, bit for bit, in the same order; a subset shares the rows.
    from pipeline.training import batches as module
    from pipeline.training.batches import SplitBatches

    loads = []
    load_chunk = module.load_chunk
    monkeypatch.setattr(module, "load_chunk", lambda split, blocks, labels, **kw: loads.append(list(blocks))
                        or load_chunk(split, blocks, labels, **kw))
    split = CacheStore(synthetic_store(family=family, splits={"train": 90}, block_tokens=40).path).split("train")
    labels = torch.from_numpy(np.asarray(split.labels))
    from_store = SplitBatches(split, labels, memory_budget=0, shuffle_buffer=2)
    from_host = SplitBatches(split, labels, memory_budget=0, shuffle_buffer=2, host_budget=2**40)
    assert from_host.host_held and not from_store.host_held and not from_host.in_memory
    assert split.num_blocks >= 5
    picks = np.arange(0, 90, 3)
    for data in (from_host, from_host.subset(picks)):
        store_side = from_store if data is from_host else from_store.subset(picks)
        for epoch in (1, 2):
            loads.clear()
            want = list(store_side.epoch(8, shuffle=True, seed=epoch))
            assert len(loads) >= 3  # read from the store, a group of blocks at a time
            loads.clear()
            got = list(data.epoch(8, shuffle=True, seed=epoch))
            assert loads == []  # the host's rows, read once before
            assert len(got) == len(want) >= 4
            assert_same_batches(got, want)


def assert_same_batches(got: list, want: list) -> None:
    """The same (example indices, batch) pairs, bit for bit, in the same order."""
    assert len(got) == len(want)
    for (index_a, a), (index_b, b) in zip(want, got):
        np.testing.assert_array_equal(index_a, index_b)
        for name in ("labels", "encoder", "encoder_segment", "encoder_first", "decoder"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name


def test_an_epoch_yields_the_batches_it_counts(synthetic_store):
    # Streamed, each group of blocks ends in a partial batch of its own, so an epoch has more batches than
    # ceil(n / batch), as many as its group order makes; the learning-rate schedule is planned from this count.
    from pipeline.training.batches import SplitBatches

    split = CacheStore(synthetic_store(splits={"train": 90}, block_tokens=40).path).split("train")
    labels = torch.from_numpy(np.asarray(split.labels))
    assert split.num_blocks >= 5
    held = SplitBatches(split, labels, memory_budget=2**40)
    streams = [SplitBatches(split, labels, memory_budget=0, shuffle_buffer=b) for b in (1, 2, 3)]
    more = 0
    for whole in (held, *streams):
        for data in (whole, whole.subset(np.arange(0, 90, 4))):
            for batch_size in (4, 7):
                for shuffle, seed in ((True, 1), (True, 2), (False, 0)):
                    counted = data.num_batches(batch_size, shuffle=shuffle, seed=seed)
                    assert counted == len(list(data.epoch(batch_size, shuffle=shuffle, seed=seed)))
                    more += counted > -(-len(data) // batch_size)
    assert more > 0  # the case at hand


def test_an_epoch_resumed_after_k_batches_yields_the_rest_reading_only_their_blocks(synthetic_store, monkeypatch):
    # A run resumed within an epoch replays that epoch's order from batch k on: the same batches as the epoch's
    # own k-th onward, held or streamed (the seeded order of the groups and of the rows in each), whole or a subset.
    from pipeline.training import batches as module
    from pipeline.training.batches import SplitBatches

    loads: list[list[int]] = []
    load_chunk = module.load_chunk
    monkeypatch.setattr(module, "load_chunk", lambda split, blocks, labels, **kw: loads.append(list(blocks))
                        or load_chunk(split, blocks, labels, **kw))
    split = CacheStore(synthetic_store(splits={"train": 90}, block_tokens=40).path).split("train")
    labels = torch.from_numpy(np.asarray(split.labels))
    held = SplitBatches(split, labels, memory_budget=2**40)
    streams = [SplitBatches(split, labels, memory_budget=0, shuffle_buffer=b) for b in (1, 3)]
    unread = 0
    for whole in (held, *streams):
        for data in (whole, whole.subset(np.arange(0, 90, 4))):
            for shuffle, seed in ((True, 1), (True, 2), (False, 0)):
                loads.clear()
                want = list(data.epoch(7, shuffle=shuffle, seed=seed))
                read_whole = sum(map(len, loads))
                for skip in sorted({1, 2, 5, len(want) - 1, len(want)}):
                    loads.clear()
                    assert_same_batches(list(data.epoch(7, shuffle=shuffle, seed=seed, skip=skip)), want[skip:])
                    unread += sum(map(len, loads)) < read_whole
    assert unread > 0  # streamed: the groups that only skipped batches come from stay unread


def test_a_streamed_run_plans_its_schedule_for_every_step(synthetic_store, tmp_path):
    # Planned from ceil(n / batch) steps an epoch, a streamed run's warm-up and decay ran short: its last steps
    # had a learning rate of zero. Every step now has a rate above zero, and the schedule ends on the last one.
    cache = synthetic_store(splits={"train": 90, "validation": 10}, block_tokens=40).path
    t = trainer(cache, tmp_path, memory_budget=0, shuffle_buffer=2)
    assert not t.train_data.in_memory
    epochs = 3
    optimizer, scheduler = t.optimizer(epochs)
    rates: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(float(opt.param_groups[0]["lr"])))
    for epoch in range(1, epochs + 1):
        t.train_epoch(epoch, optimizer, scheduler)
    assert len(rates) == scheduler.last_epoch == sum(t.steps_in_epoch(e) for e in range(1, epochs + 1))
    assert len(rates) > epochs * -(-len(t.train_data) // t.cfg.batch_size)
    assert min(rates) > 0 and scheduler.get_last_lr()[0] == 0.0


def test_a_pool_of_writers_writes_the_same_bytes_as_one(tiny_t5, tmp_path, glue_dir):
    stores = {}
    for writers in (1, 4):
        cfg = ExtractConfig(model=str(tiny_t5), task="rte", out=str(tmp_path / f"w{writers}.zarr"),
                            glue_dir=str(glue_dir), splits="validation", limit=40, max_length=64, batch_tokens=256,
                            block_tokens=128, writers=writers)
        extract(cfg, progress=False)
        stores[writers] = cfg.out_path
    assert CacheStore(stores[4]).split("validation").num_blocks >= 6
    assert tree_bytes(stores[1]) == tree_bytes(stores[4])


@pytest.mark.slow
@pytest.mark.parametrize("family, padded", [("seq2seq", False), ("encoder", False), ("seq2seq", True)])
def test_a_compiled_step_trains_the_eager_weights(synthetic_store, tmp_path, family, padded):
    # --compile changes how the step runs, not what it computes: same dropout masks, same batches, so the
    # weights after an epoch agree with the eager ones up to float rounding (fused kernels sum differently).
    # padded: --compile --cuda-graphs on this CPU (compiled, no graphs), its batches padded as they are on CUDA.
    cache = synthetic_store(family=family, splits={"train": 60, "validation": 20}).path
    eager = trainer(cache, tmp_path / "a")
    compiled = trainer(cache, tmp_path / "b", compile=True, cuda_graphs=padded)
    assert compiled.step_loss is not eager.step_loss and compiled.compiled and not eager.compiled
    assert not compiled.cuda_graphs and not compiled.pad_tokens  # no CUDA here
    compiled.pad_tokens = padded
    assert len(compiled.train_data) % 8  # a last, smaller batch: run eagerly, not compiled a second time
    loss_a, weights_a = one_epoch(eager)
    torch._dynamo.reset()  # compiled afresh here, not served by another test's graph
    torch._dynamo.utils.counters.clear()
    loss_b, weights_b = one_epoch(compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert eager.model.config.dropout > 0  # the masks came from the per-seed streams in both runs


@pytest.mark.slow
def test_a_compiler_failure_is_one_line_that_names_the_way_out(synthetic_store, tmp_path):
    import torch._dynamo
    import torch._inductor.config as inductor
    from click.testing import CliRunner

    from pipeline.cli import main

    torch._dynamo.reset()  # no graph compiled by another test may serve this one
    cache = synthetic_store(splits={"train": 30, "validation": 10}).path
    # inductor's own patch, not monkeypatch: undoing a monkeypatch on its sub-config deletes the setting for
    # every later compile in the process
    before = (inductor.cpp.cxx, inductor.fx_graph_cache)
    with inductor.patch({"fx_graph_cache": False, "cpp.cxx": ("no-such-compiler",)}):
        result = CliRunner().invoke(main, ["train", "--cache", cache, "--out", str(tmp_path / "run"), "--compile",
                                           "--epochs", "1", "--rnn-dim", "8", "--batch-size", "8", "--device", "cpu",
                                           "--quiet"])
    torch._dynamo.reset()
    assert (inductor.cpp.cxx, inductor.fx_graph_cache) == before  # later tests compile as usual
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.output.startswith("Error: --compile failed: ") and result.output.count("\n") == 1, result.output
    assert "train without --compile" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("family", ["seq2seq", "encoder", "decoder"])
def test_the_compiled_step_is_one_graph(family):
    # Graph breaks split a compiled step into pieces, each with its own launches and Python glue: the dropout
    # masks are drawn before the forward (their per-seed generators cannot be traced), so nothing breaks it.
    import torch._dynamo

    from pipeline.training.model import ReadConfig, ReadModel, StepLoss
    from pipeline.training.network import SideBatch

    d, B, N = 16, 4, 13
    config = ReadConfig(family=family, d_model=d, num_labels=2, task_kind="classification", rnn_dim=8, dropout=0.1)
    model = ReadModel(config, [0, 1], label_rows=None if family == "encoder" else torch.randn(2, d)).train()
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    batch = SideBatch(labels=torch.tensor([0, 1, 1, 0]), decoder=None if family == "encoder" else torch.randn(B, 3, d),
                      encoder=None if family == "decoder" else torch.randn(N, 3, d),
                      encoder_segment=None if family == "decoder" else segment)
    masks = model.dropout_masks(batch)
    assert set(masks) == {"seq2seq": {"encoder_net", "decoder_net"}, "encoder": {"encoder_net"},
                          "decoder": {"decoder_net"}}[family]
    explained = torch._dynamo.explain(StepLoss(model, "classification"))(batch, masks)  # what the Trainer compiles
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_tf32_changes_cuda_products_only(synthetic_store, tmp_path):
    from pipeline.common.resources import set_cuda_tf32

    cpu_precision = torch.backends.mkldnn.matmul.fp32_precision
    try:
        set_cuda_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.mkldnn.matmul.fp32_precision == cpu_precision
        set_cuda_tf32(False)
        trainer(synthetic_store(splits={"train": 30, "validation": 10}).path, tmp_path, tf32=True)  # on CPU: no change
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        set_cuda_tf32(False)


@pytest.mark.parametrize("memory_budget", [2**40, 0])
def test_a_non_finite_state_names_its_block_before_any_training(synthetic_store, tmp_path, memory_budget):
    from pipeline.store import StoreWriter

    store = synthetic_store(splits={"train": 60, "validation": 20}, block_tokens=64)
    split = store.splits["train"]
    assert split.plan.num_blocks >= 3
    example = int(np.asarray(CacheStore(store.path).split("train").block_starts)[2])  # the first of block 2
    split.states["encoder"][example][0, 0, 0] = np.inf
    writer = StoreWriter(store.path, store.meta)
    ensure_split(writer, "train", split)  # the split as written: its block is rewritten, checksum and all
    writer.write_block("train", 2, *store.block_buffers("train", 2))
    message = r"non-finite values in train/encoder block 2; run `pipeline verify` on the store and re-extract it"
    with pytest.raises(TrainingError, match=message):
        t = trainer(store.path, tmp_path, memory_budget=memory_budget)
        one_epoch(t)  # streamed: the block is read in the epoch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_finite_check_sees_every_nan_and_infinity(dtype):
    from pipeline.training.batches import all_finite

    assert all_finite(torch.randn(4, 3, 33).to(dtype)) and all_finite(torch.zeros(0, 3, dtype=dtype))
    for n in (1, 17, 1000, 65_537):
        for position in {0, n // 2, n - 1}:
            for bad in (float("nan"), float("inf"), float("-inf")):
                values = torch.randn(n).to(dtype)
                values[position] = bad
                assert not all_finite(values.view(1, n)), (n, position, bad)


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_cuda_graph_failure_is_one_line_that_names_the_way_out(synthetic_store, tmp_path, where):
    t = trainer(synthetic_store(splits={"train": 60, "validation": 20}).path, tmp_path)
    eager = t.step_loss

    def failing(batch, masks):
        if where == "forward":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")
        return _FailsInBackward.apply(eager(batch, masks))

    t.step_loss = failing
    with pytest.raises(RuntimeError, match="stream is capturing") as plain:  # without --cuda-graphs: as it is
        one_epoch(t)
    assert not isinstance(plain.value, TrainingError)
    t.cuda_graphs = True  # what a CUDA device sets (cudagraph_mark_step_begin is harmless on CPU)
    with pytest.raises(TrainingError, match=r"^--cuda-graphs failed: the step could not run as CUDA graphs \(CUDA "
                                            r"error: operation not permitted when stream is capturing\); train "
                                            r"without --cuda-graphs \(--compile alone or eager: same results\)$"):
        one_epoch(t)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graphs_without_cuda_say_so_and_train(synthetic_store, tmp_path, compiled):
    from click.testing import CliRunner

    from pipeline.cli import main

    cache = synthetic_store(splits={"train": 30, "validation": 10}).path
    result = CliRunner().invoke(main, ["train", "--cache", cache, "--out", str(tmp_path / "run"), "--cuda-graphs",
                                       "--epochs", "1", "--rnn-dim", "16", "--seeds", "0,1", "--batch-size", "8",
                                       "--device", "cpu", *(["--compile"] if compiled else ["--quiet"])])
    # (the compiled tests' shapes: their compile serves; --quiet hides progress, not a flag that is not obeyed)
    assert result.exit_code == 0, (result.output, result.exception)
    said = "the step is compiled" if compiled else "eager steps"
    assert f"--cuda-graphs: no CUDA device (cpu), so no graphs; {said}" in result.output
    assert ("--compile: the first steps build the compiled step" in result.output) == compiled
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_states_handed_over_one_at_a_time_share_one_set_of_indices(monkeypatch):
    # Each index tensor crosses from host memory, which may wait for the device; a batch's states (13 for T5-base)
    # must not pay that once each.
    from pipeline.extraction import stage

    made = []
    rows = stage.DeviceRows
    monkeypatch.setattr(stage, "DeviceRows", lambda *a, **k: made.append(1) or rows(*a, **k))
    block = torch.zeros((20, 4, 8), dtype=torch.bfloat16)
    sink = StateSink(block, "bfloat16", [5, 3], [0, 5], pooled=False)
    for j in range(4):
        sink(j, torch.randn(2, 5, 8))
    assert len(made) == 1 and block[:8].abs().sum() > 0


def test_the_meters_peak_rss_is_the_runs_not_the_processs():
    # getrusage's peak never goes down: in a notebook, or a sweep's worker, a run reported what ran before it.
    import resource

    from pipeline.common.resources import ResourceMeter

    before = np.ones(400 * 2**20 // 8)  # 400 MiB touched, then given back to the system
    del before
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with ResourceMeter(torch.device("cpu")) as meter:
        during = np.ones(50 * 2**20 // 8)  # 50 MiB
        del during
    summary = meter.summary()
    if summary["peak_rss_scope"] == "process":
        pytest.skip("this kernel cannot reset the peak (no /proc/self/clear_refs)")
    assert summary["peak_rss_mb"] < process_peak - 300
