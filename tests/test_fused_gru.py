"""A side's GRU recurrence as torch's fused cell kernels run it on CUDA (``pipeline.training.fused_gru``), checked on
the CPU with the kernels' stand-ins: its gradients, and a side network and a training run through it against the
composite step (what it keeps for the backward: tests/test_side.py). tests/test_cuda.py compares the CUDA kernels
themselves with the stand-ins."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import Tensor

from pipeline.common.config import TrainConfig
from pipeline.training import Trainer, fused_gru
from pipeline.training.network import SideNet


def composite_cell(gx: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """PyTorch's GRU cell equations from the gates (gate order r, z, n), written out."""
    r = h.shape[-1]
    reset = torch.sigmoid(gx[..., :r] + gh[..., :r])
    update = torch.sigmoid(gx[..., r:2 * r] + gh[..., r:2 * r])
    new = torch.tanh(gx[..., 2 * r:] + reset * gh[..., 2 * r:])
    return (1 - update) * new + update * h


def test_the_stand_in_kernels_are_the_gru_cell_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    gx, gh = (torch.randn(7, 3 * 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    hy, workspace = fused_gru.reference_cell(gx, gh, h)
    expected = composite_cell(gx, gh, h)
    torch.testing.assert_close(hy, expected)
    assert workspace.shape == (7, fused_gru.WORKSPACE_BLOCKS * 5)
    grad = torch.randn(7, 5, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(expected, (gx, gh, h), grad)
    got = fused_gru.reference_cell_backward(grad, workspace.detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "last"])
def test_the_recurrence_passes_gradcheck(mean):
    g = torch.Generator().manual_seed(1)
    L, S, N, d, r = 3, 2, 5, 4, 3

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    states = torch.randn(L, N, d, generator=g, dtype=torch.float64).unbind(0)  # frozen data: no gradient
    inputs = (randn(S, d, 3 * r), randn(S, 1, 3 * r), randn(S, N, r), randn(S, r, 3 * r), randn(S, 1, 3 * r))
    assert torch.autograd.gradcheck(lambda *t: fused_gru.GruRecurrence.apply(*t, mean, *states), inputs)


def run_side_net(net: SideNet, x: Tensor, h0: Tensor | None) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    net.zero_grad(set_to_none=True)
    h0 = None if h0 is None else h0.clone().requires_grad_()
    a = net(x, has_embedding=True, h0=h0)
    (a * torch.linspace(-1, 1, a.numel()).view_as(a)).sum().backward()
    return a.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, (
        None if h0 is None else h0.grad)


@pytest.mark.parametrize("aggregate, h0, S", [("mean", "zero", 3), ("last", "zero", 3), ("mean", "embedding", 3),
                                              ("mean", "given", 3), ("mean", "zero", 1)])
def test_a_side_network_through_the_fused_recurrence_equals_the_composite_one(monkeypatch, aggregate, h0, S):
    N, L, d, r = 11, 4, 16, 8
    torch.manual_seed(0)
    net = SideNet(S, d, r, "gru", aggregate=aggregate, h0_from_embedding=h0 == "embedding", with_output=True)
    for p in net.parameters():
        torch.nn.init.uniform_(p, -0.3, 0.3)
    x = torch.randn(N, L + 1, d)
    given = torch.randn(S, N, r) if h0 == "given" else None
    composite = run_side_net(net, x, given)
    monkeypatch.setattr(fused_gru, "applies", lambda x: True)
    fused = run_side_net(net, x, given)
    assert torch.equal(fused[0], composite[0])  # the stand-ins compute the forward with the same operators
    assert fused[1].keys() == composite[1].keys()
    for name in composite[1]:  # the backward is written out by hand: equal up to float rounding
        torch.testing.assert_close(fused[1][name], composite[1][name], rtol=1e-5, atol=1e-6, msg=name)
    if given is not None:
        torch.testing.assert_close(fused[2], composite[2], rtol=1e-5, atol=1e-6)


def test_without_grad_the_fused_recurrence_keeps_no_workspace(monkeypatch):
    # Evaluation batches are large (128 examples): keeping every step's workspace there would cost L x 5 r floats a
    # token and seed for nothing. Without grad mode no autograd node is made and each workspace is dropped once used.
    S, N, L, d, r = 2, 9, 3, 16, 8
    net = SideNet(S, d, r, "gru", aggregate="mean", h0_from_embedding=False, with_output=True)
    for p in net.parameters():  # SideNet leaves its parameters to ReadModel's initialisation
        torch.nn.init.uniform_(p, -0.3, 0.3)
    x = torch.randn(N, L + 1, d)
    monkeypatch.setattr(fused_gru, "applies", lambda x: True)
    with_grad = net(x, has_embedding=True).detach()
    alive = []
    cell = fused_gru._cell

    def watched(*args: Tensor) -> tuple[Tensor, Tensor]:
        hy, workspace = cell(*args)
        alive.append(weakref.ref(workspace))
        assert all(ref() is None for ref in alive[:-1])  # the earlier steps' are gone
        return hy, workspace

    monkeypatch.setattr(fused_gru, "_cell", watched)
    monkeypatch.setattr(fused_gru.GruRecurrence, "apply", None)  # no autograd node either
    with torch.no_grad():
        torch.testing.assert_close(net(x, has_embedding=True), with_grad, rtol=0, atol=0)
    assert len(alive) == L


def test_the_fused_step_is_for_cuda_outside_compiled_graphs():
    assert not fused_gru.applies(torch.zeros(1))
    seen = []

    def probe(x: Tensor) -> Tensor:
        seen.append(torch.compiler.is_compiling())
        return x + 1

    torch.compile(probe, backend="eager")(torch.zeros(2))
    assert seen == [True]  # what ``applies`` asks, inside a compiled graph


def test_training_through_the_fused_recurrence_reaches_the_composite_weights(synthetic_store, tmp_path, monkeypatch):
    cache = synthetic_store(splits={"train": 40, "validation": 12}).path

    def train(out: str) -> dict[str, Tensor]:
        cfg = TrainConfig(cache=cache, out=str(tmp_path / out), epochs=2, rnn_dim=16, batch_size=8, device="cpu",
                          seeds=(0, 1), patience=None)
        t = Trainer(cfg, progress=False)
        optimizer, scheduler = t.optimizer()
        for epoch in (1, 2):
            t.train_epoch(epoch, optimizer, scheduler)
        return {n: p.detach().clone() for n, p in t.model.named_parameters()}

    composite = train("composite")
    monkeypatch.setattr(fused_gru, "applies", lambda x: True)
    fused = train("fused")
    for name in composite:
        torch.testing.assert_close(fused[name], composite[name], rtol=1e-4, atol=1e-6, msg=name)
