"""READ side network: hand-written references, zero init, lockstep seeds, persistence, config checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.errors import ConfigError
from pipeline.training import fused_gru
from pipeline.training.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    ExtractionSettings,
    load_adapter,
)
from pipeline.training.model import (
    ReadConfig,
    ReadModel,
    clip_grad_norm_per_seed,
    per_seed_loss,
    trainable_parameter_count,
)
from pipeline.training.network import SideBatch, SideNet, _GruBlend, segment_mean

D, R, K, B, N_STATES = 8, 6, 3, 4, 5


def make_batch(
    family: str, *, n_states: int = N_STATES, task_kind: str = "classification", seed: int = 0
) -> SideBatch:
    """Random states; encoder examples have 1..4 tokens each, flattened without padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (B,), generator=g)
    segment = torch.repeat_interleave(torch.arange(B), lengths)  # (N_tok,)
    first = torch.cumsum(lengths, 0) - lengths
    if task_kind == "classification":
        labels = torch.randint(0, K, (B,), generator=g)
    else:
        labels = torch.rand(B, generator=g) * 5
    batch = SideBatch(labels=labels)
    if family in ("encoder", "seq2seq"):
        # scale the states like a real backbone: RMSNorm must make the side net scale-free
        batch.encoder = 3.0 * torch.randn(int(lengths.sum()), n_states, D, generator=g)
        batch.encoder_segment = segment
        batch.encoder_first = first
    if family in ("seq2seq", "decoder"):
        batch.decoder = 3.0 * torch.randn(B, n_states, D, generator=g)
    return batch


def make_model(family: str, seeds=(0,), task_kind: str = "classification", **kw) -> ReadModel:
    num_labels = K if task_kind == "classification" else 1
    cfg = ReadConfig(family=family, d_model=D, num_labels=num_labels, task_kind=task_kind, rnn_dim=R, **kw)
    rows = torch.randn(K, D, generator=torch.Generator().manual_seed(99)) if cfg.uses_label_rows else None
    return ReadModel(cfg, list(seeds), label_rows=rows)


