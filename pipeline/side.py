"""The READ side network (stage two), for S seeds trained in lockstep.

READ runs a small recurrent network over the *layers* of a frozen backbone: every token has its own
short sequence of per-layer states x_0 .. x_L. For one token:

    u_i   = RMSNorm_w(x_i)                 (learned weight w = the paper's s_in, shared over layers)
    h_0   = 0                              (h0="embedding": tanh(W_0 RMSNorm_w(x_0) + b_0))
    h_i   = RNN(u_i, h_{i-1})              i = 1..L   (GRU, Elman "rnn" or LSTM; hidden size r)
    a     = mean_i h_i                     (aggregate="last": h_L; dropout, per seed, in training)
    delta = W_out a + b_out                (zero-initialised: an untrained network changes nothing)
    final = x_L + delta                    -> the family's head

Lockstep: S independent parameter sets live stacked on a leading seed axis and run in one batched
computation (bmm / matmul), so one read of the cached states serves every seed. Seed k's
initialisation comes from ``torch.Generator().manual_seed(seed_k)`` and its dropout masks from its own
generator, so seed k trains exactly as it would alone (up to float rounding), whatever other seeds
share the stack. The RMS normalisation of the states is shared by all seeds and each seed's norm weight
is folded into its W_ih, so the input projection of all seeds is one GEMM with no gradient w.r.t. the
(frozen) states; dropout therefore acts on ``a``, not on ``u`` (a per-seed mask on ``u`` would need an
(S, L*N, d) tensor and cost 2x in time, measured). ``torch.nn.GRU`` cannot batch over parameter sets, hence the hand-written cells
(PyTorch's equations and gate order, so weights map one-to-one onto ``nn.GRUCell`` & co.).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ReadConfig",
    "ReadModel",
    "SideBatch",
    "SideNet",
    "clip_grad_norm_per_seed",
    "per_seed_loss",
    "segment_mean",
    "trainable_parameter_count",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

FAMILIES = ("encoder", "seq2seq", "decoder")
TASK_KINDS = ("classification", "regression")
METHODS = ("read", "probe")
CELLS = ("gru", "rnn", "lstm")
AGGREGATES = ("mean", "last")
H0_OPTIONS = ("zero", "embedding")
POOLINGS = ("mean", "cls")

_GATES = {"gru": 3, "rnn": 1, "lstm": 4}  # gate blocks per cell, PyTorch order (GRU r,z,n; LSTM i,f,g,o)
_RMS_EPS = 1e-6


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ReadConfig:
    """Everything that decides the side network's shape and behaviour (saved in adapter_config.json)."""

    family: str  # "encoder" | "seq2seq" | "decoder"
    d_model: int
    num_labels: int  # K classes, or 1 for regression
    task_kind: str  # "classification" | "regression"
    method: str = "read"  # "read" | "probe" (frozen final state + head only: the baseline)
    rnn: str = "gru"  # gru | rnn | lstm
    rnn_dim: int = 256
    aggregate: str = "mean"  # mean | last
    h0: str = "zero"  # zero | embedding
    pooling: str = "mean"  # encoder family only: mean | cls
    dropout: float = 0.1
    has_embedding: bool = True  # x[:, 0] is the embedding output (not run through the RNN)
    encoder_side: bool = True  # seq2seq only: join the encoder side through its summary

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")

        choice("family", FAMILIES)
        choice("task_kind", TASK_KINDS)
        choice("method", METHODS)
        choice("rnn", CELLS)
        choice("aggregate", AGGREGATES)
        choice("h0", H0_OPTIONS)
        choice("pooling", POOLINGS)
        for name in ("d_model", "rnn_dim", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        for name in ("has_embedding", "encoder_side"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected true or false")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"dropout={self.dropout!r}: expected a number in [0, 1)")
        if self.task_kind == "regression" and self.num_labels != 1:
            raise ConfigError(f"task_kind='regression' needs num_labels=1, got num_labels={self.num_labels}")
        if self.task_kind == "classification" and self.num_labels < 2:
            raise ConfigError(
                f"task_kind='classification' needs num_labels >= 2, got num_labels={self.num_labels}"
            )
        if self.h0 == "embedding" and not self.has_embedding:
            raise ConfigError("h0='embedding' needs has_embedding=True (the store has no embedding output)")
        if self.pooling == "cls" and self.family != "encoder":
            raise ConfigError(
                f"pooling='cls' applies to family='encoder' only, not family={self.family!r} "
                "(seq2seq and decoder families read one decoder position)"
            )
        if not self.encoder_side and self.family != "seq2seq":
            raise ConfigError(
                f"encoder_side=False applies to family='seq2seq' only, not family={self.family!r}"
            )

    @property
    def uses_label_rows(self) -> bool:
        """Whether the head is (or, for the probe, starts from) the LM-head rows of the label words."""
        return self.family != "encoder" and self.task_kind == "classification"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown ReadConfig fields: {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"incomplete ReadConfig: {exc}") from None


# ------------------------------------------------------------------------------------------ batch


@dataclass
class SideBatch:
    """One batch of cached states for B examples (float32; labels int64 or float32).

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


def segment_mean(
    values: Tensor, segment: Tensor | None, num_segments: int, counts: Tensor | None = None
) -> Tensor:
    """Mean of ``values`` (..., N, F) over each segment along dim -2 -> (..., B, F).

    ``segment=None`` means one row per segment (identity). Differentiable (out-of-place index_add).
    """
    if segment is None:
        return values
    if counts is None:
        counts = torch.bincount(segment, minlength=num_segments)
    dim = values.dim() - 2
    shape = (*values.shape[:-2], num_segments, values.shape[-1])
    sums = values.new_zeros(shape).index_add(dim, segment, values)  # (..., B, F)
    return sums / counts.to(values.dtype).unsqueeze(-1)


def _rms_norm(x: Tensor) -> Tensor:
    """RMSNorm without weight (the learned weight is per seed, applied by the caller)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _RMS_EPS)


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

    def mask(self, shape: Sequence[int], p: float, device: torch.device) -> Tensor:
        """Inverted-dropout mask (S, *shape): 0 or 1/(1-p)."""
        masks = [
            torch.empty(tuple(shape), device=device).bernoulli_(1.0 - p, generator=g)
            for g in self._for(device)
        ]
        return torch.stack(masks).mul_(1.0 / (1.0 - p))


# -------------------------------------------------------------------------------------- side net


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
        dropout: float,
        h0_from_embedding: bool,
        with_output: bool,
    ) -> None:
        super().__init__()
        S, d, r, G = num_seeds, d_model, rnn_dim, _GATES[cell]
        self.cell, self.aggregate, self.dropout = cell, aggregate, float(dropout)
        self.rnn_dim = r
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
        # Init rules: torch's RNN init for the cell, nn.Linear's for h0, zeros for the output.
        self.init_rules: dict[str, tuple[str, float]] = {
            "norm_weight": ("ones", 0.0),
            "weight_ih": ("uniform", rnn_bound),
            "weight_hh": ("uniform", rnn_bound),
            "bias_ih": ("uniform", rnn_bound),
            "bias_hh": ("uniform", rnn_bound),
            "h0_weight": ("uniform", d_bound),
            "h0_bias": ("uniform", d_bound),
            "out_weight": ("zeros", 0.0),
            "out_bias": ("zeros", 0.0),
        }

    @property
    def num_seeds(self) -> int:
        return int(self.norm_weight.shape[0])

    def forward(
        self,
        x: Tensor,
        *,
        has_embedding: bool,
        streams: _DropoutStreams,
        h0: Tensor | None = None,
    ) -> Tensor:
        """Run over the layers of every token; return the (dropped-out) aggregate a: (S, N, r).

        x: (N, n_states, d). h0: (S, N, r) from the caller (seq2seq join), else zero or the embedding
        projection, per the module's configuration.
        """
        x = x.to(torch.float32)
        S, r = self.num_seeds, self.rnn_dim
        emb = x[:, 0] if has_embedding else None  # (N, d)
        layers = x[:, 1:] if has_embedding else x  # (N, L, d)
        N, L, d = layers.shape
        if L < 1:
            raise ValueError(f"the side network needs at least one layer state, got n_states={x.shape[1]}")
        drop = self.training and self.dropout > 0.0
        xn = _rms_norm(layers.transpose(0, 1).reshape(L * N, d))  # (L N, d), layer-major, shared by all seeds
        # The norm weight is folded into W_ih, so the input projection of every seed is one GEMM over the
        # shared normalised states: no (S, L N, d) tensor, and no gradient w.r.t. the states (frozen data).
        w = (self.weight_ih * self.norm_weight.unsqueeze(1)).reshape(S * self.weight_ih.shape[1], d)  # (S G r, d)
        gi = (xn @ w.T).view(L, N, S, -1)  # (L, N, S, G r)
        # unbind, not gi[i]: the backward of L selects would zero-fill a full-size gradient L times.
        gi_layers = [g.transpose(0, 1) + self.bias_ih.unsqueeze(1) for g in gi.unbind(0)]  # L x (S, N, G r)

        if h0 is not None:
            h = h0  # (S, N, r)
        elif self.h0_weight is not None:
            assert emb is not None and self.h0_bias is not None
            u0 = _rms_norm(emb).unsqueeze(0) * self.norm_weight.unsqueeze(1)  # (S, N, d)
            h = torch.tanh(torch.baddbmm(self.h0_bias.unsqueeze(1), u0, self.h0_weight.transpose(1, 2)))
        else:
            h = x.new_zeros(S, N, r)
        c = x.new_zeros(S, N, r) if self.cell == "lstm" else None  # LSTM cell state starts at 0

        whh_t = self.weight_hh.transpose(1, 2)  # (S, r, G r)
        bhh = self.bias_hh.unsqueeze(1)  # (S, 1, G r)
        total: Tensor | None = None
        for i in range(L):
            gh = torch.baddbmm(bhh, h, whh_t)  # (S, N, G r)
            gx = gi_layers[i]  # (S, N, G r)
            if self.cell == "gru":
                rz = torch.sigmoid(gx[..., : 2 * r] + gh[..., : 2 * r])
                reset, update = rz[..., :r], rz[..., r:]
                n = torch.tanh(gx[..., 2 * r :] + reset * gh[..., 2 * r :])  # reset gates (W_hn h + b_hn)
                h = n + update * (h - n)  # (1 - z) n + z h
            elif self.cell == "rnn":
                h = torch.tanh(gx + gh)
            else:
                gates = gx + gh
                i_g, f_g = torch.sigmoid(gates[..., :r]), torch.sigmoid(gates[..., r : 2 * r])
                g_g, o_g = torch.tanh(gates[..., 2 * r : 3 * r]), torch.sigmoid(gates[..., 3 * r :])
                assert c is not None
                c = f_g * c + i_g * g_g
                h = o_g * torch.tanh(c)
            if self.aggregate == "mean":
                total = h if total is None else total + h
        a = total / L if self.aggregate == "mean" else h  # (S, N, r)
        if drop:
            a = a * streams.mask((N, r), self.dropout, x.device)
        return a

    def project(self, a: Tensor) -> Tensor:
        """delta = W_out a + b_out: (S, M, r) -> (S, M, d)."""
        if self.out_weight is None or self.out_bias is None:
            raise RuntimeError("this side network has no output projection")
        return torch.baddbmm(self.out_bias.unsqueeze(1), a, self.out_weight.transpose(1, 2))


