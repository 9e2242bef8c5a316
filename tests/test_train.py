"""Stage two end to end on small real stores: lockstep, determinism, store-only, refusals."""

from __future__ import annotations

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
from pipeline.common.errors import (
    StoreCorruptError,
    StoreFormatError,
    StoreIncompleteError,
    TrainingError,
)
from pipeline.store import ATTRS_KEY, CacheStore, checksum, to_float32
from pipeline.training import Trainer, train
from pipeline.training.adapter import read_adapter_config
from pipeline.training.batches import SplitBatches
from pipeline.training.model import ReadModel


def quick(cache: str, out: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, out=str(out), epochs=kw.pop("epochs", 2), rnn_dim=kw.pop("rnn_dim", 16),
                       batch_size=kw.pop("batch_size", 8), device="cpu", **kw)


def adapter_tensors(run: Path, seed: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapters" / f"seed_{seed}" / "adapter_model.safetensors"))


@pytest.mark.parametrize("store", ["t5_store", "minilm_store", "gpt2_store"])
def test_train_writes_every_output(request, store, tmp_path):
    cache = request.getfixturevalue(store)
    metrics = train(quick(cache, tmp_path, seeds=(0, 1)), progress=False)
    assert set(metrics["seeds"]) == {"0", "1"}
    primary = metrics["primary_metric"]
    values = [metrics["seeds"][s][primary] for s in ("0", "1")]
    assert metrics["mean"][primary] == pytest.approx(np.mean(values), abs=1e-3)
    for name in ("metrics.json", "history.csv", "predictions/validation.csv", "config.json",
                 "adapters/seed_0/adapter_model.safetensors", "adapters/seed_1/adapter_config.json"):
        assert (tmp_path / name).is_file(), name
    # scores.json, DVC's metric: the headline figures, flat, the same names for every task.
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores == {
        "task": metrics["task"], "primary_metric": primary, "primary": metrics["mean"][primary],
        "primary_std": metrics["std"][primary], "select_on": "selection",
        "selection": metrics["mean"][f"selection/{primary}"],
        "frozen_start": metrics["frozen_start"]["mean"][primary], "majority": metrics["majority_baseline"][primary],
        "seeds": 2, "epochs_run": 2}
    adapter = json.loads((tmp_path / "adapters" / "seed_1" / "adapter_config.json").read_text())
    assert adapter["method"] == "READ" and adapter["seed"] == 1
    store = CacheStore(cache)
    assert adapter["store_fingerprint"] == store.fingerprint
    assert list(adapter) == sorted(adapter)
    # The typed record: the backbone and the extraction settings predict needs, loaded whole.
    record = read_adapter_config(tmp_path / "adapters" / "seed_1")
    assert record.revision == store.meta.backbone.revision and record.task == store.meta.task.name
    assert record.extraction.layers == {s: tuple(v) for s, v in store.meta.layout.layers.items()}
    assert (record.extraction.dtype, record.extraction.max_length) == (store.dtype, 64)
    # The saved adapter reproduces the run's validation predictions.
    model = ReadModel.from_pretrained(tmp_path / "adapters" / "seed_1")
    trainer = Trainer(quick(cache, tmp_path / "again", seeds=(1,)), progress=False)
    trainer.model.load_seed_state_dict(0, model.seed_state_dict(0))
    preds, _ = trainer.predict("validation")
    saved = np.loadtxt(tmp_path / "predictions" / "validation.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(preds[0], saved[:, 3], rtol=1e-4, atol=1e-4)


def test_lockstep_equals_separate_runs(t5_store, tmp_path):
    together = train(quick(t5_store, tmp_path / "together", seeds=(3, 7)), progress=False)
    for seed in (3, 7):
        alone = train(quick(t5_store, tmp_path / f"alone{seed}", seeds=(seed,)), progress=False)
        assert alone["seeds"][str(seed)] == pytest.approx(together["seeds"][str(seed)], abs=1e-6)
        a, b = adapter_tensors(tmp_path / "together", seed), adapter_tensors(tmp_path / f"alone{seed}", seed)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_early_stopping_is_each_seeds_own(synthetic_store, tmp_path):
    # A large learning rate: selection scores go up and down, so the seeds stop improving at different epochs.
    # Seed 1 alone stops after epoch 3; in the lockstep batch it trains on while seed 0 improves, and a
    # later, better score of its own must not replace the best it chose when its patience ran out.
    cache = synthetic_store(splits={"train": 200, "validation": 40}).path
    options = dict(epochs=10, rnn_dim=8, batch_size=8, device="cpu", lr=3e-2, patience=1, threads=1)
    together = train(TrainConfig(cache=cache, out=str(tmp_path / "together"), seeds=(0, 1), **options),
                     progress=False)
    epochs_alone = []
    for seed in (0, 1):
        alone = train(TrainConfig(cache=cache, out=str(tmp_path / f"alone{seed}"), seeds=(seed,), **options),
                      progress=False)
        epochs_alone.append(alone["epochs_run"])
        assert alone["seeds"][str(seed)] == pytest.approx(together["seeds"][str(seed)], abs=1e-6)
        a, b = adapter_tensors(tmp_path / "together", seed), adapter_tensors(tmp_path / f"alone{seed}", seed)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert epochs_alone[0] != epochs_alone[1] and together["epochs_run"] == max(epochs_alone)  # the case at hand


def test_same_command_twice_gives_the_same_metrics(minilm_store, tmp_path):
    runner = CliRunner()
    args = ["train", "--cache", minilm_store, "--epochs", "2", "--rnn-dim", "16", "--batch-size", "8",
            "--seeds", "0,1", "--device", "cpu", "--quiet"]
    first = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    second = runner.invoke(main, [*args, "--out", str(tmp_path / "b")])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["seeds"] == mb["seeds"]
    assert "pearson" in first.output


def test_training_never_loads_a_backbone(t5_store, tmp_path, monkeypatch):
    """Every way of loading a Hugging Face model is made to fail; training must not notice."""
    import huggingface_hub
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def refuse(*args, **kwargs):
        raise AssertionError("stage two tried to load a Hugging Face model")

    for cls in (transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, transformers.PretrainedConfig,
                transformers.AutoConfig, transformers.AutoTokenizer, _BaseAutoModelClass):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setattr("pipeline.extraction.backbones.load_backbone", refuse)
    metrics = train(quick(t5_store, tmp_path / "patched", seeds=(0,)), progress=False)
    monkeypatch.undo()
    assert metrics["seeds"] == train(quick(t5_store, tmp_path / "free", seeds=(0,)), progress=False)["seeds"]
    # One seed has no sample std: null, and no "± 0.00" that would read as a perfectly stable score.
    from pipeline.training.trainer import result_line

    assert set(metrics["std"].values()) == {None} and "±" not in result_line(metrics)
    # Stronger: a fresh process in which `import transformers` itself fails still trains.
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['transformers'] = None; sys.modules['huggingface_hub'] = None\n"
        "from pipeline.cli import main\n"
        f"main(['train', '--cache', {t5_store!r}, '--out', {str(tmp_path / 'sub')!r}, '--epochs', '1',"
        " '--rnn-dim', '8', '--seeds', '0', '--device', 'cpu', '--quiet'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sub" / "metrics.json").is_file()


def test_streamed_data_covers_each_example_once_and_matches_memory(t5_store):
    store = CacheStore(t5_store)
    split = store.split("train")
    labels = torch.from_numpy(split.labels)
    streamed = SplitBatches(split, labels, memory_budget=0, shuffle_buffer=2)
    held = SplitBatches(split, labels, memory_budget=2**40)
    assert not streamed.in_memory and held.in_memory
    assert split.num_blocks > 2
    seen = np.concatenate([idx for idx, _ in streamed.epoch(8, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(len(split)))
    a = list(streamed.epoch(8, shuffle=False))
    b = list(held.epoch(8, shuffle=False))
    for (ia, ba), (ib, bb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        torch.testing.assert_close(ba.encoder, bb.encoder)
        torch.testing.assert_close(ba.decoder, bb.decoder)


def test_probe_and_read_have_the_same_untrained_prediction_on_label_rows(t5_store, tmp_path):
    """Zero-initialised READ predicts exactly the backbone's own label logits, from the store alone."""
    trainer = Trainer(quick(t5_store, tmp_path, seeds=(0,)), progress=False)
    store = CacheStore(t5_store)
    split = store.split("validation")
    rows = torch.from_numpy(store.label_rows())
    preds, _ = trainer.predict("validation")
    finals = []
    for i in range(len(split)):
        start, end = split.offsets["decoder"][i]
        raw = np.asarray(split.hidden("decoder")[start:end])
        finals.append(torch.from_numpy(to_float32(raw, store.dtype))[0, -1])
    expected = (torch.stack(finals) @ rows.T).argmax(-1).numpy()
    np.testing.assert_array_equal(preds[0], expected)


# ---- refusals ----------------------------------------------------------------------------------------


def test_incomplete_store_is_refused(t5_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(t5_store, copy)
    zarr.open_group(str(copy), mode="r+")["train"]["blocks_done"][0] = 0
    result = CliRunner().invoke(main, ["train", "--cache", str(copy), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "incomplete" in result.output and "rerun the same `pipeline extract`" in result.output
    from filelock import FileLock

    with FileLock(str(copy) + ".lock"):  # an extraction still writing the store: the fix is to wait
        result = CliRunner().invoke(main, ["train", "--cache", str(copy), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "incomplete (" in result.output and "an extraction is writing it now" in result.output
    with pytest.raises(StoreIncompleteError, match="no split 'test'"):
        train(quick(t5_store, tmp_path, eval_splits=("test",)), progress=False)


def test_unknown_format_version_is_refused(t5_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(t5_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    meta = dict(group.attrs[ATTRS_KEY])
    meta["format_version"] = 99
    group.attrs[ATTRS_KEY] = meta
    with pytest.raises(StoreFormatError, match="version 99"):
        train(quick(str(copy), tmp_path), progress=False)


def test_unlabeled_labels_and_non_finite_values_are_refused(t5_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(t5_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    first_label = group["validation"]["labels"][0]
    group["validation"]["labels"][0] = -1
    with pytest.raises(StoreCorruptError, match="validation/labels does not match its checksum"):
        train(quick(str(copy), tmp_path), progress=False)
    # Labels the extraction itself wrote (their checksum matches: an unlabeled split) are refused as values.
    labels = np.asarray(group["validation"]["labels"][:])
    set_example_array(copy, "validation", "labels", labels)
    with pytest.raises(TrainingError, match="labels outside"):
        train(quick(str(copy), tmp_path), progress=False)
    labels[0] = first_label
    set_example_array(copy, "validation", "labels", labels)
    group["train"]["encoder"]["hidden"][0] = np.uint16(0x7FC0)  # bfloat16 nan, written behind the store's back
    with pytest.raises(StoreCorruptError, match="train/encoder block 0: hidden checksum mismatch"):
        train(quick(str(copy), tmp_path), progress=False)
    # A nan the extraction itself wrote (its checksum matches) is refused as a value, not as damage.
    split = CacheStore(str(copy)).split("train")
    start, end = split.block_rows(0, "encoder")
    group["train"]["checksums"][0, split.columns.index("encoder/hidden")] = checksum(
        np.asarray(group["train"]["encoder"]["hidden"][start:end]))
    with pytest.raises(TrainingError, match="non-finite"):
        train(quick(str(copy), tmp_path), progress=False)


def test_a_damaged_shard_stops_training_before_it_starts(t5_store, tmp_path):
    import shutil

    from synthetic import damage_shard

    copy = tmp_path / "copy.zarr"
    shutil.copytree(t5_store, copy)
    damage_shard(copy / "train" / "encoder" / "hidden" / "c" / "0" / "0" / "0", "truncate")
    result = CliRunner().invoke(main, ["train", "--cache", str(copy), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "train/encoder block 0: hidden" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_missing_store_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--cache", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2 and result.output.startswith("Error: no store")


def test_train_leaves_the_callers_torch_threads_and_transformers_logging_as_they_were(t5_store, tmp_path):
    # A library call: a notebook's later work (or a sweep's next point in the same worker) must not inherit them.
    from transformers.utils import logging as hf_logging

    from pipeline.extraction.backbones import load_backbone

    threads = torch.get_num_threads()
    train(quick(t5_store, tmp_path / "run", threads=threads + 1, epochs=1), progress=False)
    assert torch.get_num_threads() == threads
    verbosity = hf_logging.get_verbosity()
    store = CacheStore(t5_store)
    load_backbone(store.meta.backbone.name, device="cpu")
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled()
