"""Honest selection: epochs and sweep winners are chosen on a fixed split carved from train, never on validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from synthetic import set_example_array

from pipeline.cli import main
from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError, TrainingError
from pipeline.store import CacheStore
from pipeline.training import Trainer, train
from pipeline.training.batches import SplitBatches
from pipeline.training.metrics import compute_metrics
from pipeline.training.selection import CAP, carve, selection_size


def quick(cache: str, out: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, out=str(out), epochs=kw.pop("epochs", 2), rnn_dim=kw.pop("rnn_dim", 16),
                       batch_size=kw.pop("batch_size", 8), device="cpu", **kw)


def adapter_tensors(run: Path, seed: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapters" / f"seed_{seed}" / "adapter_model.safetensors"))


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ---- the rule ------------------------------------------------------------------------------------


def test_the_rule_depends_only_on_the_ids():
    ids = np.arange(1000, 3490)  # RTE-sized
    mask = carve(ids)
    assert mask.sum() == selection_size(len(ids)) == 249
    np.testing.assert_array_equal(mask, carve(ids.copy()))  # deterministic
    shuffled = np.random.default_rng(0).permutation(ids)
    assert set(shuffled[carve(shuffled)]) == set(ids[mask])  # the same examples whatever the row order
    assert carve(np.arange(20_000)).sum() == CAP  # capped
    assert selection_size(2) == 1 and selection_size(9) == 1
    assert 0.05 < mask[: len(ids) // 2].mean() < 0.15  # spread over the split, not its head
    with pytest.raises(TrainingError, match="at least 2"):
        carve(np.arange(1))


def test_selection_is_disjoint_and_the_same_for_every_method_seed_and_data_seed(t5_store, tmp_path):
    runs = {
        "read": Trainer(quick(t5_store, tmp_path / "a", seeds=(0, 1)), progress=False),
        "probe": Trainer(quick(t5_store, tmp_path / "b", seeds=(5,), method="probe"), progress=False),
        "data_seed": Trainer(quick(t5_store, tmp_path / "c", seeds=(2,), data_seed=7), progress=False),
        "streamed": Trainer(quick(t5_store, tmp_path / "d", seeds=(0,), memory_budget=0), progress=False),
    }
    reference = runs["read"]
    n = len(CacheStore(t5_store).split("train"))
    for trainer in runs.values():
        assert trainer.selection == reference.selection
        np.testing.assert_array_equal(trainer.selection_data.examples, reference.selection_data.examples)
        selected = set(trainer.selection_data.examples.tolist())
        trained = set(trainer.train_data.examples.tolist())
        assert not selected & trained and len(selected | trained) == n
        seen = np.concatenate([i for i, _ in trainer.train_data.epoch(8, shuffle=True, seed=3)])
        assert sorted(seen.tolist()) == sorted(trained)  # an epoch covers the trained examples once, no other
        seen = np.concatenate([i for i, _ in trainer.selection_data.epoch(8, shuffle=False)])
        assert sorted(seen.tolist()) == sorted(selected)
    assert not runs["streamed"].train_data.in_memory and reference.train_data.in_memory
    assert reference.selection["size"] == selection_size(n) and reference.selection["trained_examples"] == n - \
        selection_size(n)


def test_a_subset_streams_exactly_as_it_is_held_in_memory(t5_store):
    split = CacheStore(t5_store).split("train")
    labels = torch.from_numpy(split.labels)
    picks = np.arange(1, len(split), 3)
    held = SplitBatches(split, labels, memory_budget=2**40).subset(picks)
    streamed = SplitBatches(split, labels, memory_budget=0, shuffle_buffer=2).subset(picks)
    assert len(held) == len(streamed) == len(picks)
    np.testing.assert_array_equal(held.example_labels(), split.labels[picks])
    a, b = list(held.epoch(5, shuffle=False)), list(streamed.epoch(5, shuffle=False))  # batches end per block group
    np.testing.assert_array_equal(np.concatenate([i for i, _ in a]), picks)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in b]), picks)
    for field in ("encoder", "decoder", "labels"):
        torch.testing.assert_close(torch.cat([getattr(x, field) for _, x in a]),
                                   torch.cat([getattr(x, field) for _, x in b]))
    with pytest.raises(TrainingError, match="needs 1 or more indices"):
        held.subset(np.array([len(split)]))


# ---- selection never reads the validation labels -------------------------------------------------


def test_validation_labels_choose_nothing_unless_asked(synthetic_store, tmp_path):
    made = synthetic_store(splits={"train": 60, "validation": 24}, family="seq2seq", task="rte")
    original = made.path
    permuted = str(tmp_path / "permuted.zarr")
    import shutil

    shutil.copytree(original, permuted)
    labels = np.asarray(zarr.open_group(permuted, mode="r")["validation"]["labels"][:])
    set_example_array(permuted, "validation", "labels", 1 - labels)  # every validation label wrong
    settings = {"epochs": 4, "seeds": (0, 1), "lr": 3e-2, "rnn_dim": 8, "patience": 2}
    a = train(quick(original, tmp_path / "a", **settings), progress=False)
    b = train(quick(permuted, tmp_path / "b", **settings), progress=False)
    assert a["select_on"] == "selection" and a["select_metric"] == "selection/accuracy"
    for seed in ("0", "1"):
        assert a["seeds"][seed]["best_epoch"] == b["seeds"][seed]["best_epoch"]
        assert a["seeds"][seed]["selection/accuracy"] == b["seeds"][seed]["selection/accuracy"]
        assert a["seeds"][seed]["accuracy"] == pytest.approx(100 - b["seeds"][seed]["accuracy"])  # it was read
        ta, tb = adapter_tensors(tmp_path / "a", int(seed)), adapter_tensors(tmp_path / "b", int(seed))
        for name in ta:
            torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=0)
    assert a["epochs_run"] == b["epochs_run"]
    # With the flag, the reported split chooses: each seed's epoch is its best validation epoch, and it says so.
    c = train(quick(permuted, tmp_path / "c", select_on="validation", **settings), progress=False)
    rows = history(tmp_path / "c")
    assert c["select_on"] == "validation" and "VALIDATION" in c["selected_on"]
    assert {row["select_on"] for row in rows} == {"validation"}
    for seed in ("0", "1"):
        scores = [float(row[f"accuracy_seed{seed}"]) for row in rows[1:]]
        assert c["seeds"][seed]["best_epoch"] == 1 + int(np.argmax(scores))


def test_outputs_record_the_selection_split_and_label_the_choice(minilm_store, tmp_path):
    runner = CliRunner()
    args = ["train", "--cache", minilm_store, "--epochs", "1", "--rnn-dim", "8", "--seeds", "0", "--device", "cpu",
            "--quiet"]
    honest = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    optimistic = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), "--select-on", "validation"])
    assert honest.exit_code == 0 and optimistic.exit_code == 0, honest.output + optimistic.output
    assert "epochs chosen on the selection split" in honest.output and "frozen start" in honest.output
    assert "ON VALIDATION (optimistic)" in optimistic.output
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    record = metrics["selection"]
    assert record["from_split"] == "train" and record["size"] == 4 and record["trained_examples"] == 36
    assert len(record["ids_sha256"]) == 64 and "GLUE idx" in record["rule"]
    header = list(history(tmp_path / "a")[0])
    assert {"select_on", "selection/combined", "selection/combined_seed0", "combined_seed0"} <= set(header)
    with pytest.raises(ConfigError, match="select_on 'test' must be selection or validation"):
        quick(minilm_store, tmp_path, select_on="test")


# ---- the frozen start ------------------------------------------------------------------------------


@pytest.mark.parametrize("store, words", [("t5_store", "zero-shot"), ("minilm_store", "fresh")])
def test_frozen_start_is_an_eval_of_the_untrained_model(request, store, words, tmp_path):
    cache = request.getfixturevalue(store)
    cfg = quick(cache, tmp_path, seeds=(0, 1), epochs=1)
    untrained = Trainer(cfg, progress=False)
    preds, labels = untrained.predict("validation")
    expected = [compute_metrics(untrained.task, preds[k], labels) for k in range(2)]
    metrics = Trainer(cfg, progress=False).run()
    frozen = metrics["frozen_start"]
    assert frozen["epoch"] == 0 and words in frozen["meaning"]
    for k, seed in enumerate(("0", "1")):
        for name, value in expected[k].items():
            assert frozen["seeds"][seed][name] == pytest.approx(value, abs=1e-4)
    rows = history(tmp_path)
    assert rows[0]["epoch"] == "0" and rows[0]["train_loss"] == ""
    primary = metrics["primary_metric"]
    assert float(rows[0]["primary"]) == pytest.approx(frozen["mean"][primary], abs=1e-4)
    if words == "zero-shot":  # the backbone's own label-word prediction: the same for every seed and the probe
        probe = train(quick(cache, tmp_path / "probe", seeds=(3,), epochs=1, method="probe"), progress=False)
        assert frozen["seeds"]["0"] == frozen["seeds"]["1"] == probe["frozen_start"]["seeds"]["3"]
    assert set(metrics["majority_baseline"]) == set(expected[0])


# ---- pooled stores ---------------------------------------------------------------------------------


def test_cls_pooling_on_a_pooled_store_is_refused_in_one_line(synthetic_store, tmp_path):
    pooled = synthetic_store(family="encoder", tokens="pooled", task="sst2", block_tokens=8)
    result = CliRunner().invoke(main, ["train", "--cache", pooled.path, "--pooling", "cls", "--out",
                                       str(tmp_path / "r"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "--pooling cls needs every token's states" in result.output and "is pooled" in result.output
    assert not (tmp_path / "r").exists()
    every_token = synthetic_store(name="t.zarr", family="encoder", tokens="all", task="sst2")
    metrics = train(quick(every_token.path, tmp_path / "ok", pooling="cls", epochs=1), progress=False)
    assert metrics["seeds"]["0"]["best_epoch"] == 1
