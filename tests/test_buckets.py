"""Token buckets (--cuda-graphs): a padded batch trains what the unpadded one trains, with few distinct shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_device_paths import one_epoch, trainer
from test_side import make_batch, make_model

from pipeline.training.buckets import pad_tokens, token_bucket
from pipeline.training.model import StepLoss
from pipeline.training.network import segment_mean


def test_a_bucket_holds_the_batch_with_at_most_an_eighth_more_rows():
    for rows in range(1, 20_000):
        bucket = token_bucket(rows)
        assert rows <= bucket <= rows * 9 / 8, rows
        assert token_bucket(bucket) == bucket  # a full bucket is not padded again
    # the token counts of batches of 32 GLUE examples (about 2,000-3,600 on RTE) meet 8 shapes, not 1,600
    assert len({token_bucket(rows) for rows in range(2_000, 3_600)}) == 8
    with pytest.raises(ValueError, match="at least one token"):
        token_bucket(0)


def test_padding_rows_reach_no_segment_and_get_no_gradient():
    values = torch.randn(7, 3, requires_grad=True)
    segment = torch.tensor([0, 0, 1, 2, 2, 3, 3])  # segment 3 of 3 segments: padding
    means = segment_mean(values, segment, 3)
    expected = torch.stack([values[0:2].mean(0), values[2], values[3:5].mean(0)])
    torch.testing.assert_close(means, expected)
    means.sum().backward()
    assert values.grad[5:].abs().sum() == 0 and values.grad[:5].abs().min() > 0


@pytest.mark.parametrize("family, kw", [("seq2seq", {}), ("encoder", {}), ("encoder", {"pooling": "cls"}),
                                        ("decoder", {}), ("seq2seq", {"encoder_side": False})])
def test_a_padded_batch_gives_the_same_losses_and_gradients(family, kw):
    model = make_model(family, seeds=(0, 1), dropout=0.3, **kw).train()
    batch = make_batch(family)
    if batch.encoder is not None:  # 33 tokens: padded to 36
        lengths = torch.tensor([9, 5, 12, 7])
        batch.encoder = 3.0 * torch.randn(int(lengths.sum()), *batch.encoder.shape[1:])
        batch.encoder_segment = torch.repeat_interleave(torch.arange(4), lengths)
        batch.encoder_first = None  # derived from the segments when absent, padded or not
    step = StepLoss(model, "classification")
    masks = model.dropout_masks(batch)
    padded, padded_masks = pad_tokens(batch, masks)
    if batch.encoder is not None:
        assert padded.encoder.shape[0] == token_bucket(33) == 36 and padded.num_examples == batch.num_examples
        for name, mask in masks.items():  # the real rows' masks are the ones drawn unpadded
            torch.testing.assert_close(padded_masks[name][:, : mask.shape[1]], mask, rtol=0, atol=0)
    losses = step(batch, masks)
    grads = torch.autograd.grad(losses.sum(), list(model.parameters()))
    padded_losses = step(padded, padded_masks)
    padded_grads = torch.autograd.grad(padded_losses.sum(), list(model.parameters()))
    torch.testing.assert_close(padded_losses, losses)
    for (name, _), a, b in zip(model.named_parameters(), grads, padded_grads):
        torch.testing.assert_close(b, a, msg=name)
    assert any(g.abs().sum() > 0 for g in grads)


def test_a_batch_of_a_bucket_size_or_without_tokens_is_left_as_it_is():
    model = make_model("encoder", seeds=(0,)).train()
    batch = make_batch("encoder", seed=3)
    batch.encoder = batch.encoder[:8]  # 8 is a bucket: nothing to pad
    batch.encoder_segment = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert pad_tokens(batch, model.dropout_masks(batch))[0] is batch
    pooled = make_batch("decoder")
    assert pad_tokens(pooled, {})[0] is pooled


@pytest.mark.parametrize("family", ["seq2seq", "encoder"])
def test_padded_training_trains_the_unpadded_weights(synthetic_store, tmp_path, family):
    # What --cuda-graphs does to batches, on CPU without a compile: one epoch, padded or not, same weights.
    cache = synthetic_store(family=family, splits={"train": 60, "validation": 20}).path
    plain, padded = trainer(cache, tmp_path / "a"), trainer(cache, tmp_path / "b")
    padded.pad_tokens = True
    seen: list[tuple[int, int]] = []
    padded.step_loss.register_forward_pre_hook(lambda _, args: seen.append((args[0].num_examples,
                                                                             int(args[0].encoder.shape[0]))))
    loss_a, weights_a = one_epoch(plain)
    loss_b, weights_b = one_epoch(padded)
    full = [rows for examples, rows in seen if examples == 8]  # the last, smaller batch runs as it is
    assert len(full) == len(padded.train_data) // 8 and all(rows == token_bucket(rows) for rows in full)
    assert any(rows != token_bucket(rows) for rows in
               (int(batch.encoder.shape[0]) for _, batch in plain.train_data.epoch(8, shuffle=False)))
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-4, atol=1e-6, msg=name)
