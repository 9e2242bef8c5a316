"""The GRU recurrence of one side of the side network in torch's fused GRU cell kernels, for eager steps on a GPU.

An eager training step on a GPU is bound by kernel launches and the host time each operator costs, not by its
arithmetic: the composite GRU layer step (``SideNet._step``) dispatches some 29 operators forward and backward,
24 layer steps a seq2seq step. torch's fused GRU cell kernels (``aten::_thnn_fused_gru_cell`` and its backward,
what ``nn.GRUCell`` runs on CUDA) do the gate arithmetic in one kernel each way. They take the gates already
multiplied out, so they serve S stacked parameter sets as well as one. ``GruRecurrence`` runs a side's L layer
steps as one autograd node: per layer the W_hh product and the cell forward; backward, the cell's backward, two
products and two adds, with the W_hh and b_hh gradients accumulated in place.

torch's own autograd formula for the fused cell saves its inputs as well as its workspace (for a double backward),
12 r-wide tensors a step. ``GruRecurrence`` saves each step's workspace alone -- r, z, n, h and W_hn h + b_hn, the
five the composite step keeps -- and the W_hh gradient reads h from it.

The kernels exist for CUDA only (no CPU or Meta kernel, so not inside ``torch.compile``, where Inductor fuses the
composite step anyway). Elsewhere ``reference_cell`` and ``reference_cell_backward``, the kernels' arithmetic in
torch operators with the same workspace layout, stand in: the CPU tests run the recurrence's wiring on them, and
the CUDA tests compare the kernels with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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


def input_gates(u: Tensor, w_t: Tensor, bih: Tensor) -> Tensor:
    """One layer's input gates for S seeds, b_ih added: (S, N, G r), contiguous.

    u (N, d): the layer's normalised states, shared by the seeds; w_t (S, d, G r): each seed's W_ih (its norm weight
    folded in), transposed; bih (S, 1, G r). One batched product over u seen S times (a stride-0 batch, not a copy);
    a layer at a time, so that a step never holds every layer's gates, nor, in the backward, their gradients.
    """
    return torch.baddbmm(bih, u.expand(w_t.shape[0], *u.shape), w_t)


def recurrence(states: Sequence[Tensor] | Iterator[Tensor], w_t: Tensor, bih: Tensor, h0: Tensor, whh_t: Tensor,
               bhh: Tensor, mean: bool) -> Tensor:
    """A side's GRU layer steps through the fused kernels (``GruRecurrence``'s arguments): one autograd node when
    grad mode is on; otherwise (evaluation, inference) each layer's states are taken and each step's workspace
    dropped as soon as they are used."""
    if torch.is_grad_enabled():
        states = tuple(states)
        if any(u.requires_grad for u in states):
            raise ValueError("the fused GRU recurrence gives no gradient for the states (frozen data): detach them")
        return GruRecurrence.apply(w_t, bih, h0, whh_t, bhh, mean, *states)
    return _layer_steps(states, w_t, bih, h0, whh_t, bhh, mean, None)


def _layer_steps(states: Iterable[Tensor], w_t: Tensor, bih: Tensor, h0: Tensor, whh_t: Tensor, bhh: Tensor,
                 mean: bool, workspaces: list[Tensor] | None) -> Tensor:
    """The forward of the layer steps: the aggregate, each step's workspace appended to ``workspaces`` if given."""
    S, N, r = h0.shape
    h, total, layers = h0, None, 0
    for u in states:
        gx = input_gates(u, w_t, bih)  # (S, N, 3 r), contiguous
        gh = torch.baddbmm(bhh, h, whh_t)  # (S, N, 3 r), contiguous
        hy, workspace = _cell(gx.view(S * N, 3 * r), gh.view(S * N, 3 * r), h.reshape(S * N, r))
        h, layers = hy.view(S, N, r), layers + 1
        if workspaces is not None:
            workspaces.append(workspace)
        del gx, gh, workspace  # not alive while the next step makes its own (an evaluation batch's are large)
        if mean:
            total = h if total is None else total + h
    return total / layers if total is not None else h


class GruRecurrence(torch.autograd.Function):
    """The L layer steps of one side for S seeds, input projection included, as one autograd node: the aggregate
    a (S, N, r), the mean of h_1 .. h_L (``mean``) or h_L.

    w_t (S, d, 3 r), bih (S, 1, 3 r): ``input_gates``'s; h0 (S, N, r); whh_t (S, r, 3 r), W_hh transposed; bhh (S, 1,
    3 r); then the L layers' normalised states (N, d), which get no gradient. The forward is the composite step's,
    layer by layer, up to float rounding (on CUDA the kernel fuses multiply-adds). One node instead of one per
    layer: the backward accumulates the W_ih, b_ih, W_hh and b_hh gradients in place and carries h's from layer to
    layer itself, where autograd would add them up a node at a time; each layer's gate gradients are used and
    dropped, never all L layers' at once.
    """

    @staticmethod
    def forward(ctx: Any, w_t: Tensor, bih: Tensor, h0: Tensor, whh_t: Tensor, bhh: Tensor, mean: bool,
                *states: Tensor) -> Tensor:
        workspaces: list[Tensor] = []
        a = _layer_steps(states, w_t, bih, h0, whh_t, bhh, mean, workspaces)
        ctx.mean, ctx.layers = mean, len(states)
        ctx.save_for_backward(whh_t, *states, *workspaces)
        return a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        whh_t, *saved = ctx.saved_tensors
        L = ctx.layers
        states, workspaces = saved[:L], saved[L:]
        S, r = whh_t.shape[0], whh_t.shape[1]
        N, G = workspaces[0].shape[0] // S, 3 * r
        need_wih, need_bih, need_h0, need_whh, need_bhh = ctx.needs_input_grad[:5]
        from_mean = grad / L if ctx.mean else None  # what every h_i gets from the aggregate
        carry: Tensor | None = None  # the gradient of h_i from the layers above it
        g_wih = g_bih = g_whh = g_bhh = None
        for i in reversed(range(L)):
            if ctx.mean:
                g = from_mean if carry is None else carry + from_mean
            else:
                g = grad if carry is None else carry
            g_input, g_hidden, g_hx = _cell_backward(g.reshape(S * N, r).contiguous(), workspaces[i])
            g_input, g_hidden = g_input.view(S, N, G), g_hidden.view(S, N, G)
            if need_wih:
                u_t = states[i].expand(S, *states[i].shape).transpose(1, 2)  # (S, d, N)
                g_wih = torch.bmm(u_t, g_input) if g_wih is None else g_wih.baddbmm_(u_t, g_input)
            if need_whh:
                hx = workspaces[i].view(S, N, WORKSPACE_BLOCKS, r).select(2, _HX_BLOCK).transpose(1, 2)  # h_(i-1)^T
                g_whh = torch.bmm(hx, g_hidden) if g_whh is None else g_whh.baddbmm_(hx, g_hidden)
            # The bias gradients add up into the top layer's gate gradients, used up by then; summed over N at the end.
            if need_bih:
                g_bih = g_input if g_bih is None else g_bih.add_(g_input)
            if need_bhh:
                g_bhh = g_hidden if g_bhh is None else g_bhh.add_(g_hidden)
            if i > 0 or need_h0:
                carry = torch.baddbmm(g_hx.view(S, N, r), g_hidden, whh_t.transpose(1, 2))
        return (g_wih, None if g_bih is None else g_bih.sum(1, keepdim=True), carry if need_h0 else None, g_whh,
                None if g_bhh is None else g_bhh.sum(1, keepdim=True), None, *(None,) * L)
