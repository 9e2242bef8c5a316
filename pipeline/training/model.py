"""READ (or the linear probe) for one backbone family: config, model, losses and per-seed clipping.

``network`` holds the recurrence over layers; this module wires one or two of them to a family's
head (encoder: pooled tokens and a new head; seq2seq and decoder: the first decoder position and the
frozen LM-head rows of the label words). ``adapter`` saves one seed of it as a PEFT-style adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.config import SideConfig
from pipeline.common.errors import ConfigError
from pipeline.common.settings import at_least, setting
from pipeline.training.network import (
    FAMILIES,
    TASK_KINDS,
    SideBatch,
    SideNet,
    _DropoutStreams,
    segment_counts,
    segment_mean,
)

if TYPE_CHECKING:
    from pipeline.training.adapter import AdapterConfig

# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class ReadConfig(SideConfig):
    """Everything that decides the side network's shape and behaviour (saved in adapter_config.json).

    The training settings' side-network part (``SideConfig``: method, rnn, rnn_dim, ...) with its
    checks, plus what the store decides.
    """

    family: str = setting(help="Backbone family.", choices=FAMILIES)
    d_model: int = setting(help="Width of the backbone's states.", bounds=at_least(1))
    num_labels: int = setting(help="K classes, or 1 for regression.", bounds=at_least(1))
    task_kind: str = setting(help="classification or regression.", choices=TASK_KINDS)
    has_embedding: bool = setting(True, "x[:, 0] is the embedding output (not run through the RNN).")

    def __post_init__(self) -> None:
        super().__post_init__()
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
                h0_from_embedding=h0_from_embedding,
                with_output=with_output,
                out_init=config.out_init,
                out_scale=config.out_scale,
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

    def dropout_state(self) -> dict[str, list[Tensor]]:
        """The per-seed dropout streams' positions (a checkpoint's part: pipeline.training.checkpoint)."""
        return self._streams.state_dict()

    def load_dropout_state(self, state: Mapping[str, Sequence[Tensor]]) -> None:
        self._streams.load_state_dict(state)

    # -- forward

    def dropout_masks(self, batch: SideBatch) -> dict[str, Tensor]:
        """Each side network's dropout mask for ``batch`` (S, rows, r), from the per-seed streams, encoder side
        first; none when not training or without dropout.

        Drawn apart from the forward, so that a compiled forward is one graph (per-seed generators cannot be
        traced); ``forward`` draws them itself when not given, in the same order, so the masks are the same.
        """
        if not (self.training and self.config.dropout > 0.0):
            return {}
        rows: dict[str, int] = {}
        if self.encoder_net is not None and batch.encoder is not None:
            cls = self.config.family == "encoder" and self.config.pooling == "cls"  # only first tokens run
            rows["encoder_net"] = batch.num_examples if cls else int(batch.encoder.shape[0])
        if self.decoder_net is not None and batch.decoder is not None:
            rows["decoder_net"] = int(batch.decoder.shape[0])
        if not rows:
            return {}
        device = (batch.encoder if batch.encoder is not None else batch.decoder).device
        return {name: self._streams.mask((n, self.config.rnn_dim), self.config.dropout, device)
                for name, n in rows.items()}

    def forward(self, batch: SideBatch, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits (S, B, K), or predictions (S, B) for regression. ``masks``: ``dropout_masks(batch)``, drawn
        here when not given."""
        cfg = self.config
        masks = self.dropout_masks(batch) if masks is None else masks
        if cfg.family == "encoder":
            final = self._encoder_family(batch, masks)  # (S, B, d)
        else:
            final = self._decoder_side(batch, masks)  # (S, B, d)
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
        counts = segment_counts(batch.encoder_segment, B)  # (B,)
        return batch.encoder_segment, counts, B

    def _first_tokens(self, batch: SideBatch, counts: Tensor | None) -> Tensor | None:
        if batch.encoder_first is not None:
            return batch.encoder_first
        if counts is None:
            return None
        return torch.cumsum(counts, 0) - counts  # tokens are contiguous and in example order

    def _encoder_family(self, batch: SideBatch, masks: Mapping[str, Tensor]) -> Tensor:
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
        a = self.encoder_net(x, has_embedding=cfg.has_embedding, mask=masks.get("encoder_net"))  # (S, N, r)
        # W_out is affine, so mean_t(x_L + W_out a_t + b) = mean_t x_L + W_out mean_t a_t + b:
        # pool a (r wide) instead of materialising (S, N, d) corrected token states.
        a_pooled = segment_mean(a, segment, B, counts)  # (S, B, r)
        return pooled.unsqueeze(0) + self.encoder_net.project(a_pooled)  # (S, B, d)

    def _decoder_side(self, batch: SideBatch, masks: Mapping[str, Tensor]) -> Tensor:
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
            a_enc = self.encoder_net(enc, has_embedding=cfg.has_embedding, mask=masks.get("encoder_net"))  # (S, N, r)
            e = segment_mean(a_enc, segment, B, counts)  # (S, B, r)
            h0 = torch.tanh(torch.baddbmm(self.join_bias.unsqueeze(1), e, self.join_weight.transpose(1, 2)))
        a = self.decoder_net(x, has_embedding=cfg.has_embedding, mask=masks.get("decoder_net"), h0=h0)  # (S, B, r)
        return x_last.unsqueeze(0) + self.decoder_net.project(a)  # (S, B, d)

    # -- PEFT-style persistence (pipeline.training.adapter holds the format)

    def save_pretrained(self, directory: str | Path, k: int, config: AdapterConfig) -> None:
        """Write seed k as ``adapter_model.safetensors`` + ``adapter_config.json`` (see ``save_adapter``)."""
        from pipeline.training.adapter import save_adapter

        save_adapter(directory, self, k, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ReadModel:
        """A 1-seed model equal to the saved seed; ``load_adapter`` also returns its AdapterConfig."""
        from pipeline.training.adapter import load_adapter

        return load_adapter(directory)[0]


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


class StepLoss(nn.Module):
    """The training step's forward, from batch to per-seed losses (S,): what a compiled step compiles, so the loss
    fuses with the rest rather than running as eager kernels of its own."""

    def __init__(self, model: ReadModel, task_kind: str) -> None:
        super().__init__()
        self.model, self.task_kind = model, task_kind

    def forward(self, batch: SideBatch, masks: Mapping[str, Tensor]) -> Tensor:
        return per_seed_loss(self.model(batch, masks), batch.labels, self.task_kind)


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