# ------------------------------------------------------------------------------------ family model


class ReadModel(nn.Module):
    """READ (or the linear probe) for one backbone family, S seeds in lockstep.

    ``forward`` returns (S, B, K) logits, or (S, B) predictions for regression. Sum
    ``per_seed_loss`` over seeds before ``backward``: seeds share no parameters, so each seed's
    gradient is its own loss's gradient. Modules: ``encoder_net`` (over ``batch.encoder``; encoder
    family and seq2seq with encoder_side), ``decoder_net`` (over ``batch.decoder``; seq2seq and
    decoder families), ``join_weight``/``join_bias`` (seq2seq join), ``head_weight``/``head_bias``
    (trainable heads), buffer ``label_rows`` (frozen LM-head rows, label-row families).
    """

    def __init__(self, config: ReadConfig, seeds: Sequence[int], label_rows: Tensor | None = None) -> None:
        super().__init__()
        seeds = list(seeds)
        if not seeds:
            raise ConfigError("seeds: expected at least one seed")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not (0 <= s < 2**63):
                raise ConfigError(f"seeds: {s!r} is not an integer in [0, 2**63)")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: {seeds} repeats a seed (its runs would be identical)")
        if config.uses_label_rows:
            if label_rows is None:
                raise ConfigError(
                    f"family={config.family!r} classification needs label_rows "
                    f"({config.num_labels}, {config.d_model})"
                )
            if tuple(label_rows.shape) != (config.num_labels, config.d_model):
                raise ConfigError(
                    f"label_rows has shape {tuple(label_rows.shape)}, expected "
                    f"(num_labels, d_model) = ({config.num_labels}, {config.d_model})"
                )
        elif label_rows is not None:
            raise ConfigError(
                f"label_rows given, but family={config.family!r} task_kind={config.task_kind!r} "
                "uses a new linear head"
            )

        self.config = config
        self.seeds = seeds
        self._streams = _DropoutStreams(seeds)
        S, d, r, K = len(seeds), config.d_model, config.rnn_dim, config.num_labels
        read = config.method == "read"
        seq2seq_join = read and config.family == "seq2seq" and config.encoder_side

        def side(with_output: bool, h0_from_embedding: bool) -> SideNet:
            return SideNet(
                S, d, r, config.rnn,
                aggregate=config.aggregate,
                dropout=config.dropout,
                h0_from_embedding=h0_from_embedding,
                with_output=with_output,
            )  # fmt: skip

        embedding_h0 = config.h0 == "embedding"
        self.encoder_net: SideNet | None = None
        self.decoder_net: SideNet | None = None
        self.join_weight: nn.Parameter | None = None
        self.join_bias: nn.Parameter | None = None
        if read and config.family == "encoder":
            self.encoder_net = side(with_output=True, h0_from_embedding=embedding_h0)
        if seq2seq_join:
            # The encoder side reaches the decoder side only through its summary e (no W_out).
            self.encoder_net = side(with_output=False, h0_from_embedding=embedding_h0)
            self.join_weight = nn.Parameter(torch.empty(S, r, r))
            self.join_bias = nn.Parameter(torch.empty(S, r))
        if read and config.family in ("seq2seq", "decoder"):
            self.decoder_net = side(with_output=True, h0_from_embedding=embedding_h0 and not seq2seq_join)

        rows_head = config.uses_label_rows
        self.head_weight: nn.Parameter | None = None
        self.head_bias: nn.Parameter | None = None
        if not (read and rows_head):  # READ on label-row families has no trainable head
            self.head_weight = nn.Parameter(torch.empty(S, K, d))
            self.head_bias = nn.Parameter(torch.empty(S, K))
        if rows_head:
            assert label_rows is not None
            self.register_buffer("label_rows", label_rows.detach().to(torch.float32).clone())
        else:
            self.register_buffer("label_rows", None)

        rules: dict[str, tuple[str, float]] = {
            "join_weight": ("uniform", 1.0 / math.sqrt(r)),
            "join_bias": ("uniform", 1.0 / math.sqrt(r)),
            # Probe on label-row families starts from the frozen LM head, so it starts at the backbone's
            # own prediction; other heads use nn.Linear's init.
            "head_weight": ("label_rows", 0.0) if rows_head else ("uniform", 1.0 / math.sqrt(d)),
            "head_bias": ("zeros", 0.0) if rows_head else ("uniform", 1.0 / math.sqrt(d)),
        }
        for prefix, module in self.named_children():
            if isinstance(module, SideNet):
                rules.update({f"{prefix}.{n}": rule for n, rule in module.init_rules.items()})
        self._init_rules = rules
        for k, seed in enumerate(seeds):
            self._init_seed(k, seed)

    # -- initialisation and per-seed state

    @torch.no_grad()
    def _init_seed(self, k: int, seed: int) -> None:
        """Draw seed k's parameters from its own generator, in a fixed (registration) order."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            kind, bound = self._init_rules[name]
            shape = p.shape[1:]
            if kind == "uniform":
                value = torch.empty(shape).uniform_(-bound, bound, generator=g)
            elif kind == "ones":
                value = torch.ones(shape)
            elif kind == "zeros":
                value = torch.zeros(shape)
            else:  # "label_rows"
                assert self.label_rows is not None
                value = self.label_rows.detach().cpu()
            p[k].copy_(value)

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    def seed_state_dict(self, k: int) -> dict[str, Tensor]:
        """Seed k's trainable tensors (no seed axis), detached copies."""
        return {name: p[k].detach().clone() for name, p in self.named_parameters()}

    @torch.no_grad()
    def load_seed_state_dict(self, k: int, state: Mapping[str, Tensor]) -> None:
        """Overwrite seed k's trainable tensors (e.g. with its best epoch's snapshot)."""
        params = dict(self.named_parameters())
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"seed state mismatch: missing {missing}, unexpected {unexpected}")
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape[1:]):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(p.shape[1:])}")
            p[k].copy_(value)

    # -- forward

    def forward(self, batch: SideBatch) -> Tensor:
        """Logits (S, B, K), or predictions (S, B) for regression."""
        cfg = self.config
        if cfg.family == "encoder":
            final = self._encoder_family(batch)  # (S, B, d)
        else:
            final = self._decoder_side(batch)  # (S, B, d)
        if self.head_weight is not None:
            assert self.head_bias is not None
            out = torch.baddbmm(self.head_bias.unsqueeze(1), final, self.head_weight.transpose(1, 2))
        else:
            assert self.label_rows is not None
            out = torch.matmul(final, self.label_rows.t())  # (S, B, K), frozen LM-head rows
        return out.squeeze(-1) if cfg.task_kind == "regression" else out

    def _segments(self, batch: SideBatch, num_tokens: int) -> tuple[Tensor | None, Tensor | None, int]:
        """(segment ids or None for one token per example, per-example token counts, B)."""
        B = batch.num_examples
        if batch.encoder_segment is None:
            if num_tokens != B:
                raise ValueError(f"encoder has {num_tokens} tokens for {B} examples but no encoder_segment")
            return None, None, B
        counts = torch.bincount(batch.encoder_segment, minlength=B)  # (B,)
        return batch.encoder_segment, counts, B

    def _first_tokens(self, batch: SideBatch, counts: Tensor | None) -> Tensor | None:
        if batch.encoder_first is not None:
            return batch.encoder_first
        if counts is None:
            return None
        return torch.cumsum(counts, 0) - counts  # tokens are contiguous and in example order

    def _encoder_family(self, batch: SideBatch) -> Tensor:
        cfg = self.config
        x = batch.encoder
        if x is None:
            raise ValueError("family='encoder' needs batch.encoder")
        segment, counts, B = self._segments(batch, int(x.shape[0]))
        if cfg.pooling == "cls":
            first = self._first_tokens(batch, counts)
            if first is not None:
                x = x[first]  # (B, n_states, d): only the first token reaches the head, run only it
            segment, counts = None, None
        x_last = x[:, -1].to(torch.float32)  # (N, d)
        pooled = segment_mean(x_last, segment, B, counts)  # (B, d)
        if self.encoder_net is None:  # probe
            return pooled.unsqueeze(0).expand(self.num_seeds, -1, -1)
        a = self.encoder_net(x, has_embedding=cfg.has_embedding, streams=self._streams)  # (S, N, r)
        # W_out is affine, so mean_t(x_L + W_out a_t + b) = mean_t x_L + W_out mean_t a_t + b:
        # pool a (r wide) instead of materialising (S, N, d) corrected token states.
        a_pooled = segment_mean(a, segment, B, counts)  # (S, B, r)
        return pooled.unsqueeze(0) + self.encoder_net.project(a_pooled)  # (S, B, d)

    def _decoder_side(self, batch: SideBatch) -> Tensor:
        cfg = self.config
        x = batch.decoder
        if x is None:
            raise ValueError(f"family={cfg.family!r} needs batch.decoder")
        B = int(x.shape[0])
        x_last = x[:, -1].to(torch.float32)  # (B, d)
        if self.decoder_net is None:  # probe
            return x_last.unsqueeze(0).expand(self.num_seeds, -1, -1)
        h0 = None
        if self.encoder_net is not None:  # seq2seq join through the encoder summary
            assert self.join_weight is not None and self.join_bias is not None
            enc = batch.encoder
            if enc is None:
                raise ValueError("family='seq2seq' with encoder_side=True needs batch.encoder")
            segment, counts, _ = self._segments(batch, int(enc.shape[0]))
            a_enc = self.encoder_net(enc, has_embedding=cfg.has_embedding, streams=self._streams)  # (S, N, r)
            e = segment_mean(a_enc, segment, B, counts)  # (S, B, r)
            h0 = torch.tanh(torch.baddbmm(self.join_bias.unsqueeze(1), e, self.join_weight.transpose(1, 2)))
        a = self.decoder_net(x, has_embedding=cfg.has_embedding, streams=self._streams, h0=h0)  # (S, B, r)
        return x_last.unsqueeze(0) + self.decoder_net.project(a)  # (S, B, d)

    # -- PEFT-style persistence

    def save_pretrained(self, directory: str | Path, k: int, extra: Mapping[str, Any] | None = None) -> None:
        """Write seed k as ``adapter_model.safetensors`` + ``adapter_config.json`` (sorted keys).

        The config's ``method`` is written upper-case ("READ" / "PROBE"), as PEFT names methods.
        ``extra`` (e.g. the store fingerprint, the backbone) must not reuse config keys or "seed".
        """
        from safetensors.torch import save_file

        extra = dict(extra or {})
        payload: dict[str, Any] = self.config.to_dict()
        payload["method"] = self.config.method.upper()
        payload["seed"] = self.seeds[k]
        clash = sorted(set(extra) & set(payload))
        if clash:
            raise ConfigError(f"extra adapter_config keys clash with the model's own: {', '.join(clash)}")
        payload.update(extra)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.cpu().contiguous() for n, t in self.seed_state_dict(k).items()}
        if self.label_rows is not None:
            tensors["label_rows"] = self.label_rows.detach().cpu().contiguous()
        save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        text = json.dumps(payload, sort_keys=True, indent=2) + "\n"
        (directory / ADAPTER_CONFIG_NAME).write_text(text, encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ReadModel:
        """A 1-seed model equal to the saved seed (extra keys of adapter_config.json are ignored)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        payload = json.loads((directory / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(ReadConfig)}
        fields = {k: v for k, v in payload.items() if k in names}
        if isinstance(fields.get("method"), str):
            fields["method"] = fields["method"].lower()
        config = ReadConfig.from_dict(fields)
        tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
        label_rows = tensors.pop("label_rows", None)
        model = cls(config, [int(payload["seed"])], label_rows=label_rows)
        model.load_seed_state_dict(0, tensors)
        return model


# ------------------------------------------------------------------------------------ training aids


def per_seed_loss(outputs: Tensor, labels: Tensor, task_kind: str) -> Tensor:
    """Loss per seed (S,): cross-entropy on (S, B, K) logits, or MSE on (S, B); mean over the batch.

    Sum over seeds before backward: each seed's gradient then comes from its own loss only.
    """
    if task_kind == "classification":
        S, B, K = outputs.shape
        losses = F.cross_entropy(outputs.reshape(S * B, K), labels.long().repeat(S), reduction="none")
        return losses.view(S, B).mean(1)
    if task_kind == "regression":
        return (outputs - labels.to(outputs.dtype).unsqueeze(0)).pow(2).mean(1)
    raise ConfigError(f"task_kind={task_kind!r}: expected one of {', '.join(TASK_KINDS)}")


def trainable_parameter_count(model: nn.Module) -> int:
    """Trainable parameters of one seed (every parameter carries the seed axis first)."""
    return sum(p[0].numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def clip_grad_norm_per_seed(model: nn.Module, max_norm: float) -> Tensor:
    """Clip each seed's gradient to ``max_norm`` on its own; return the norms before clipping (S,).

    ``torch.nn.utils.clip_grad_norm_`` would take one norm over all seeds and couple them.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()  # (S,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (S,)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    return norms
