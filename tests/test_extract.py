"""Stage one against the real models' own outputs, plus resumption and refusals."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from synthetic import damage_shard, tree_bytes

from pipeline.cli import main
from pipeline.common.config import ExtractConfig
from pipeline.common.errors import (
    ConfigError,
    DataNotFoundError,
    EmptySplitError,
    LabelWordCollisionError,
    ModelLoadError,
    StoreMismatchError,
    UnknownTaskError,
    UnsupportedModelError,
)
from pipeline.common.tasks import get_task
from pipeline.extraction import Extraction, extract, finished_store, length_batches
from pipeline.extraction.backbones import load_backbone, model_label_logits
from pipeline.extraction.glue import load_split
from pipeline.store import CacheStore, to_float32, verify_store

REPO = Path(__file__).resolve().parents[1]
BF16_RTOL = 2**-7  # bfloat16 keeps 8 significant bits


def reference_states(model_path: Path, family: str, token_ids: list[int],
                     pair: tuple[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The model's own output_hidden_states for one example, unpadded: (tokens, L+1, d) per side; an encoder's
    ``pair`` is its texts, encoded by the model's tokenizer as a user would."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    ids = torch.tensor([token_ids])
    with torch.no_grad():
        if family == "seq2seq":
            model = AutoModelForSeq2SeqLM.from_pretrained(model_path).eval()
            out = model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long), output_hidden_states=True)
            return {
                "encoder": torch.stack(out.encoder_hidden_states, 2)[0],
                "decoder": torch.stack(out.decoder_hidden_states, 2)[0],
            }
        if family == "decoder":
            model = AutoModelForCausalLM.from_pretrained(model_path).eval()
            out = model(input_ids=ids, output_hidden_states=True)
            return {"decoder": torch.stack(out.hidden_states, 2)[0, -1:]}
        model = AutoModel.from_pretrained(model_path).eval()
        types = {}
        if pair is not None:  # the model's own pair encoding, segment ids included, from its tokenizer
            from transformers import AutoTokenizer

            encoded = AutoTokenizer.from_pretrained(model_path)(*pair, truncation="longest_first", max_length=64,
                                                                 return_tensors="pt")
            assert encoded["input_ids"][0].tolist() == token_ids
            types = {"token_type_ids": encoded["token_type_ids"]} if "token_type_ids" in encoded else {}
        out = model(input_ids=ids, output_hidden_states=True, **types)
        return {"encoder": torch.stack(out.hidden_states, 2)[0]}


def stored_example(store: CacheStore, split: str, side: str, index: int) -> np.ndarray:
    s = store.split(split)
    start, end = s.offsets[side][index]
    return to_float32(np.asarray(s.hidden(side)[start:end]), store.dtype)


def run_extract(tmp_path: Path, model: Path, glue_dir: Path, **kw) -> CacheStore:
    cfg = ExtractConfig(model=str(model), task=kw.pop("task", "rte"), out=str(tmp_path / "s.zarr"),
                        glue_dir=str(glue_dir), splits=kw.pop("splits", "validation"), limit=kw.pop("limit", 12),
                        max_length=kw.pop("max_length", 64), batch_tokens=kw.pop("batch_tokens", 256), **kw)
    extract(cfg, progress=False)
    return CacheStore(cfg.out_path)


@pytest.mark.parametrize("fixture", ["tiny_t5", "tiny_t5_untied", "tiny_gpt2", "minilm"])
def test_stored_states_equal_the_models_own_hidden_states(request, fixture, tmp_path, glue_dir):
    model_path = request.getfixturevalue(fixture)
    store = run_extract(tmp_path, model_path, glue_dir, block_tokens=128)
    family = store.meta.backbone.family
    task = get_task("rte")
    backbone = load_backbone(str(model_path), device="cpu")
    examples = load_split(task, "validation", glue_dir, limit=12)
    token_ids = backbone.tokenize(task, examples.texts, 64)
    if family != "decoder":  # one row per example there: 12 examples fit one block
        assert store.split("validation").num_blocks > 1  # the test crosses block boundaries
    for index in (0, 5, 11):
        ref = reference_states(model_path, family, token_ids[index],
                               (examples.texts[index]["sentence1"], examples.texts[index]["sentence2"]))
        for side, expected in ref.items():
            got = stored_example(store, "validation", side, index)
            if side == "decoder" and family == "seq2seq":
                expected = expected[:1]  # decoder position 0 only
            assert got.shape == tuple(expected.shape)
            np.testing.assert_allclose(got, expected.numpy(), rtol=BF16_RTOL, atol=1e-5 * float(expected.abs().max()))
        if family == "seq2seq":
            ids = store.split("validation").group["encoder"]["token_ids"]
            start, end = store.split("validation").offsets["encoder"][index]
            assert list(ids[start:end]) == token_ids[index]
    rows = store.label_rows()
    if family == "encoder":
        assert rows is None
        return
    # Label rows reproduce the model's own label logits at the final state (correction 0).
    label_ids = store.meta.task.label_token_ids
    final = torch.from_numpy(stored_example(store, "validation", "decoder", 3)[-1, -1].copy())
    theirs = model_label_logits(backbone, [token_ids[3]], label_ids)[0]
    exact_final = reference_states(model_path, family, token_ids[3])["decoder"][0, -1]
    torch.testing.assert_close(exact_final @ torch.from_numpy(rows).T, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final @ torch.from_numpy(rows).T, theirs, rtol=0.02, atol=0.02 * float(theirs.abs().max()))


def test_t5_scaling_depends_on_tied_embeddings(tiny_t5, tiny_t5_untied):
    tied = load_backbone(str(tiny_t5), device="cpu")
    untied = load_backbone(str(tiny_t5_untied), device="cpu")
    assert tied.extra["scale_decoder_outputs"] is True
    assert untied.extra["scale_decoder_outputs"] is False
    task = get_task("rte")
    ids = tied.label_token_ids(task)
    raw = tied.model.get_output_embeddings().weight[ids].detach().numpy()
    np.testing.assert_allclose(tied.label_rows(task), raw * tied.d_model**-0.5, rtol=1e-6)


def test_t5_inputs_are_text_to_text(tiny_t5, glue_dir):
    backbone = load_backbone(str(tiny_t5), device="cpu")
    split = load_split("rte", "validation", glue_dir, limit=1)
    text = backbone.input_text(get_task("rte"), split.texts[0])
    assert text == [f"rte sentence1: {split.texts[0]['sentence1']} sentence2: {split.texts[0]['sentence2']}"]


def test_pooled_store_holds_the_mean_over_tokens(minilm, tmp_path, glue_dir):
    full = run_extract(tmp_path / "full", minilm, glue_dir, dtype="float32", limit=4)
    pooled = run_extract(tmp_path / "pooled", minilm, glue_dir, dtype="float32", limit=4, tokens="pooled")
    for i in range(4):
        np.testing.assert_allclose(
            stored_example(pooled, "validation", "encoder", i)[0],
            stored_example(full, "validation", "encoder", i).mean(axis=0), rtol=1e-5, atol=1e-5,
        )
    assert pooled.split("validation").lengths["encoder"].tolist() == full.split("validation").lengths["encoder"].tolist()


def test_layer_subset_keeps_the_named_states(minilm, tmp_path, glue_dir):
    full = run_extract(tmp_path / "full", minilm, glue_dir, dtype="float32", limit=2)
    some = run_extract(tmp_path / "some", minilm, glue_dir, dtype="float32", limit=2, layers="0,3,-1")
    assert some.meta.layout.layers["encoder"] == [0, 3, 6]
    np.testing.assert_array_equal(
        stored_example(some, "validation", "encoder", 1), stored_example(full, "validation", "encoder", 1)[:, [0, 3, 6]]
    )


def test_length_batches_respect_the_token_budget():
    lengths = [5, 60, 7, 33, 60, 2, 8, 31]
    batches = length_batches(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 for b in batches)


def test_a_finished_store_is_not_recomputed_and_other_settings_are_refused(tiny_t5, tmp_path, glue_dir):
    store = run_extract(tmp_path, tiny_t5, glue_dir)
    shard = next(Path(store.path, "validation", "encoder", "hidden").rglob("c/*/*/*"))
    before = shard.stat().st_mtime_ns
    run_extract(tmp_path, tiny_t5, glue_dir)
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        run_extract(tmp_path, tiny_t5, glue_dir, max_length=32)
    again = run_extract(tmp_path, tiny_t5, glue_dir, max_length=32, overwrite=True)
    assert again.meta.settings.max_length == 32
    assert verify_store(again.path) == []


def test_verify_catches_a_missing_block_and_non_finite_values(tiny_t5, tmp_path, glue_dir):
    store = run_extract(tmp_path, tiny_t5, glue_dir, dtype="float32", block_tokens=128)
    assert store.split("validation").num_blocks >= 3
    damage_shard(Path(store.path, "validation", "encoder", "hidden", "c", "1", "0", "0"), "delete")  # a real shard
    group = zarr.open_group(store.path, mode="r+")
    group["validation"]["blocks_done"][2] = 0
    group["validation"]["encoder"]["hidden"][0, 0, 0] = np.nan
    problems = verify_store(store.path)
    assert [p for p in problems if "block 1" in p] == [
        "validation/encoder block 1: hidden checksum mismatch (its shard is missing, truncated or altered); "
        "rerun the same `pipeline extract` command to re-extract it"]
    assert any("1 of" in p and "not written" in p for p in problems)
    assert any(p.startswith("validation/encoder block 0: ") and "1 non-finite values" in p for p in problems)
    result = CliRunner().invoke(main, ["verify", store.path])
    assert result.exit_code == 1 and "FAIL validation/encoder block 1: " in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_a_rerun_re_extracts_exactly_the_damaged_block(tiny_t5, tmp_path, glue_dir, how):
    args = ["--model", str(tiny_t5), "--task", "rte", "--glue-dir", str(glue_dir), "--splits", "validation",
            "--limit", "12", "--max-length", "64", "--batch-tokens", "256", "--block-tokens", "128", "--quiet"]
    clean, damaged = tmp_path / "clean.zarr", tmp_path / "damaged.zarr"
    assert cli(*args, "--out", str(clean)).exit_code == 0
    shutil.copytree(clean, damaged)
    shard = damaged / "validation" / "encoder" / "hidden" / "c" / "1" / "0" / "0"
    damage_shard(shard, how)
    result = CliRunner().invoke(main, ["verify", str(damaged)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("FAIL validation/encoder block 1: ")
    before = {f: f.stat().st_mtime_ns for f in damaged.rglob("*") if f.is_file() and f != shard}
    assert cli(*args, "--out", str(damaged)).exit_code == 0
    assert verify_store(str(damaged)) == []
    assert tree_bytes(damaged) == tree_bytes(clean)  # the same store, byte for byte
    rewritten = {f.relative_to(damaged).as_posix() for f, t in before.items() if f.stat().st_mtime_ns != t}
    block_1 = {"validation/encoder/token_ids/c/1", "validation/decoder/hidden/c/1/0/0", "validation/checksums/c/1/0",
               "validation/blocks_done/c/1", "zarr.json"}
    assert rewritten <= block_1 and "validation/decoder/hidden/c/1/0/0" in rewritten, rewritten


def test_a_rerun_writes_lost_per_example_arrays_again(tiny_t5, tmp_path, glue_dir):
    """Labels and offsets read back as zeros once a chunk is lost: verify names them, a rerun restores them."""
    args = ["--model", str(tiny_t5), "--task", "rte", "--glue-dir", str(glue_dir), "--splits", "validation",
            "--limit", "12", "--max-length", "64", "--batch-tokens", "256", "--block-tokens", "128", "--quiet"]
    clean, damaged = tmp_path / "clean.zarr", tmp_path / "damaged.zarr"
    assert cli(*args, "--out", str(clean)).exit_code == 0
    shutil.copytree(clean, damaged)
    for array in ("labels", "encoder/offsets"):
        for chunk in [f for f in (damaged / "validation" / array / "c").rglob("*") if f.is_file()]:
            chunk.unlink()
    result = CliRunner().invoke(main, ["verify", str(damaged)])
    assert result.exit_code == 1 and result.output.startswith("FAIL ") and "validation/labels" in result.output
    assert "Traceback" not in result.output
    assert cli(*args, "--out", str(damaged)).exit_code == 0
    assert verify_store(str(damaged)) == []
    assert tree_bytes(damaged) == tree_bytes(clean)


def test_the_same_inputs_give_the_same_bytes(tiny_t5, tmp_path, glue_dir):
    """Nothing volatile (a time, the store's path) is stored, so DVC's hash of a store is reproducible."""
    a = run_extract(tmp_path / "a", tiny_t5, glue_dir, block_tokens=128)
    b = run_extract(tmp_path / "b", tiny_t5, glue_dir, block_tokens=128)
    assert tree_bytes(a.path) == tree_bytes(b.path)
    root = Path(a.path, "zarr.json")
    stamp = root.stat().st_mtime_ns
    run_extract(tmp_path / "a", tiny_t5, glue_dir, block_tokens=128)  # finished: not rewritten
    assert root.stat().st_mtime_ns == stamp and tree_bytes(a.path) == tree_bytes(b.path)


def flip_labels(tsv: Path) -> None:
    swap = {"entailment": "not_entailment", "not_entailment": "entailment"}
    lines = tsv.read_text(encoding="utf-8").splitlines()
    rows = [line.rsplit("\t", 1) for line in lines[1:]]
    tsv.write_text("\n".join([lines[0], *(f"{text}\t{swap[label]}" for text, label in rows)]) + "\n", encoding="utf-8")


def test_a_store_built_from_other_data_is_stale(tiny_t5, tmp_path, glue_dir, caplog):
    """Same model and settings, labels flipped in the same file: not complete, refused, and the stage rebuilds it."""
    import yaml

    from stages import extract as extract_stage

    copy = tmp_path / "glue"
    (copy / "RTE").mkdir(parents=True)
    shutil.copy(Path(glue_dir) / "RTE" / "dev.tsv", copy / "RTE" / "dev.tsv")
    out = str(tmp_path / "s.zarr")
    settings = {"model": str(tiny_t5), "splits": ["validation"], "limit": 12, "max_length": 64, "batch_tokens": 256,
                "device": "cpu"}
    cfg = ExtractConfig(task="rte", out=out, glue_dir=str(copy), **settings)
    extract(cfg, progress=False)
    assert finished_store(cfg)
    moved = tmp_path / "elsewhere" / "glue"
    shutil.copytree(copy, moved)  # the same examples in another folder: the same store
    assert finished_store(dataclasses.replace(cfg, glue_dir=str(moved)))
    before = CacheStore(out).split("validation").labels
    flip_labels(copy / "RTE" / "dev.tsv")
    assert not finished_store(cfg)
    with pytest.raises(StoreMismatchError, match="validation data differ from the examples the store was built from"):
        extract(cfg, progress=False)
    result = cli("--model", str(tiny_t5), "--task", "rte", "--glue-dir", str(copy), "--splits", "validation",
                 "--limit", "12", "--max-length", "64", "--batch-tokens", "256", "--out", out, "--quiet")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "validation data differ" in result.output
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tasks": ["rte"], "glue_dir": str(copy), "extract": settings}))
    with caplog.at_level("INFO", logger="stages.extract"):
        assert extract_stage.main(["--task", "rte", "--params", str(params), "--out", out, "--quiet"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "stages.extract"]
    assert said == [f"{out} was made from other inputs (validation data differ from the examples the store was built "
                    "from (texts, labels or ids changed)); replacing it with a store of the current params and data"]
    np.testing.assert_array_equal(CacheStore(out).split("validation").labels, 1 - before)
    assert finished_store(cfg) and verify_store(out) == []


def blocks_done(store: str) -> np.ndarray | None:
    """The train split's done-flags of a store being written, or None while it cannot be read yet."""
    try:
        return np.asarray(zarr.open_group(store, mode="r")["train"]["blocks_done"][:])
    except Exception:
        return None


def kill_part_way(command: list[str], out: str, env: dict[str, str], timeout_s: float = 240) -> np.ndarray | None:
    """Start ``command`` writing ``out`` and kill -9 it once some but not all blocks are done; the done-flags
    then, or None if it finished first (a starved poller can miss the window). The process is stopped
    (SIGSTOP) before its flags are read, so what is checked is what the kill leaves."""
    proc = subprocess.Popen([*command, "--out", out], env=env, cwd=REPO)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            done = blocks_done(out)
            if done is not None and 1 <= done.sum() < len(done) - 1:
                proc.send_signal(signal.SIGSTOP)
                done = blocks_done(out)
                if done is not None and 0 < done.sum() < len(done):
                    return done
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_killed_extraction_resumes_to_the_same_store(minilm, tmp_path, glue_dir):
    """kill -9 part-way, rerun the same command: the result equals an uninterrupted run."""
    args = ["--model", str(minilm), "--task", "rte", "--glue-dir", str(glue_dir), "--splits", "train",
            "--limit", "160", "--max-length", "128", "--block-tokens", "1024", "--batch-tokens", "512", "--quiet"]
    command = [sys.executable, "-m", "pipeline.cli", "extract", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The killed run and its resume write with a pool of writers, the clean one with a single writer.
    for attempt in range(3):  # a new store each time the extraction outran the poller
        killed = str(tmp_path / f"killed{attempt}.zarr")
        interrupted = kill_part_way([*command, "--writers", "4"], killed, env)
        if interrupted is not None:
            break
    assert interrupted is not None, "extraction finished before it could be killed, 3 times; use a larger --limit"
    assert np.array_equal(blocks_done(killed), interrupted)  # the kill left what was seen
    rerun = subprocess.run([*command, "--out", killed, "--writers", "4"], env=env, cwd=REPO, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (f"resuming {killed}: split 'train' has {interrupted.sum()} of {len(interrupted)} blocks written; "
            f"extracting the other {len(interrupted) - interrupted.sum()}") in rerun.stderr
    clean = str(tmp_path / "clean.zarr")
    assert subprocess.run([*command, "--out", clean, "--writers", "1"], env=env, cwd=REPO).returncode == 0
    a, b = CacheStore(killed), CacheStore(clean)
    assert a.fingerprint == b.fingerprint
    sa, sb = a.split("train"), b.split("train")
    assert sa.blocks_done().all() and sb.blocks_done().all()
    np.testing.assert_array_equal(sa.offsets["encoder"], sb.offsets["encoder"])
    np.testing.assert_array_equal(np.asarray(sa.hidden("encoder")[:]), np.asarray(sb.hidden("encoder")[:]))
    np.testing.assert_array_equal(sa.labels, sb.labels)
    assert verify_store(killed) == []
    assert tree_bytes(killed) == tree_bytes(clean)  # byte for byte, whatever the writers and the kill


@pytest.mark.slow
def test_rte_with_minilm_has_the_glue_counts_and_verifies(minilm, tmp_path, glue_dir):
    out = str(tmp_path / "rte.zarr")
    result = CliRunner().invoke(main, ["extract", "--model", str(minilm), "--task", "rte", "--glue-dir", str(glue_dir),
                                       "--splits", "train,validation", "--out", out, "--max-length", "128", "--quiet"])
    assert result.exit_code == 0, result.output
    store = CacheStore(out)
    assert len(store.split("train")) == 2490 and len(store.split("validation")) == 277
    assert CliRunner().invoke(main, ["verify", out]).exit_code == 0
    info = CliRunner().invoke(main, ["info", out])
    assert "2,490 examples" in info.output and "complete  computed in float32" in info.output


# ---- refusals: one line, non-zero exit, nothing written ------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(main, ["extract", *args])


def test_cli_errors_are_one_line(tiny_t5, tmp_path, glue_dir):
    out = str(tmp_path / "x.zarr")
    base = ["--model", str(tiny_t5), "--glue-dir", str(glue_dir), "--out", out]
    cases = {
        "unknown GLUE task": cli(*base, "--task", "nope"),
        "split": cli(*base, "--task", "rte", "--splits", "dev"),
        "overflows float16": cli(*base, "--task", "rte", "--dtype", "float16", "--splits", "validation"),
        "cannot load model": cli("--model", str(tmp_path / "no-model"), "--task", "rte", "--glue-dir", str(glue_dir),
                                 "--out", out, "--splits", "validation"),
        str(tmp_path / "no-glue"): cli("--model", str(tiny_t5), "--task", "rte", "--glue-dir", str(tmp_path / "no-glue"),
                                       "--out", out),
    }
    for needle, result in cases.items():
        assert result.exit_code == 2, (needle, result.output)
        assert needle in result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert "Traceback" not in result.output
    assert not Path(out).exists()


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"model type 'vit' .* is not a supported family; supported: "):
        load_backbone(str(tmp_path), device="cpu")


def test_empty_split_and_colliding_label_words(tiny_t5, tmp_path, glue_dir, monkeypatch):
    empty = tmp_path / "glue" / "RTE"
    empty.mkdir(parents=True)
    (empty / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(EmptySplitError):
        Extraction(ExtractConfig(model=str(tiny_t5), task="rte", glue_dir=str(tmp_path / "glue"), splits="validation",
                                 out=str(tmp_path / "e.zarr")), progress=False)
    import dataclasses

    import pipeline.common.tasks as tasks

    clash = dataclasses.replace(tasks.get_task("rte"), label_words=("entailment", "entailments"))
    backbone = load_backbone(str(tiny_t5), device="cpu")
    with pytest.raises(LabelWordCollisionError, match="first sub-word"):
        backbone.label_token_ids(clash)


def test_config_refuses_clashing_settings():
    with pytest.raises(ConfigError, match="batch_tokens"):
        ExtractConfig(model="m", task="rte", max_length=512, batch_tokens=100)
    with pytest.raises(ConfigError, match="dtype"):
        ExtractConfig(model="m", task="rte", dtype="int8")


def test_max_length_past_the_models_positions_is_refused_before_any_block(tiny_gpt2, tiny_t5, minilm, glue_dir,
                                                                          tmp_path):
    """A longer input would fail in the position-embedding lookup mid-split (a device assert on CUDA)."""
    out = tmp_path / "s.zarr"
    cfg = ExtractConfig(model=str(tiny_gpt2), task="rte", glue_dir=str(glue_dir), splits="validation",
                        max_length=600, out=str(out))
    with pytest.raises(ConfigError, match=r"max_length 600 is more than .* \(512 positions\); pass --max-length 512 "):
        extract(cfg, progress=False)
    assert not out.exists()
    assert load_backbone(str(minilm), device="cpu").max_positions == 512
    assert load_backbone(str(tiny_t5), device="cpu").max_positions is None  # relative positions: no table


def test_a_decoder_max_length_no_longer_than_the_answer_cue_is_refused(tiny_gpt2, glue_dir, tmp_path):
    """Every prompt ends in the answer cue: a max_length that only fits the cue stored the cue alone for every
    example, and one shorter than the cue did not truncate at all."""
    cue = len(load_backbone(str(tiny_gpt2), device="cpu")._cue_ids())
    out = tmp_path / "s.zarr"
    for max_length in (2, cue):
        cfg = ExtractConfig(model=str(tiny_gpt2), task="sst2", glue_dir=str(glue_dir), splits="validation",
                            max_length=max_length, limit=8, out=str(out))
        with pytest.raises(ConfigError, match=rf"max_length {max_length} leaves no room .* --max-length {cue + 1} "):
            extract(cfg, progress=False)
        assert not out.exists()
    cfg = dataclasses.replace(cfg, max_length=cue + 1)
    extract(cfg, progress=False)
    assert len(CacheStore(str(out)).split("validation")) == 8
    backbone = load_backbone(str(tiny_gpt2), device="cpu")
    prompts = backbone.tokenize(get_task("sst2"), load_split("sst2", "validation", glue_dir).texts[:8], cue + 1)
    assert {len(p) for p in prompts} == {cue + 1}  # truncated to max_length, the cue kept whole
    assert {tuple(p[1:]) for p in prompts} == {tuple(backbone._cue_ids())}


def test_missing_model_and_task_errors_are_typed(tmp_path):
    with pytest.raises(ModelLoadError):
        load_backbone(str(tmp_path / "absent"), device="cpu")
    with pytest.raises(UnknownTaskError):
        get_task("glue")
    with pytest.raises(DataNotFoundError):
        load_split("rte", "validation", tmp_path)


def test_parts_in_parallel_fill_the_same_store_as_one_process(tiny_t5, tmp_path, glue_dir):
    """--part 0/2 and 1/2 run at the same time write disjoint shards; together they equal one run."""
    common = ["-m", "pipeline.cli", "extract", "--model", str(tiny_t5), "--task", "rte", "--glue-dir", str(glue_dir),
              "--splits", "train,validation", "--limit", "60", "--max-length", "64", "--block-tokens", "256",
              "--batch-tokens", "512", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parted = str(tmp_path / "parted.zarr")
    procs = [subprocess.Popen([sys.executable, *common, "--out", parted, "--part", f"{i}/2"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    said = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    # The part that finishes last sees every block written; a part never calls an unfinished store complete.
    assert any(s.startswith("store complete") for s in said), said
    assert all(s.startswith(("store complete", "this part is done")) for s in said), said
    whole = str(tmp_path / "whole.zarr")
    assert subprocess.run([sys.executable, *common, "--out", whole], env=env, cwd=REPO).returncode == 0
    a, b = CacheStore(parted), CacheStore(whole)
    assert a.fingerprint == b.fingerprint
    for name in ("train", "validation"):
        assert a.meta.splits[name].complete and a.split(name).num_blocks > 2
        for side in ("encoder", "decoder"):
            np.testing.assert_array_equal(np.asarray(a.split(name).hidden(side)[:]), np.asarray(b.split(name).hidden(side)[:]))
    assert verify_store(parted) == []


def test_rerun_of_a_finished_store_does_not_load_the_model(tiny_t5, tmp_path, glue_dir, monkeypatch):
    run_extract(tmp_path, tiny_t5, glue_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded for a finished store")

    monkeypatch.setattr("pipeline.extraction.stage.load_backbone", refuse)
    run_extract(tmp_path, tiny_t5, glue_dir)  # nothing to do
    with pytest.raises(AssertionError, match="loaded"):
        run_extract(tmp_path, tiny_t5, glue_dir, splits="train,validation")  # a new split needs the model


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_label_rows_that_miss_the_models_own_logits_are_refused(model, tmp_path, glue_dir, request):
    # The stored label rows times the final state must give the model's logits for the label words (seq2seq:
    # the forward's own logits; decoder: a separate forward); a head with extra terms cannot be stored.
    path = request.getfixturevalue(model)
    ext = Extraction(ExtractConfig(model=str(path), task="rte", glue_dir=str(glue_dir), splits="validation",
                                   limit=8, out=str(tmp_path / "s.zarr")), progress=False)
    ext.label_rows = ext.label_rows * 1.5  # what a head with a scale this pipeline does not store would need
    with pytest.raises(UnsupportedModelError, match=r"label rows of the LM head do not reproduce the model's own "
                                                    r"logits \(max difference"):
        ext.run_split("validation")


@pytest.mark.parametrize("fixture", ["tiny_t5", "tiny_t5_untied", "tiny_gpt2", "minilm"])
def test_linear_weights_stored_in_the_autocast_dtype_give_the_same_states(request, fixture, glue_dir):
    # On CUDA the frozen backbone runs in bf16 autocast, which casts every linear weight at every call: stored cast
    # (half the weights' memory), the forward must compute exactly what it did. Checked here in the CPU's autocast.
    from pipeline.extraction.backbones import linear_weights_to

    backbone = load_backbone(str(request.getfixturevalue(fixture)), device="cpu")
    backbone.autocast_dtype = torch.bfloat16
    task = get_task("rte")
    token_ids = backbone.tokenize(task, load_split(task, "validation", glue_dir, limit=6).texts, 64)

    def states() -> dict[str, list[torch.Tensor]]:
        out = backbone.forward(token_ids)
        return {side: [h.clone() for h in out[side]] for side in ("encoder", "decoder") if side in out}

    before = states()
    output = backbone.model.get_output_embeddings()
    output_weight = None if output is None else output.weight.detach().clone()
    float32_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    saved = linear_weights_to(backbone.model, torch.bfloat16)
    assert 0 < saved == float32_bytes - sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    after = states()
    for side in before:
        for a, b in zip(before[side], after[side]):
            assert torch.equal(a, b), side
    if output_weight is not None:  # the label rows are read from the output embeddings: still float32
        assert torch.equal(output.weight, output_weight)


@pytest.mark.parametrize("fixture", ["tiny_t5", "tiny_t5_untied", "tiny_gpt2", "minilm"])
def test_states_are_caught_as_the_model_makes_them_equal_to_its_hidden_states(request, fixture, glue_dir,
                                                                             monkeypatch):
    # Each state is caught on its way into a block (and out of the stack) and handed over at once, so a forward
    # never holds every layer's states; they must be the very tensors output_hidden_states collects.
    from pipeline.extraction.backbones import Backbone

    backbone = load_backbone(str(request.getfixturevalue(fixture)), device="cpu")
    task = get_task("rte")
    token_ids = backbone.tokenize(task, load_split(task, "validation", glue_dir, limit=5).texts, 64)
    assert backbone._stacks() is not None  # the hooks are what runs here
    taken: dict[str, list[tuple[int, torch.Tensor]]] = {side: [] for side in backbone.sides}
    out = backbone.forward(token_ids, lambda side, i, h: taken[side].append((i, h.clone())))
    assert not any(side in out for side in backbone.sides)  # handed over, not kept
    assert backbone.catching_checked is True  # the first forward found them equal to output_hidden_states
    collected = backbone.forward(token_ids)  # caught alone from now on
    monkeypatch.setattr(Backbone, "_stacks", lambda self: None)  # the model's own output_hidden_states
    own = backbone.forward(token_ids)
    for side in backbone.sides:
        expected = backbone.n_layers_encoder if side == "encoder" else backbone.n_layers_decoder
        assert [i for i, _ in taken[side]] == list(range(expected))
        assert len(collected[side]) == len(own[side]) == expected
        for (_, a), b, c in zip(taken[side], collected[side], own[side]):
            assert torch.equal(a, c) and torch.equal(b, c), side


def test_states_caught_at_the_wrong_modules_are_noticed_and_the_model_s_own_are_used(minilm, glue_dir, monkeypatch):
    # An architecture whose shallowest list of blocks is not where its hidden states flow must not store wrong
    # states: the first forward compares what the hooks caught with output_hidden_states and falls back for good.
    from pipeline.extraction.backbones import Backbone

    backbone = load_backbone(str(minilm), device="cpu")
    task = get_task("rte")
    token_ids = backbone.tokenize(task, load_split(task, "validation", glue_dir, limit=4).texts, 64)
    right = backbone._stacks()
    monkeypatch.setattr(Backbone, "_stacks", lambda self: None)
    own = backbone.forward(token_ids)["encoder"]
    stack, blocks = right["encoder"]
    wrong = torch.nn.ModuleList([block.intermediate for block in blocks])  # inside each block: other tensors
    monkeypatch.setattr(Backbone, "_stacks", lambda self: {"encoder": (stack, wrong)})
    for _ in range(2):  # the checking forward, then one after it
        taken: list[torch.Tensor] = []
        backbone.forward(token_ids, lambda side, i, h: taken.append(h))
        assert backbone.catching_checked is False
        assert len(taken) == len(own) and all(torch.equal(a, b) for a, b in zip(taken, own))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_the_label_row_check_runs_in_the_forwards_precision(request, fixture, tmp_path, glue_dir):
    # On an accelerator load_backbone keeps the linear weights in bfloat16 and runs the forward under autocast;
    # the check of the label rows against the model's own logits must too (GPT-2's Conv1D refused float32
    # inputs there). The CPU stands in: the same weights and autocast.
    from pipeline.extraction.backbones import linear_weights_to

    path = request.getfixturevalue(fixture)
    backbone = load_backbone(str(path), device="cpu")
    backbone.autocast_dtype = torch.bfloat16
    linear_weights_to(backbone.model, torch.bfloat16)
    cfg = ExtractConfig(model=str(path), task="rte", out=str(tmp_path / "s.zarr"), glue_dir=str(glue_dir),
                        splits="validation", limit=8, max_length=64)
    Extraction(cfg, progress=False, backbone=backbone).run()
    assert verify_store(cfg.out_path) == []


def test_a_split_not_begun_when_an_extraction_stopped_leaves_the_store_unfinished(tiny_t5, tmp_path, glue_dir,
                                                                                  monkeypatch):
    """Stopped (Ctrl-C) after the first split, before the second began: verify, info and train must not take
    the store for finished; the same command finishes it."""
    cfg = ExtractConfig(model=str(tiny_t5), task="rte", glue_dir=str(glue_dir), splits="validation,train",
                        limit=12, max_length=32, out=str(tmp_path / "s.zarr"))
    real = Extraction.run_split

    def stop_before_train(self, name, **kw):
        if name == "train":
            raise KeyboardInterrupt
        return real(self, name, **kw)

    monkeypatch.setattr(Extraction, "run_split", stop_before_train)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, progress=False)
    monkeypatch.setattr(Extraction, "run_split", real)
    assert CacheStore(cfg.out_path).splits == ["validation"]
    assert verify_store(cfg.out_path) == ["train: not begun (its extraction stopped before it; rerun the extract command)"]
    info = CliRunner().invoke(main, ["info", cfg.out_path])
    assert "train                  INCOMPLETE: not begun" in info.output
    result = CliRunner().invoke(main, ["train", "--cache", cfg.out_path, "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code != 0 and "split 'train' was asked for, but its extraction stopped before it began; " \
        "rerun that `pipeline extract` command" in result.output
    assert not finished_store(cfg)
    extract(cfg, progress=False)
    assert verify_store(cfg.out_path) == [] and CacheStore(cfg.out_path).meta.asked == ("train", "validation")
    assert CacheStore(cfg.out_path).unbegun == []


def test_a_split_begun_in_other_arithmetic_is_not_finished_in_this_one(tiny_t5, tmp_path, glue_dir):
    # An extraction begun on an accelerator (bfloat16 autocast; the CPU stands in) and resumed on a CPU (float32)
    # would mix blocks computed both ways: refused in one line. A finished store is the same store anywhere.
    from pipeline.extraction.backbones import linear_weights_to

    cfg = ExtractConfig(model=str(tiny_t5), task="rte", out=str(tmp_path / "s.zarr"), glue_dir=str(glue_dir),
                        splits="validation", limit=12, max_length=64, batch_tokens=256, block_tokens=128)
    backbone = load_backbone(str(tiny_t5), device="cpu")
    backbone.autocast_dtype = torch.bfloat16
    linear_weights_to(backbone.model, torch.bfloat16)
    assert backbone.precision == "bfloat16 autocast"
    Extraction(cfg, progress=False, backbone=backbone).run(max_blocks=1)
    assert CacheStore(cfg.out_path).meta.splits["validation"].precision == "bfloat16 autocast"
    args = ["--model", str(tiny_t5), "--task", "rte", "--glue-dir", str(glue_dir), "--splits", "validation",
            "--limit", "12", "--max-length", "64", "--batch-tokens", "256", "--block-tokens", "128", "--quiet"]
    before = tree_bytes(cfg.out_path)
    result = cli(*args, "--out", cfg.out_path)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert ("split 'validation' was begun computing in bfloat16 autocast, and this run computes in float32"
            in result.output and "--overwrite" in result.output)
    assert tree_bytes(cfg.out_path) == before  # nothing written
    Extraction(cfg, progress=False, backbone=backbone).run()  # finished where it was begun
    assert cli(*args, "--out", cfg.out_path).exit_code == 0  # a finished store: nothing to compute, nothing refused
    assert tree_bytes(cfg.out_path) != before and verify_store(cfg.out_path) == []
    assert cli(*args, "--out", cfg.out_path, "--overwrite").exit_code == 0
    assert CacheStore(cfg.out_path).meta.splits["validation"].precision == "float32"


def test_a_store_from_before_the_template_was_its_identity_is_refused(tiny_t5, tmp_path, glue_dir):
    # Pair encoders now get their segment ids, so a store whose identity records no template may hold other
    # states: it is another store. Its recorded fingerprint still checks out (verify finds nothing edited).
    from pipeline.store import ATTRS_KEY
    from pipeline.store.meta import StoreMeta

    store = run_extract(tmp_path, tiny_t5, glue_dir)
    assert store.meta.identity.template == "t5"
    group = zarr.open_group(store.path, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["identity"] = {k: v for k, v in attrs["identity"].items() if k != "template"}
    attrs["fingerprint"] = StoreMeta.from_attrs(attrs, store.path).identity.fingerprint
    group.attrs[ATTRS_KEY] = attrs
    assert CacheStore(store.path).meta.consistent and verify_store(store.path) == []
    with pytest.raises(StoreMismatchError, match=r"template t5 here, none recorded \(an older store\)"):
        run_extract(tmp_path, tiny_t5, glue_dir)


def test_a_store_without_its_label_rows_is_not_finished_and_a_rerun_writes_them(tiny_t5, tmp_path, glue_dir):
    store = run_extract(tmp_path, tiny_t5, glue_dir)
    rows = store.label_rows()
    shutil.rmtree(Path(store.path, "label_rows"))
    assert CacheStore(store.path).label_rows() is None
    cfg = ExtractConfig(model=str(tiny_t5), task="rte", out=store.path, glue_dir=str(glue_dir), splits="validation",
                        limit=12, max_length=64, batch_tokens=256)  # run_extract's
    assert not finished_store(cfg)
    np.testing.assert_array_equal(run_extract(tmp_path, tiny_t5, glue_dir).label_rows(), rows)
