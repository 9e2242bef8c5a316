"""The READ side network's recurrence over layers (stage two), for S seeds trained in lockstep.

READ runs a small recurrent network over the *layers* of a frozen backbone: every token has its own
short sequence of per-layer states x_0 .. x_L. For one token:

    u_i   = RMSNorm_w(x_i)                 (learned weight w, shared over layers)
    h_0   = 0                              (h0="embedding": tanh(W_0 RMSNorm_w(x_0) + b_0))
    h_i   = RNN(u_i, h_{i-1})              i = 1..L   (GRU, Elman "rnn" or LSTM; hidden size r)
    a     = mean_i h_i                     (aggregate="last": h_L; dropout, per seed, in training)
    delta = s (W_out a + b_out)            (W_out zero-initialised by default: an untrained network
                                            changes nothing; s = out_scale, 1 by default)
    final = x_L + delta                    -> the family's head

Lockstep: S independent parameter sets live stacked on a leading seed axis and run in one batched
computation (bmm / matmul), so one read of the cached states serves every seed. Seed k's
initialisation comes from ``torch.Generator().manual_seed(seed_k)`` and its dropout masks from its own
generator, so seed k trains exactly as it would alone (up to float rounding), whatever other seeds
share the stack. The RMS normalisation of the states is shared by all seeds and each seed's norm weight
is folded into its W_ih, so a layer's input projection for all seeds is one batched product, with no gradient
w.r.t. the (frozen) states, made when that layer's step needs it (never every layer's gates at once); dropout
therefore acts on ``a``, not on ``u`` (a per-seed mask on ``u`` would need an (S, L*N, d) tensor and cost 2x in
time, measured). ``torch.nn.GRU`` cannot batch over parameter sets, hence the
hand-written cells (PyTorch's equations and gate order, so weights map one-to-one onto ``nn.GRUCell`` & co.). On
CUDA, outside a compiled graph, the GRU's layer steps run through torch's fused GRU cell kernels instead
(``pipeline.training.fused_gru``): the same values up to float rounding, in a fraction of the launches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.training import fused_gru

FAMILIES = ("encoder", "seq2seq", "decoder")
TASK_KINDS = ("classification", "regression")

_GATES = {"gru": 3, "rnn": 1, "lstm": 4}  # gate blocks per cell, PyTorch order (GRU r,z,n; LSTM i,f,g,o)
_RMS_EPS = 1e-6


# ------------------------------------------------------------------------------------------ batch


@dataclass
class SideBatch:
    """One batch of cached states for B examples (the stored dtype or float32: the side network widens them;
    labels int64 or float32).

    Encoder tokens are flattened without padding: the tokens of one example are contiguous and the
    examples come in order. ``encoder_segment=None`` means one token per example (pooled stores).
    ``encoder_first`` is optional (derived from the segment ids when absent).
    """

    labels: Tensor | None  # (B,) int64 (classification) or float32 (regression)
    encoder: Tensor | None = None  # (N_tok, n_states, d)
    encoder_segment: Tensor | None = None  # (N_tok,) int64 in 0..B-1
    encoder_first: Tensor | None = None  # (B,) index of each example's first token
    decoder: Tensor | None = None  # (B, n_states, d)

    @property
    def num_examples(self) -> int:
        if self.decoder is not None:
            return int(self.decoder.shape[0])
        if self.encoder_first is not None:
            return int(self.encoder_first.shape[0])
        if self.labels is not None:
            return int(self.labels.shape[0])
        if self.encoder is None:
            raise ValueError("SideBatch holds no states")
        if self.encoder_segment is None:
            return int(self.encoder.shape[0])
        return int(self.encoder_segment[-1].item()) + 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SideBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return SideBatch(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))


def segment_counts(segment: Tensor, num_segments: int) -> Tensor:
    """Rows per segment (num_segments,) int64; unlike ``torch.bincount`` it never waits for the device.

    Rows of segment ``num_segments`` are padding (``pipeline.training.buckets``): counted apart and dropped.
    """
    return segment.new_zeros(num_segments + 1).index_add_(0, segment, torch.ones_like(segment))[:num_segments]


def segment_mean(
    values: Tensor, segment: Tensor | None, num_segments: int, counts: Tensor | None = None
) -> Tensor:
    """Mean of ``values`` (..., N, F) over each segment along dim -2 -> (..., B, F).

    ``segment=None`` means one row per segment (identity). Rows of segment ``num_segments`` are padding and
    dropped (they get no gradient). Differentiable (out-of-place index_add).
    """
    if segment is None:
        return values
    if counts is None:
        counts = segment_counts(segment, num_segments)
    dim = values.dim() - 2
    shape = (*values.shape[:-2], num_segments + 1, values.shape[-1])
    sums = values.new_zeros(shape).index_add(dim, segment, values).narrow(dim, 0, num_segments)  # (..., B, F)
    return sums / counts.to(values.dtype).unsqueeze(-1)


def _rms_norm(x: Tensor) -> Tensor:
    """RMSNorm without weight (the learned weight is per seed, applied by the caller)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _RMS_EPS)


