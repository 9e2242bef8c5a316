"""Token buckets: a batch's flattened tokens padded up to one of a few sizes, so that CUDA graphs can replay.

A CUDA graph replays fixed shapes, and a per-token batch has a new token count nearly every step; recorded
as it comes, every count would be a new graph. Padded up to the next bucket (the count rounded up to an
eighth of its power of two: at most 1/8 more rows, about 6% on average), an epoch needs a handful of graphs.
Padding rows are zero states in segment ``B`` (one past the last example), which ``segment_mean`` drops:
they reach no example, no loss and no gradient, so a padded batch trains what the unpadded one trains, up
to float rounding. The dropout masks are drawn for the real rows first and padded with zeros, so every seed
draws the same random numbers as without padding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pipeline.training.network import SideBatch, segment_counts

STEPS_PER_OCTAVE = 8  # bucket sizes between 2^k and 2^(k+1): at most 1/8 padding


def token_bucket(rows: int) -> int:
    """The bucket for ``rows`` tokens: rows rounded up to a multiple of 2^floor(log2 rows) / STEPS_PER_OCTAVE."""
    if rows < 1:
        raise ValueError(f"a batch has at least one token, got {rows}")
    step = max(1, (1 << (rows.bit_length() - 1)) // STEPS_PER_OCTAVE)
    return -(-rows // step) * step


def pad_tokens(batch: SideBatch, masks: Mapping[str, Tensor]) -> tuple[SideBatch, dict[str, Tensor]]:
    """``batch`` with its encoder tokens padded up to their bucket, and the encoder's per-token dropout mask
    with them; a batch without per-token encoder states (pooled store, decoder family) is returned as it is."""
    masks = dict(masks)
    x, segment = batch.encoder, batch.encoder_segment
    if x is None or segment is None:
        return batch, masks
    rows = int(x.shape[0])
    extra = token_bucket(rows) - rows
    if extra == 0:
        return batch, masks
    examples = batch.num_examples
    first = batch.encoder_first
    if first is None:  # tokens are contiguous and in example order
        counts = segment_counts(segment, examples)
        first = torch.cumsum(counts, 0) - counts
    mask = masks.get("encoder_net")
    if mask is not None and mask.shape[1] == rows:  # per token (pooling=cls masks one row per example)
        masks["encoder_net"] = torch.cat([mask, mask.new_zeros(mask.shape[0], extra, mask.shape[2])], dim=1)
    padded = SideBatch(
        labels=batch.labels,
        encoder=torch.cat([x, x.new_zeros(extra, *x.shape[1:])]),
        encoder_segment=torch.cat([segment, segment.new_full((extra,), examples)]),
        encoder_first=first,
        decoder=batch.decoder,
    )
    return padded, masks