@torch.no_grad()
def randomise(model: ReadModel, seed: int = 7) -> None:
    """Non-trivial norm and output weights, so the references test every parameter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("norm_weight", "out_weight", "out_bias")):
            if name.endswith("norm_weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------- plain references (one seed)


def ref_cell(net: SideNet) -> nn.Module:
    """torch's own cell loaded with seed 0's weights."""
    cls = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}[net.cell]
    cell = cls(net.weight_ih.shape[2], net.rnn_dim)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(net, n)[0])
    return cell


def ref_side(net: SideNet, x: Tensor, has_embedding: bool, h0: Tensor | None = None) -> Tensor:
    """a for each token, one token and one layer at a time: x (N, n, d) -> (N, r)."""
    cell, w = ref_cell(net), net.norm_weight[0]

    def norm(v: Tensor) -> Tensor:
        return v / torch.sqrt((v * v).mean() + 1e-6) * w

    out = []
    for t in range(x.shape[0]):
        states = x[t, 1:] if has_embedding else x[t]
        if h0 is not None:
            h = h0[t]
        elif net.h0_weight is not None:
            h = torch.tanh(net.h0_weight[0] @ norm(x[t, 0]) + net.h0_bias[0])
        else:
            h = torch.zeros(net.rnn_dim)
        c = torch.zeros(net.rnn_dim)
        hs = []
        for layer in states:
            if net.cell == "lstm":
                h, c = cell(norm(layer)[None], (h[None], c[None]))
                h, c = h[0], c[0]
            else:
                h = cell(norm(layer)[None], h[None])[0]
            hs.append(h)
        out.append(torch.stack(hs).mean(0) if net.aggregate == "mean" else hs[-1])
    return torch.stack(out)


def ref_delta(net: SideNet, a: Tensor) -> Tensor:
    return a @ net.out_weight[0].T + net.out_bias[0]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "rnn,aggregate,h0,has_embedding",
    [
        ("gru", "mean", "zero", True),
        ("gru", "last", "embedding", True),
        ("gru", "mean", "zero", False),
        ("rnn", "mean", "embedding", True),
        ("lstm", "mean", "zero", True),
        ("lstm", "last", "embedding", True),
    ],
)
def test_decoder_family_matches_reference(rnn, aggregate, h0, has_embedding, train):
    # train mode with dropout 0 takes the materialised-u path, eval the folded one: check both
    model = make_model(
        "decoder", rnn=rnn, aggregate=aggregate, h0=h0, has_embedding=has_embedding, dropout=0.0
    )
    randomise(model)
    model.train(train)
    batch = make_batch("decoder")
    with torch.no_grad():
        got = model(batch)[0]  # (B, K)
        net = model.decoder_net
        final = batch.decoder[:, -1] + ref_delta(net, ref_side(net, batch.decoder, has_embedding))
        want = final @ model.label_rows.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, batch.decoder[:, -1] @ model.label_rows.T, atol=1e-3)  # delta matters


@pytest.mark.parametrize("encoder_side", [True, False])
def test_seq2seq_matches_reference(encoder_side):
    model = make_model("seq2seq", encoder_side=encoder_side, dropout=0.0).eval()
    randomise(model)
    batch = make_batch("seq2seq")
    with torch.no_grad():
        got = model(batch)[0]
        h0 = None
        if encoder_side:
            a_tok = ref_side(model.encoder_net, batch.encoder, True)  # (N_tok, r)
            e = torch.stack([a_tok[batch.encoder_segment == b].mean(0) for b in range(B)])  # (B, r)
            h0 = torch.tanh(e @ model.join_weight[0].T + model.join_bias[0])
        else:
            assert model.encoder_net is None and model.join_weight is None
        net = model.decoder_net
        final = batch.decoder[:, -1] + ref_delta(net, ref_side(net, batch.decoder, True, h0=h0))
        want = final @ model.label_rows.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if encoder_side:  # the encoder states reach the prediction
        batch.encoder = batch.encoder + 1.0
        with torch.no_grad():
            assert not torch.allclose(model(batch)[0], got, atol=1e-4)


@pytest.mark.parametrize("task_kind", ["classification", "regression"])
def test_encoder_family_mean_pooling_matches_loop(task_kind):
    model = make_model("encoder", task_kind=task_kind, dropout=0.0).eval()
    randomise(model)
    batch = make_batch("encoder", task_kind=task_kind)
    with torch.no_grad():
        got = model(batch)[0]
        net = model.encoder_net
        corrected = batch.encoder[:, -1] + ref_delta(net, ref_side(net, batch.encoder, True))  # (N_tok, d)
        pooled = torch.stack([corrected[batch.encoder_segment == b].mean(0) for b in range(B)])
        want = F.linear(pooled, model.head_weight[0], model.head_bias[0])
        if task_kind == "regression":
            want = want.squeeze(-1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_encoder_cls_pooling_picks_first_token():
    model = make_model("encoder", pooling="cls", dropout=0.0).eval()
    randomise(model)
    batch = make_batch("encoder")
    with torch.no_grad():
        got = model(batch)[0]
        net, x = model.encoder_net, batch.encoder[batch.encoder_first]
        cls = x[:, -1] + ref_delta(net, ref_side(net, x, True))
        want = F.linear(cls, model.head_weight[0], model.head_bias[0])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # other tokens do not matter; encoder_first may be left out (derived from the segments)
        others = torch.ones(batch.encoder.shape[0], dtype=torch.bool)
        others[batch.encoder_first] = False
        batch.encoder[others] += 10.0
        batch.encoder_first = None
        torch.testing.assert_close(model(batch)[0], got, atol=1e-6, rtol=0)


def test_segment_mean_equals_loop_and_pooled_store():
    g = torch.Generator().manual_seed(1)
    segment = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    values = torch.randn(2, 10, 5, generator=g)  # (S, N, F)
    got = segment_mean(values, segment, 4)
    want = torch.stack([torch.stack([values[s, segment == b].mean(0) for b in range(4)]) for s in range(2)])
    torch.testing.assert_close(got, want)
    assert segment_mean(values, None, 10) is values  # pooled store: one token per example
    # a pooled store (one token per example, no segment ids) gives the same as explicit ids
    model = make_model("encoder", dropout=0.0).eval()
    randomise(model)
    batch = make_batch("encoder")
    pooled = SideBatch(labels=batch.labels, encoder=batch.encoder[batch.encoder_first])
    explicit = SideBatch(labels=batch.labels, encoder=pooled.encoder, encoder_segment=torch.arange(B))
    with torch.no_grad():
        torch.testing.assert_close(model(pooled), model(explicit))


# ------------------------------------------------------------------------------------- zero init


@pytest.mark.parametrize("family", ["seq2seq", "decoder"])
@pytest.mark.parametrize("method", ["read", "probe"])
def test_zero_init_label_rows_exact(family, method):
    model = make_model(family, seeds=(0, 1), method=method)
    batch = make_batch(family)
    want = batch.decoder[:, -1] @ model.label_rows.T  # the backbone's own label logits
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            got = model(batch)  # (S, B, K)
        assert got.shape == (2, B, K)
        for s in range(2):
            if method == "read":  # x_L + 0 through the same frozen rows: bit for bit
                assert torch.equal(got[s], want), (train, s)
            else:  # a trainable head that starts as the rows (another matmul kernel)
                torch.testing.assert_close(got[s], want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("method", ["read", "probe"])
def test_zero_init_encoder_is_head_on_pooled_final_state(method):
    model = make_model("encoder", seeds=(0, 1), method=method)
    batch = make_batch("encoder")
    pooled = torch.stack([batch.encoder[batch.encoder_segment == b, -1].mean(0) for b in range(B)])
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            got = model(batch)
        for s in range(2):
            want = F.linear(pooled, model.head_weight[s], model.head_bias[s])
            torch.testing.assert_close(got[s], want, atol=1e-6, rtol=1e-6)


def test_linear_out_init_and_scale_are_the_authors_output_layer():
    """out_init=linear draws W_out, b_out like nn.Linear(r, d); out_scale multiplies the whole correction."""
    base = make_model("decoder", seeds=(3,), out_init="linear")
    scaled = make_model("decoder", seeds=(3,), out_init="linear", out_scale=0.8551)
    net = base.decoder_net
    bound = 1.0 / R**0.5
    for name in ("out_weight", "out_bias"):
        value = getattr(net, name)[0]
        assert value.abs().max() <= bound and value.abs().max() > 0.5 * bound, name  # U(-1/sqrt(r), 1/sqrt(r))
        assert torch.equal(value, getattr(scaled.decoder_net, name)[0]), name  # the scale is not an init change
    a = torch.randn(1, 5, R)
    torch.testing.assert_close(net.project(a)[0], ref_delta(net, a[0]))
    torch.testing.assert_close(scaled.decoder_net.project(a), 0.8551 * net.project(a))
    batch = make_batch("decoder")
    with torch.no_grad():
        assert not torch.equal(base.eval()(batch)[0], batch.decoder[:, -1] @ base.label_rows.T)  # starts off zero-shot


@torch.no_grad()
def test_zero_init_with_a_scale_still_changes_nothing():
    model = make_model("decoder", seeds=(0,), out_scale=0.5)
    batch = make_batch("decoder")
    assert torch.equal(model.eval()(batch)[0], batch.decoder[:, -1] @ model.label_rows.T)


# -------------------------------------------------------------------------------------- lockstep


def train_steps(model: ReadModel, batches: list[SideBatch], task_kind: str) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model.train()
    for batch in batches:
        opt.zero_grad()
        per_seed_loss(model(batch), batch.labels, task_kind).sum().backward()
        opt.step()


@pytest.mark.parametrize(
    "family,task_kind,kw",
    [
        ("encoder", "classification", {}),
        ("seq2seq", "classification", {"rnn": "lstm", "h0": "embedding"}),
        ("decoder", "regression", {"aggregate": "last"}),
    ],
)
def test_lockstep_equals_separate_runs(family, task_kind, kw):
    batches = [make_batch(family, task_kind=task_kind, seed=i) for i in range(4)]
    stacked = make_model(family, seeds=(0, 1, 2), task_kind=task_kind, dropout=0.3, **kw)
    singles = [make_model(family, seeds=(s,), task_kind=task_kind, dropout=0.3, **kw) for s in (0, 1, 2)]
    for k, single in enumerate(singles):  # same init whatever the other seeds in the stack
        for name, t in single.seed_state_dict(0).items():
            assert torch.equal(t, stacked.seed_state_dict(k)[name]), name
    train_steps(stacked, batches, task_kind)
    for single in singles:
        train_steps(single, batches, task_kind)
    for k, single in enumerate(singles):
        got, want = stacked.seed_state_dict(k), single.seed_state_dict(0)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    # the test could fail: seeds differ, training moved W_out off zero, dropout is live
    s0, s1 = stacked.seed_state_dict(0), stacked.seed_state_dict(1)
    out_name = next(n for n in s0 if n.endswith("out_weight"))
    assert not torch.allclose(s0[out_name], s1[out_name])
    assert s0[out_name].abs().max() > 0
    with torch.no_grad():
        assert not torch.equal(stacked(batches[0]), stacked(batches[0]))
        stacked.eval()
        assert torch.equal(stacked(batches[0]), stacked(batches[0]))


def test_per_seed_loss_and_clip_are_per_seed():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(3, B, K, generator=g), torch.randint(0, K, (B,), generator=g)
    losses = per_seed_loss(logits, labels, "classification")
    torch.testing.assert_close(losses, torch.stack([F.cross_entropy(seed_logits, labels) for seed_logits in logits]))
    preds, targets = torch.randn(3, B, generator=g), torch.rand(B, generator=g)
    torch.testing.assert_close(per_seed_loss(preds, targets, "regression"), ((preds - targets) ** 2).mean(1))

    batch = make_batch("decoder")
    stacked = make_model("decoder", seeds=(0, 1), dropout=0.0)
    randomise(stacked)
    single = make_model("decoder", seeds=(1,), dropout=0.0)
    single.load_seed_state_dict(0, stacked.seed_state_dict(1))
    per_seed_loss(stacked(batch), batch.labels, "classification").sum().backward()
    per_seed_loss(single(batch), batch.labels, "classification").sum().backward()
    norms = clip_grad_norm_per_seed(stacked, 0.01)
    want_norm = torch.nn.utils.clip_grad_norm_(single.parameters(), 0.01)
    torch.testing.assert_close(norms[1], want_norm)
    for (name, p), q in zip(stacked.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad[1], q.grad[0], atol=1e-7, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------- parameters


def test_parameter_count_independent_of_depth():
    """One model serves backbones of any depth: every parameter is trained at 7 and at 25 states, none resized."""
    model = make_model("decoder", seeds=(0, 1))
    with torch.no_grad():  # W_out starts at zero, which blocks every gradient upstream of it
        model.decoder_net.out_weight.normal_()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # GRU: norm d, W_ih 3r d, W_hh 3r r, biases 6r, W_out d r + d; label rows are frozen
    want = D + 3 * R * D + 3 * R * R + 6 * R + D * R + D
    for n_states in (7, 25):
        model.zero_grad(set_to_none=True)
        batch = make_batch("decoder", n_states=n_states)
        per_seed_loss(model(batch), batch.labels, "classification").sum().backward()
        untouched = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert not untouched, f"no gradient at {n_states} states for {untouched}"
        assert {name: tuple(p.shape) for name, p in model.named_parameters()} == shapes
        assert trainable_parameter_count(model) == want
    assert "label_rows" not in dict(model.named_parameters())
    probe = make_model("decoder", seeds=(0, 1), method="probe")
    assert trainable_parameter_count(probe) == K * D + K


# -------------------------------------------------------------------------------- persistence


def adapter_config(model: ReadModel, k: int, **kw) -> AdapterConfig:
    """A record for seed k of a test model (mnli: 3 classes like K; stsb: a score)."""
    task = "mnli" if model.config.task_kind == "classification" else "stsb"
    side = "encoder" if model.config.family == "encoder" else "decoder"
    extraction = ExtractionSettings(layers={side: tuple(range(N_STATES))}, tokens="all", dtype="bfloat16",
                                    max_length=64, template="pair" if side == "encoder" else "t5")
    values = {"read": model.config, "seed": model.seeds[k], "task": task, "base_model_name_or_path": "t5-tiny",
              "revision": "sha256:0123", "store_fingerprint": "abc123", "extraction": extraction}
    return AdapterConfig(**{**values, **kw})


def test_save_and_load_round_trip(tmp_path):
    model = make_model("seq2seq", seeds=(4, 5, 6), h0="embedding")
    randomise(model)
    config = adapter_config(model, 1)
    model.save_pretrained(tmp_path / "seed5", 1, config)
    assert (tmp_path / "seed5" / ADAPTER_WEIGHTS_NAME).is_file()
    text = (tmp_path / "seed5" / ADAPTER_CONFIG_NAME).read_text()
    payload = json.loads(text)
    assert list(payload) == sorted(payload)
    assert text.startswith('{\n  "')  # indent 2
    assert payload["method"] == "READ" and payload["seed"] == 5 and payload["store_fingerprint"] == "abc123"
    assert payload["rnn_dim"] == R and payload["h0"] == "embedding" and payload["peft_type"] == "READ"
    assert payload["extraction"] == {"layers": {"decoder": list(range(N_STATES))}, "tokens": "all",
                                     "dtype": "bfloat16", "max_length": 64, "template": "t5"}

    loaded, loaded_config = load_adapter(tmp_path / "seed5")
    assert loaded_config == config  # saved and loaded whole
    assert loaded.config == model.config and loaded.seeds == [5]
    assert ReadModel.from_pretrained(tmp_path / "seed5").seeds == [5]
    want = model.seed_state_dict(1)
    got = loaded.seed_state_dict(0)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(loaded.label_rows, model.label_rows)
    batch = make_batch("seq2seq")
    with torch.no_grad():
        # one seed vs a stack of three: batched kernels may round differently
        torch.testing.assert_close(loaded.eval()(batch)[0], model.eval()(batch)[1], atol=1e-6, rtol=1e-6)

    with pytest.raises(ConfigError, match="seed"):
        model.save_pretrained(tmp_path / "clash", 0, config)  # the record names seed 5, not seed 4


def test_probe_round_trip(tmp_path):
    model = make_model("encoder", seeds=(3,), method="probe", task_kind="regression")
    model.save_pretrained(tmp_path, 0, adapter_config(model, 0))
    assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())["method"] == "PROBE"
    loaded = ReadModel.from_pretrained(tmp_path)
    assert loaded.config.method == "probe" and loaded.label_rows is None
    assert torch.equal(loaded.head_weight, model.head_weight)


def test_adapter_written_before_the_extraction_record_still_loads(tmp_path):
    """adapter_config.json as the trainer wrote it before the typed record: no `extraction`."""
    model = make_model("decoder", seeds=(2,))
    model.save_pretrained(tmp_path, 0, adapter_config(model, 0))
    payload = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    del payload["extraction"]
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    loaded, config = load_adapter(tmp_path)
    assert config.extraction is None and config.seed == 2 and config.task == "mnli"
    assert torch.equal(loaded.seed_state_dict(0)["decoder_net.weight_ih"], model.seed_state_dict(0)["decoder_net.weight_ih"])


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(colour="red"), "unknown adapter_config.json key.*colour"),
    (lambda p: p.pop("revision"), "lacks revision"),
    (lambda p: p.update(task="sst2"), "sst2 has 2 label"),
    (lambda p: p["extraction"].update(tokens="some"), "extraction.tokens"),
])
def test_broken_adapter_config_is_one_line(tmp_path, change, message):
    from pipeline.common.errors import AdapterError

    model = make_model("decoder", seeds=(2,))
    model.save_pretrained(tmp_path, 0, adapter_config(model, 0))
    payload = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    change(payload)
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    with pytest.raises(AdapterError, match=message) as caught:
        load_adapter(tmp_path)
    assert "\n" not in str(caught.value) and ADAPTER_CONFIG_NAME in str(caught.value)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kw,fields",
    [
        ({"h0": "embedding", "has_embedding": False}, ("h0", "has_embedding")),
        ({"family": "decoder", "pooling": "cls"}, ("pooling", "family")),
        ({"family": "seq2seq", "pooling": "cls"}, ("pooling", "family")),
        ({"rnn": "transformer"}, ("rnn",)),
        ({"task_kind": "regression"}, ("num_labels",)),
        ({"dropout": 1.0}, ("dropout",)),
        ({"family": "encoder", "encoder_side": False}, ("encoder_side",)),
        ({"aggregate": "max"}, ("aggregate",)),
    ],
)
def test_config_clashes(kw, fields):
    base = {"family": "encoder", "d_model": D, "num_labels": K, "task_kind": "classification"}
    with pytest.raises(ConfigError) as err:
        ReadConfig(**{**base, **kw})
    for f in fields:
        assert f in str(err.value)


def test_model_argument_errors():
    cfg = ReadConfig(family="decoder", d_model=D, num_labels=K, task_kind="classification")
    with pytest.raises(ConfigError, match="label_rows"):
        ReadModel(cfg, [0])
    with pytest.raises(ConfigError, match="label_rows"):
        ReadModel(cfg, [0], label_rows=torch.zeros(K + 1, D))
    with pytest.raises(ConfigError, match="seeds"):
        ReadModel(cfg, [1, 1], label_rows=torch.zeros(K, D))
    enc = ReadConfig(family="encoder", d_model=D, num_labels=K, task_kind="classification")
    with pytest.raises(ConfigError, match="label_rows"):
        ReadModel(enc, [0], label_rows=torch.zeros(K, D))
    assert ReadConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        ReadConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---- activation memory: what a GRU layer step keeps for the backward ---------------------------------


def test_the_gru_blend_is_autograds_own_arithmetic_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    n, h, grad = (torch.randn(3, 7, 5, generator=g) for _ in range(3))
    z = torch.rand(3, 7, 5, generator=g)
    ours = [t.clone().requires_grad_() for t in (n, z, h)]
    plain = [t.clone().requires_grad_() for t in (n, z, h)]
    out = _GruBlend.apply(*ours)
    ref = plain[0] + plain[1] * (plain[2] - plain[0])
    assert torch.equal(out, ref)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(ours, plain):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("fused", [False, True], ids=["composite", "fused-cell"])
def test_a_gru_layer_step_keeps_five_r_wide_tensors_for_the_backward(fused, monkeypatch):
    # Per seed and token, each layer step keeps h_(i-1), the sigmoid's r and z, n and the r columns of W_hn h:
    # 5 r-wide tensors (it was 8: h - n and all 3 r columns of W_hh h). Plus the normalised states (shared by the
    # seeds) and the aggregate a; parameters are not activations and are left out. The step through the fused
    # cell kernels (CUDA; here their stand-ins) keeps the kernel's workspace alone: the same 5 (torch's own
    # autograd formula for the kernel would keep its 7 r-wide inputs too).
    monkeypatch.setattr(fused_gru, "applies", lambda x: fused)
    S, N, L, d, r = 2, 11, 4, 16, 8
    net = SideNet(S, d, r, "gru", aggregate="mean", h0_from_embedding=False, with_output=True)
    torch.nn.init.uniform_(net.out_weight, -0.1, 0.1)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(N, L + 1, d)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a = net(x, has_embedding=True)
        net.project(a).sum().backward()
    floats = sum(kept.values()) // 4
    assert floats == L * N * d + (5 * L + 1) * S * N * r


def side_peaks(fused: bool, layers: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """Peak bytes of a seq2seq-sized side (bf16 states, as stored) with ``layers`` layers: an evaluation forward, a
    training forward and backward, and what that step keeps for its backward."""
    from pipeline.common.resources import peak_tensor_bytes

    monkeypatch.setattr(fused_gru, "applies", lambda x: fused)
    S, N, d, r = 3, 1500, 32, 16
    torch.manual_seed(0)
    net = SideNet(S, d, r, "gru", aggregate="mean", h0_from_embedding=False, with_output=True)
    for p in net.parameters():
        torch.nn.init.uniform_(p, -0.3, 0.3)
    x = torch.randn(N, layers + 1, d).to(torch.bfloat16)
    with torch.no_grad():
        evaluation = peak_tensor_bytes(lambda: net(x, has_embedding=True))
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            a = net(x, has_embedding=True)
        net.project(a).sum().backward()

    step()  # the gradients exist from then on, as in training
    kept.clear()
    training = peak_tensor_bytes(step)
    return evaluation, training, sum(kept.values())


@pytest.mark.parametrize("fused", [False, True], ids=["composite", "fused-cell"])
def test_a_side_holds_one_layer_s_gates_at_a_time(fused, monkeypatch):
    # An evaluation batch is hundreds of examples (256 by default): holding every layer's float32 states and
    # (S, N, 3 r) gates at once cost 9.7 GB for 5 seeds at the T5-base shape, where a layer at a time costs 1.4.
    # Without gradients the peak must not grow with the number of layers; in training it grows with what the
    # backward keeps (the workspaces and normalised states of every layer), not with every layer's gates and
    # their gradients besides.
    few, many = side_peaks(fused, 3, monkeypatch), side_peaks(fused, 12, monkeypatch)
    assert many[0] < 1.2 * few[0], (few, many)
    assert many[1] - many[2] < 1.2 * (few[1] - few[2]), (few, many)