def normalised_layers(layers: Tensor) -> Sequence[Tensor] | Iterator[Tensor]:
    """Each layer's states (N, L, d), normalised in float32: L tensors (N, d), one after another.

    In training the backward keeps them all anyway (the input projection's weight gradient needs them), so they are
    normalised in one go, a few operators for all layers. Without gradients (evaluation, inference, often on
    batches of hundreds of examples) each is made when its layer step needs it, so that only one layer's float32
    states exist at a time, not L of them.
    """
    if torch.is_grad_enabled():
        return _rms_norm(layers.transpose(0, 1).to(torch.float32)).unbind(0)
    return (_rms_norm(layers[:, i].to(torch.float32)) for i in range(layers.shape[1]))


# --------------------------------------------------------------------------------- dropout streams


def _dropout_seed(seed: int) -> int:
    """A dropout stream seed derived from the init seed, stable across Python processes."""
    digest = hashlib.sha256(f"read-dropout-{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _DropoutStreams:
    """One dropout generator per seed, created on the device of the states at first use.

    Each mask is drawn per seed with a shape that does not involve S, so seed k's masks are the same
    whichever seeds share the stack. Moving the model to another device restarts the streams there.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = list(seeds)
        self._generators: dict[str, list[torch.Generator]] = {}

    def _for(self, device: torch.device) -> list[torch.Generator]:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = [
                torch.Generator(device=device).manual_seed(_dropout_seed(s)) for s in self.seeds
            ]
        return self._generators[key]

    def state_dict(self) -> dict[str, list[Tensor]]:
        """Where each seed's stream is, per device: a resumed run draws the masks an uninterrupted one draws."""
        return {key: [g.get_state() for g in generators] for key, generators in self._generators.items()}

    def load_state_dict(self, state: Mapping[str, Sequence[Tensor]]) -> None:
        for key, states in state.items():
            generators = self._for(torch.device(key))
            if len(states) != len(generators):
                raise ValueError(f"dropout state for {len(states)} seeds, expected {len(generators)}")
            for generator, value in zip(generators, states):
                generator.set_state(value)

    @torch.compiler.disable  # per-seed generators stay eager: a compiled step draws exactly the same masks
    def mask(self, shape: Sequence[int], p: float, device: torch.device) -> Tensor:
        """Inverted-dropout mask (S, *shape): 0 or 1/(1-p)."""
        masks = [
            torch.empty(tuple(shape), device=device).bernoulli_(1.0 - p, generator=g)
            for g in self._for(device)
        ]
        return torch.stack(masks).mul_(1.0 / (1.0 - p))


# -------------------------------------------------------------------------------------- side net


class _GruBlend(torch.autograd.Function):
    """h' = n + z (h - n), the GRU's last step, keeping for the backward only tensors that the layer step keeps
    anyway (n for tanh, z inside the sigmoid's output, h for the W_hh product), not h - n: a sixth less
    activation memory per step. Forward and gradients are autograd's own, operation for operation."""

    @staticmethod
    def forward(ctx: Any, n: Tensor, z: Tensor, h: Tensor) -> Tensor:
        ctx.save_for_backward(n, z, h)
        return n + z * (h - n)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, z, h = ctx.saved_tensors
        grad_h = grad * z
        return grad - grad_h, grad * (h - n), grad_h


class SideNet(nn.Module):
    """The recurrent side network over layers, S parameter sets stacked on dim 0.

    Parameters (per seed; the stored tensors carry a leading S axis): ``norm_weight`` (d),
    ``weight_ih`` (G r, d), ``weight_hh`` (G r, r), ``bias_ih``/``bias_hh`` (G r) in nn.GRUCell /
    nn.RNNCell / nn.LSTMCell layout; optional ``h0_weight`` (r, d), ``h0_bias`` (r); optional
    ``out_weight`` (d, r), ``out_bias`` (d). None of them depends on the number of layers.
    """

    def __init__(
        self,
        num_seeds: int,
        d_model: int,
        rnn_dim: int,
        cell: str,
        *,
        aggregate: str,
        h0_from_embedding: bool,
        with_output: bool,
        out_init: str = "zeros",
        out_scale: float = 1.0,
    ) -> None:
        super().__init__()
        S, d, r, G = num_seeds, d_model, rnn_dim, _GATES[cell]
        self.cell, self.aggregate = cell, aggregate  # dropout: the caller's mask (ReadModel.dropout_masks)
        self.rnn_dim = r
        self.out_scale = float(out_scale)
        self.norm_weight = nn.Parameter(torch.ones(S, d))
        self.weight_ih = nn.Parameter(torch.empty(S, G * r, d))
        self.weight_hh = nn.Parameter(torch.empty(S, G * r, r))
        self.bias_ih = nn.Parameter(torch.empty(S, G * r))
        self.bias_hh = nn.Parameter(torch.empty(S, G * r))
        self.h0_weight = nn.Parameter(torch.empty(S, r, d)) if h0_from_embedding else None
        self.h0_bias = nn.Parameter(torch.empty(S, r)) if h0_from_embedding else None
        self.out_weight = nn.Parameter(torch.zeros(S, d, r)) if with_output else None
        self.out_bias = nn.Parameter(torch.zeros(S, d)) if with_output else None
        rnn_bound, d_bound = 1.0 / math.sqrt(r), 1.0 / math.sqrt(d)
        # Init rules: torch's RNN init for the cell, nn.Linear's for h0; the output zeros, or nn.Linear's init.
        out_rule = ("zeros", 0.0) if out_init == "zeros" else ("uniform", rnn_bound)
        self.init_rules: dict[str, tuple[str, float]] = {
            "norm_weight": ("ones", 0.0),
            "weight_ih": ("uniform", rnn_bound),
            "weight_hh": ("uniform", rnn_bound),
            "bias_ih": ("uniform", rnn_bound),
            "bias_hh": ("uniform", rnn_bound),
            "h0_weight": ("uniform", d_bound),
            "h0_bias": ("uniform", d_bound),
            "out_weight": out_rule,
            "out_bias": out_rule,
        }

    @property
    def num_seeds(self) -> int:
        return int(self.norm_weight.shape[0])

    def forward(
        self,
        x: Tensor,
        *,
        has_embedding: bool,
        mask: Tensor | None = None,
        h0: Tensor | None = None,
    ) -> Tensor:
        """Run over the layers of every token; return the aggregate a: (S, N, r), times ``mask`` when given.

        x: (N, n_states, d). mask: (S, N, r), the seeds' inverted-dropout mask (drawn by the caller from
        ``_DropoutStreams``, outside any compiled graph). h0: (S, N, r) from the caller (seq2seq join), else
        zero or the embedding projection, per the module's configuration.
        """
        S, r = self.num_seeds, self.rnn_dim
        emb = x[:, 0].to(torch.float32) if has_embedding else None  # (N, d)
        layers = x[:, 1:] if has_embedding else x  # (N, L, d), the stored dtype: widened a layer at a time
        N, L = layers.shape[:2]
        if L < 1:
            raise ValueError(f"the side network needs at least one layer state, got n_states={x.shape[1]}")
        # The norm weight is folded into W_ih, so the input projection of every seed is one product over the
        # shared normalised states: no (S, N, d) tensor, and no gradient w.r.t. the states (frozen data).
        w_t = (self.weight_ih * self.norm_weight.unsqueeze(1)).transpose(1, 2)  # (S, d, G r)
        bih = self.bias_ih.unsqueeze(1)  # (S, 1, G r)

        if h0 is not None:
            h = h0  # (S, N, r)
        elif self.h0_weight is not None:
            assert emb is not None and self.h0_bias is not None
            u0 = _rms_norm(emb).unsqueeze(0) * self.norm_weight.unsqueeze(1)  # (S, N, d)
            h = torch.tanh(torch.baddbmm(self.h0_bias.unsqueeze(1), u0, self.h0_weight.transpose(1, 2)))
        else:
            h = x.new_zeros((S, N, r), dtype=torch.float32)
        c = x.new_zeros((S, N, r), dtype=torch.float32) if self.cell == "lstm" else None  # the LSTM's starts at 0

        whh_t = self.weight_hh.transpose(1, 2)  # (S, r, G r)
        bhh = self.bias_hh.unsqueeze(1)  # (S, 1, G r)
        states = normalised_layers(layers)
        if self.cell == "gru" and fused_gru.applies(x):  # CUDA, eager: torch's fused GRU cell kernels, one node
            a = fused_gru.recurrence(states, w_t, bih, h, whh_t, bhh, self.aggregate == "mean")
            return a if mask is None else a * mask
        total: Tensor | None = None
        for u in states:  # one layer's input gates at a time: never all L layers' (S, N, G r) at once
            h, c = self._step(fused_gru.input_gates(u, w_t, bih), torch.baddbmm(bhh, h, whh_t), h, c)
            if self.aggregate == "mean":
                total = h if total is None else total + h
        a = total / L if self.aggregate == "mean" else h  # (S, N, r)
        return a if mask is None else a * mask

    def _step(self, gx: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One layer step of the cell in torch operators: (h', c') from the gates gx, gh (S, N, G r) and h, c."""
        r = self.rnn_dim
        if self.cell == "gru":
            # Gate blocks by split, not by slicing: the backward of a split is one cat, where each slice's backward
            # fills a zero tensor of the full width and copies into it, and autograd then adds those up (the same
            # values, bit for bit; a GRU layer step's backward runs 12 fewer kernels).
            gx_rz, gx_n = gx.split((2 * r, r), -1)
            gh_rz, gh_n = gh.split((2 * r, r), -1)
            reset, update = torch.sigmoid(gx_rz + gh_rz).split((r, r), -1)
            # A copy, so that the product keeps r columns for the backward and not all of gh (3 r): the same
            # values, a quarter less activation memory per step.
            n = torch.tanh(gx_n + reset * gh_n.contiguous())  # reset gates (W_hn h + b_hn)
            return _GruBlend.apply(n, update, h), c  # (1 - z) n + z h
        if self.cell == "rnn":
            return torch.tanh(gx + gh), c
        i_g, f_g, g_g, o_g = (gx + gh).split((r, r, r, r), -1)
        i_g, f_g, g_g, o_g = torch.sigmoid(i_g), torch.sigmoid(f_g), torch.tanh(g_g), torch.sigmoid(o_g)
        assert c is not None
        c = f_g * c + i_g * g_g
        return o_g * torch.tanh(c), c

    def project(self, a: Tensor) -> Tensor:
        """delta = out_scale (W_out a + b_out): (S, M, r) -> (S, M, d)."""
        if self.out_weight is None or self.out_bias is None:
            raise RuntimeError("this side network has no output projection")
        delta = torch.baddbmm(self.out_bias.unsqueeze(1), a, self.out_weight.transpose(1, 2))
        return delta if self.out_scale == 1.0 else delta * self.out_scale


