"""Whole training steps recorded and replayed (pipeline.training.graphs), on the CPU stand-in for CUDA graphs.

``graph_tape.TapeRecorder`` replays a recorded step as a CUDA graph would: the same operators on the same
tensors with the values they had when recorded. So these tests check, without a GPU, what makes a step safe to
replay: nothing read from Python at run time, nothing that waits for the device, inputs copied into the
buffers the recording read. tests/test_cuda.py runs the same training through real CUDA graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from graph_tape import TapeRecorder

from pipeline.common.config import TrainConfig
from pipeline.training import Trainer
from pipeline.training.graphs import StepGraphs
from pipeline.training.network import SideBatch


def trainer(cache: str, out: Path, recorder: TapeRecorder | None = None, **kw) -> Trainer:
    cfg = TrainConfig(cache=cache, out=str(out), epochs=2, rnn_dim=16, batch_size=8, device="cpu", seeds=(0, 1),
                      patience=None, **kw)
    return Trainer(cfg, progress=False, recorder=recorder)


def two_epochs(t: Trainer) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Two epochs with the trainer's own optimiser and schedule: the losses and the weights."""
    optimizer, scheduler = t.optimizer()
    losses = np.stack([t.train_epoch(epoch, optimizer, scheduler) for epoch in (1, 2)])
    return losses, {name: p.detach().clone() for name, p in t.model.named_parameters()}


@pytest.mark.parametrize("family, memory_budget", [("seq2seq", "8GB"), ("encoder", "8GB"), ("decoder", "8GB"),
                                                   ("seq2seq", 0)])
def test_replayed_steps_train_the_eager_weights(synthetic_store, tmp_path, family, memory_budget):
    # Per-token batches of several token counts (several graphs), dropout on (masks drawn outside the graphs),
    # a warm-up schedule (the learning rate changes every step, read from a tensor at each replay) and an
    # epoch's smaller last batch (eager, between replays): the weights are the eager ones up to float rounding.
    # memory_budget=0: the rows streamed by block, each block's last batch smaller (eager) too.
    cache = synthetic_store(family=family, splits={"train": 100, "validation": 20}, max_tokens=6,
                            block_tokens=120).path
    options = dict(warmup_ratio=0.5, memory_budget=memory_budget, shuffle_buffer=2)
    eager = trainer(cache, tmp_path / "eager", **options)
    tape = TapeRecorder()
    replayed = trainer(cache, tmp_path / "replayed", tape, **options)
    assert replayed.train_data.in_memory == (memory_budget != 0)
    assert replayed.pad_tokens and not eager.pad_tokens and eager.recorder is None
    assert len(replayed.train_data) % 8 and replayed.model.config.dropout > 0
    loss_a, weights_a = two_epochs(eager)
    loss_b, weights_b = two_epochs(replayed)
    graphs = replayed._step_graphs[1]
    assert graphs.recordings >= 1 and tape.replays >= 3  # steps really replayed, not all run eagerly
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_value_read_from_python_would_be_replayed_stale():
    # What the stand-in catches: a float is fixed into the recording at its value then (as a CUDA graph fixes a
    # kernel's scalar arguments), where a tensor is read at each replay, as the trainer's learning rate is.
    def run(from_tensor: bool) -> torch.Tensor:
        w, lr, value = torch.ones(3), torch.zeros(()), {"lr": 0.0}

        def step(batch: SideBatch, masks) -> torch.Tensor:
            w.sub_(lr if from_tensor else value["lr"])
            return w.sum().reshape(1)

        graphs = StepGraphs(step, TapeRecorder())
        for k in range(4):  # eager, recorded (and taken), replayed, replayed
            lr.fill_(0.1 * (k + 1))
            value["lr"] = 0.1 * (k + 1)
            graphs(SideBatch(labels=torch.zeros(2)), {})
        return w

    torch.testing.assert_close(run(True), torch.full((3,), 1 - (0.1 + 0.2 + 0.3 + 0.4)))
    torch.testing.assert_close(run(False), torch.full((3,), 1 - (0.1 + 0.2 + 0.2 + 0.2)))


def test_a_step_that_waits_for_the_device_cannot_be_recorded():
    w = torch.ones(3)

    def step(batch: SideBatch, masks) -> torch.Tensor:
        if w.sum().item() > 0:  # a host decision from a device value: a graph cannot record it
            w.mul_(0.5)
        return w.sum().reshape(1)

    graphs = StepGraphs(step, TapeRecorder())
    batch = SideBatch(labels=torch.zeros(2, dtype=torch.long))
    graphs(batch, {})  # the first step of a shape runs eagerly
    with pytest.raises(RuntimeError, match="waits for the device"):
        graphs(batch, {})


def test_each_shape_runs_eagerly_once_then_is_recorded_then_replayed_from_shared_buffers():
    ran: list[int] = []

    def step(batch: SideBatch, masks) -> torch.Tensor:
        assert batch.encoder is not None
        ran.append(int(batch.encoder.shape[0]))
        return batch.encoder.sum().reshape(1)

    tape = TapeRecorder()
    graphs = StepGraphs(step, tape)

    def call(rows: int, value: float) -> float:
        batch = SideBatch(labels=torch.zeros(2), encoder=torch.full((rows, 3, 4), value))
        return float(graphs(batch, {}))

    # 8 rows: eager, recorded, replayed; each step's own values, the replayed ones too
    assert [call(8, v) for v in (1.0, 2.0, 3.0)] == [96.0, 192.0, 288.0]
    assert len(ran) == 2 and tape.replays == 1 and graphs.recordings == 1
    # 4 rows: a view at the start of the same buffer
    assert [call(4, v) for v in (1.0, 2.0)] == [48.0, 96.0]
    assert graphs.recordings == 2
    views = [g.inputs["encoder"] for g in graphs.graphs.values()]
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    # 16 rows outgrow the buffer: a new one, and the graphs that read the old one are recorded again
    assert [call(16, v) for v in (1.0, 1.0)] == [192.0, 192.0]
    assert [shape[1][1] for shape in graphs.graphs] == [(16, 3, 4)]
    assert call(8, 5.0) == 480.0 and graphs.recordings == 4  # 8 rows recorded again, from the new buffer
    assert call(8, 6.0) == 576.0 and graphs.recordings == 4


def test_a_step_s_losses_outlive_the_next_graph_that_runs():
    # Graphs share one memory pool: the next graph's replay overwrites the last one's output, so a step hands out a
    # copy of its losses, good after any later step.
    w = torch.ones(3)

    def step(batch: SideBatch, masks) -> torch.Tensor:
        assert batch.encoder is not None
        return (batch.encoder.sum() * w).sum().reshape(1)

    graphs = StepGraphs(step, TapeRecorder())

    def call(rows: int) -> torch.Tensor:
        return graphs(SideBatch(labels=torch.zeros(2), encoder=torch.ones(rows, 2)), {})

    for rows in (8, 8, 4, 4):  # both shapes recorded, the larger first: one input buffer serves both
        call(rows)
    four = call(4)  # replayed
    call(8)  # the other graph's replay
    assert four.tolist() == [24.0]
