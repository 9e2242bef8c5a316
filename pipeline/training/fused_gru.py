"""A GRU layer step of the side network as two kernels each way, for eager steps on a GPU.

An eager training step on a GPU is bound by kernel launches and the host time each operator costs, not by its
arithmetic: the composite GRU layer step (``SideNet.forward``) dispatches some 29 operators forward and backward,
24 layer steps a seq2seq step. torch's fused GRU cell kernels (``aten::_thnn_fused_gru_cell`` and its backward,
what ``nn.GRUCell`` runs on CUDA) do the gate arithmetic in one kernel each way. They take the gates already
multiplied out, so they serve S stacked parameter sets as well as one: here a layer step is the W_hh product and
the fused cell forward, and the fused cell backward and three products backward.

torch's own autograd formula for the fused cell saves its inputs as well as its workspace (for a double backward),
12 r-wide tensors a step. ``GruLayerStep`` saves the workspace alone -- r, z, n, h and W_hn h + b_hn, the five the
composite step keeps -- and its W_hh product's backward reads h from it.

The kernels exist for CUDA only (no CPU or Meta kernel, so not inside ``torch.compile``, where Inductor fuses the
composite step anyway). Elsewhere ``reference_cell`` and ``reference_cell_backward``, the kernels' arithmetic in
torch operators with the same workspace layout, stand in: the CPU tests run the step's wiring on them, and the CUDA
tests compare the kernels with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

WORKSPACE_BLOCKS = 5  # r-wide blocks of the fused cell's workspace: r, z, n, h, W_hn h + b_hn
_HX_BLOCK = 3


def applies(x: Tensor) -> bool:
    """Whether a GRU layer step on ``x``'s device runs the fused kernels: on CUDA, outside a compiled graph."""
    return x.is_cuda and not torch.compiler.is_compiling()


def reference_cell(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor) -> tuple[Tensor, Tensor]:
    """The fused cell's forward in torch operators: h' (M, r) and the workspace (M, 5 r).

    input_gates, hidden_gates: (M, 3 r), biases included (PyTorch's gate order r, z, n); hx: (M, r).
    """
    r = hx.shape[-1]
    i_rz, i_n = input_gates.split((2 * r, r), -1)
    h_rz, h_n = hidden_gates.split((2 * r, r), -1)
    reset, update = torch.sigmoid(i_rz + h_rz).split((r, r), -1)
    new = torch.tanh(i_n + reset * h_n)
    return new + update * (hx - new), torch.cat((reset, update, new, hx, h_n), -1)


def reference_cell_backward(grad: Tensor, workspace: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused cell's backward in torch operators: the gradients of input_gates, hidden_gates (M, 3 r) and hx."""
    reset, update, new, hx, h_n = workspace.chunk(WORKSPACE_BLOCKS, -1)
    g_update = grad * (hx - new) * (1 - update) * update
    g_new = grad * (1 - update) * (1 - new * new)
    g_reset = g_new * h_n * (1 - reset) * reset
    return (torch.cat((g_reset, g_update, g_new), -1), torch.cat((g_reset, g_update, g_new * reset), -1),
            grad * update)


def _cell(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor) -> tuple[Tensor, Tensor]:
    if hx.is_cuda:
        return torch.ops.aten._thnn_fused_gru_cell(input_gates, hidden_gates, hx)
    return reference_cell(input_gates, hidden_gates, hx)


def _cell_backward(grad: Tensor, workspace: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if workspace.is_cuda:
        g_input, g_hidden, g_hx, _, _ = torch.ops.aten._thnn_fused_gru_cell_backward(grad, workspace, False)
        return g_input, g_hidden, g_hx
    return reference_cell_backward(grad, workspace)


class GruLayerStep(torch.autograd.Function):
    """h' = GRU(gx, h) for S seeds: gx (S, N, 3 r) contiguous, the input gates with b_ih; h (S, N, r);
    whh_t (S, r, 3 r), W_hh transposed; bhh (S, 1, 3 r). The same values as the composite step up to float
    rounding (on CUDA the kernel fuses multiply-adds)."""

    @staticmethod
    def forward(ctx: Any, gx: Tensor, h: Tensor, whh_t: Tensor, bhh: Tensor) -> Tensor:
        S, N, r = h.shape
        gh = torch.baddbmm(bhh, h, whh_t)  # (S, N, 3 r), contiguous
        hy, workspace = _cell(gx.reshape(S * N, 3 * r), gh.view(S * N, 3 * r), h.reshape(S * N, r))
        ctx.save_for_backward(workspace, whh_t)
        return hy.view(S, N, r)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        workspace, whh_t = ctx.saved_tensors
        S, r = whh_t.shape[0], whh_t.shape[1]
        N = workspace.shape[0] // S
        g_input, g_hidden, g_hx = _cell_backward(grad.reshape(S * N, r).contiguous(), workspace)
        g_hidden = g_hidden.view(S, N, 3 * r)
        need_gx, need_h, need_w, need_b = ctx.needs_input_grad
        hx = workspace.view(S, N, WORKSPACE_BLOCKS, r).select(2, _HX_BLOCK)  # the h this step read, (S, N, r)
        return (g_input.view(S, N, 3 * r) if need_gx else None,
                torch.baddbmm(g_hx.view(S, N, r), g_hidden, whh_t.transpose(1, 2)) if need_h else None,
                torch.bmm(hx.transpose(1, 2), g_hidden) if need_w else None,
                g_hidden.sum(1, keepdim=True) if need_b else None)
