"""The store on its own: synthetic stores (no model, no GLUE files) written, read, damaged and refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from synthetic import damage_shard, synthetic_meta, tree_bytes

from pipeline.cli import main
from pipeline.common.errors import (
    NotAStoreError,
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from pipeline.store import (
    ATTRS_KEY,
    FORMAT_VERSION,
    STORED_DTYPES,
    CacheStore,
    SplitData,
    StoreMeta,
    StoreWriter,
    block_layout,
    logical_view,
    plan_blocks,
    to_float32,
    torch_view,
    verify_store,
)
from pipeline.store.format import EXAMPLE_SUMS
from pipeline.store.writer import write_shards

DAMAGE = ["delete", "truncate", "flip"]


def one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    return result.output


# ---- writing and reading back -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("tokens", ["all", "pooled"])
def test_a_written_store_reads_back_exactly(synthetic_store, dtype, tokens):
    # pooled: one row an example, so fewer rows a block to still cross block boundaries
    made = synthetic_store(dtype=dtype, tokens=tokens, codec="blosc-zstd", block_tokens=24 if tokens == "all" else 8)
    store = CacheStore(made.path)
    recorded = store.meta
    assert (recorded.identity, recorded.backbone, recorded.task, recorded.layout) == (
        made.meta.identity, made.meta.backbone, made.meta.task, made.meta.layout)
    assert recorded.consistent and store.fingerprint == made.meta.fingerprint == recorded.recorded_fingerprint
    assert StoreMeta.from_attrs(recorded.to_attrs(), "again") == recorded
    np.testing.assert_array_equal(store.label_rows(), made.label_rows)
    for name, data in made.splits.items():
        split = store.split(name)
        assert split.blocks_done().all() and recorded.splits[name].complete
        np.testing.assert_array_equal(split.labels, data.labels)
        np.testing.assert_array_equal(split.ids, data.ids)
        np.testing.assert_array_equal(split.lengths["encoder"], data.tokens)
        assert split.sides == ["encoder", "decoder"] and split.num_blocks == data.plan.num_blocks > 1
        for side in split.sides:
            for i in range(len(split)):
                start, end = split.offsets[side][i]
                got = to_float32(np.asarray(split.hidden(side)[start:end]), dtype)
                np.testing.assert_array_equal(got, data.states[side][i])
                if recorded.layout.per_token[side]:
                    np.testing.assert_array_equal(split.group[side]["token_ids"][start:end], data.token_ids[i])
            for j in range(split.num_blocks):
                lo, hi = data.plan.block_starts[j], data.plan.block_starts[j + 1]
                expected = np.concatenate(data.states[side][lo:hi])
                np.testing.assert_array_equal(to_float32(split.read_block(j, side), dtype), expected)
                into = np.full((len(expected) + 3, *expected.shape[1:]), 7, dtype=STORED_DTYPES[dtype])
                assert split.read_block(j, side, out=into[1:-2]) is not None  # decoded in place, checked there
                np.testing.assert_array_equal(to_float32(into[1:-2], dtype), expected)
                assert (into[0] == 7).all() and (into[-2:] == 7).all()
            cap = split.capacity[side]
            for j in range(split.num_blocks):  # rows past a block's used ones read as the fill value
                start, end = split.block_rows(j, side)
                assert not np.asarray(split.hidden(side)[end : (j + 1) * cap]).any()
                if recorded.layout.per_token[side]:
                    assert (np.asarray(split.group[side]["token_ids"][end : (j + 1) * cap]) == -1).all()
    per_token = recorded.layout.per_token["encoder"]
    assert per_token == (tokens == "all")
    assert verify_store(made.path) == []


def test_shards_written_inside_a_running_event_loop_equal_those_written_on_a_thread_of_its_own(tmp_path):
    values = np.arange(6 * 4 * 3, dtype=np.uint16).reshape(6, 4, 3)
    written = {}
    for how in ("thread", "loop"):
        array = zarr.create_array(tmp_path / f"{how}.zarr", shape=(16, 4, 3), chunks=(2, 4, 3), shards=(8, 4, 3),
                                  dtype="uint16", fill_value=0)
        writes = [(array, slice(8, 14), values)]
        if how == "thread":
            write_shards(writes)  # no running loop: one of its own
        else:
            async def in_a_notebook(writes: list = writes) -> None:  # a running loop: zarr's synchronous path
                write_shards(writes)
            asyncio.run(in_a_notebook())
        written[how] = np.asarray(array[:])
        np.testing.assert_array_equal(written[how][8:14], values)
        assert not written[how][:8].any() and not written[how][14:].any()
    assert tree_bytes(tmp_path / "thread.zarr") == tree_bytes(tmp_path / "loop.zarr")


def test_bfloat16_helpers_view_widen_and_share_memory():
    values = np.array([1.0, -2.5, 3.140625, 1e-3, 65280.0], dtype=np.float32)
    bits = np.asarray(values, dtype=ml_dtypes.bfloat16).view(np.uint16)
    view = logical_view(bits, "bfloat16")
    assert view.dtype == ml_dtypes.bfloat16 and np.shares_memory(view, bits)
    np.testing.assert_array_equal(to_float32(bits, "bfloat16"), view.astype(np.float32))
    np.testing.assert_array_equal(to_float32(bits, "bfloat16")[:3], values[:3])  # exactly representable
    tensor = torch_view(bits, "bfloat16")
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor.float(), torch.from_numpy(to_float32(bits, "bfloat16")))
    back = logical_view(tensor)  # a CPU tensor -> numpy in its logical dtype, still the same memory
    assert back.dtype == ml_dtypes.bfloat16 and np.shares_memory(back.view(np.uint16), bits)
    tensor[0] = 7.0
    assert to_float32(bits, "bfloat16")[0] == 7.0
    plain = np.ones(3, dtype=np.float32)
    assert logical_view(plain, "float32") is plain and torch_view(plain, "float32").dtype == torch.float32


# ---- block planning ---------------------------------------------------------------------------------------


def test_plan_blocks_fills_blocks_exactly_and_cuts_before_an_overflow():
    plan = plan_blocks({"encoder": np.array([4, 4, 4, 4, 1])}, {"encoder": 8}, {"encoder": 4})
    assert plan.block_starts.tolist() == [0, 2, 4, 5]  # two examples fill a block exactly
    assert plan.capacity == {"encoder": 8}
    assert plan.offsets["encoder"].tolist() == [[0, 4], [4, 8], [8, 12], [12, 16], [16, 17]]


def test_plan_blocks_one_example_per_block_and_a_rounded_capacity():
    plan = plan_blocks({"encoder": np.array([5, 6, 7])}, {"encoder": 7}, {"encoder": 4})
    assert plan.block_starts.tolist() == [0, 1, 2, 3] and plan.num_blocks == 3
    assert plan.capacity == {"encoder": 8}  # rounded up to whole inner chunks
    assert plan.offsets["encoder"][:, 0].tolist() == [0, 8, 16]  # each block starts its own shard


def test_plan_blocks_cuts_where_any_side_is_full():
    tokens = np.array([3, 3, 3, 3])
    plan = plan_blocks({"encoder": tokens, "decoder": np.ones(4, dtype=np.int64)},
                       {"encoder": 100, "decoder": 3}, {"encoder": 4, "decoder": 1})
    assert plan.block_starts.tolist() == [0, 3, 4]  # the one-row side holds three examples a block
    assert plan.offsets["decoder"].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]


def test_plan_blocks_refuses_an_example_longer_than_a_block():
    with pytest.raises(ValueError, match="needs 9 rows on encoder; the block limit is 8"):
        plan_blocks({"encoder": np.array([3, 9])}, {"encoder": 8}, {"encoder": 4})


def test_block_layout_gives_one_row_sides_the_per_token_sides_example_count():
    limits, chunks = block_layout({"encoder": 13, "decoder": 13}, 512, "bfloat16",
                                  per_token={"encoder": True, "decoder": False}, max_length=256, block_tokens=1000)
    assert limits == {"encoder": 1024, "decoder": 1024}  # per-token side rounded to whole chunks
    assert limits["encoder"] % chunks["encoder"] == 0 and chunks["encoder"] & (chunks["encoder"] - 1) == 0
    auto, _ = block_layout({"encoder": 13}, 512, "bfloat16", per_token={"encoder": True}, max_length=256,
                           block_tokens=None)
    assert auto["encoder"] * 13 * 512 * 2 == pytest.approx(128 * 2**20, rel=0.01)  # about 128 MiB a shard


# ---- identity ---------------------------------------------------------------------------------------------


def test_identity_compares_the_splits_both_hold_and_names_the_difference():
    base = synthetic_meta().identity
    a = dataclasses.replace(base, data={"train": SplitData("local:/g/RTE/train.tsv", "aa", 3),
                                        "validation": SplitData("local:/g/RTE/dev.tsv", "bb", 2)})
    assert a.mismatch(a) is None
    assert a.only(["train"]).mismatch(a) is None and a.mismatch(a.only(["train"])) is None  # stores grow by splits
    assert dataclasses.replace(a, data=dict(reversed(a.data.items()))).fingerprint == a.fingerprint
    relabeled = dataclasses.replace(a, data={**a.data, "validation": SplitData("local:/g/RTE/dev.tsv", "cc", 2)})
    assert relabeled.fingerprint != a.fingerprint
    assert "validation data differ from the examples the store was built from" in relabeled.mismatch(a)
    moved = dataclasses.replace(a, data={**a.data, "train": SplitData("hub:nyu-mll/glue", "aa", 3)})
    assert "train data from hub:nyu-mll/glue here, from local:/g/RTE/train.tsv in the store" == moved.mismatch(a)
    shorter = dataclasses.replace(a, settings=dataclasses.replace(a.settings, max_length=4))
    assert shorter.mismatch(a) == "max_length 4 here, 10 in the store"
    assert dataclasses.replace(a, model="sha256:other").mismatch(a).startswith("model sha256:other here")


def test_edited_metadata_is_caught_by_verify_and_training(synthetic_store, tmp_path):
    made = synthetic_store()
    group = zarr.open_group(made.path, mode="r+")
    attrs = group.attrs[ATTRS_KEY]
    attrs["identity"]["settings"]["max_length"] = 99
    group.attrs[ATTRS_KEY] = attrs
    assert not CacheStore(made.path).meta.consistent
    assert any("does not match the recorded identity" in p for p in verify_store(made.path))
    result = CliRunner().invoke(main, ["train", "--cache", made.path, "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert "does not match its fingerprint" in one_line_error(result)


# ---- checksums ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_shard_is_named_in_one_line(synthetic_store, how):
    made = synthetic_store(codec="blosc-zstd")
    damage_shard(Path(made.path, "train", "encoder", "hidden", "c", "1", "0", "0"), how)
    problems = verify_store(made.path)
    assert len(problems) == 1 and problems[0].startswith("train/encoder block 1: hidden "), problems
    result = CliRunner().invoke(main, ["verify", made.path])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert result.output.startswith("FAIL train/encoder block 1: ")
    split = CacheStore(made.path).split("train")
    with pytest.raises(StoreCorruptError, match=r"train/encoder block 1: .*rerun the same `pipeline extract`") as caught:
        split.read_block(1, "encoder")
    assert "\n" not in str(caught.value)
    split.read_block(0, "encoder")  # the other blocks read as before
    assert list(split.damaged_blocks(range(split.num_blocks))) == [1]


def test_damaged_token_ids_are_named_too(synthetic_store):
    made = synthetic_store()
    damage_shard(Path(made.path, "validation", "encoder", "token_ids", "c", "0"), "flip")
    assert [p.split(":")[0] for p in verify_store(made.path)] == ["validation/encoder block 0"]
    assert "token_ids" in verify_store(made.path)[0]


@pytest.mark.parametrize("how", DAMAGE)
def test_recheck_clears_exactly_the_damaged_blocks_and_rewriting_them_restores_the_store(synthetic_store, tmp_path, how):
    made = synthetic_store(codec="blosc-zstd")
    clean = tmp_path / "clean.zarr"
    shutil.copytree(made.path, clean)
    damage_shard(Path(made.path, "train", "encoder", "hidden", "c", "2", "0", "0"), how)
    writer = made.writer()
    blocks = made.splits["train"].plan.num_blocks
    damaged = writer.recheck("train", range(blocks))
    assert list(damaged) == [2] and damaged[2].startswith("train/encoder block 2: ")
    assert writer.done_blocks("train").tolist() == [j != 2 for j in range(blocks)]
    assert not CacheStore(made.path).meta.splits["train"].complete
    writer.write_block("train", 2, *made.block_buffers("train", 2))
    assert writer.mark_complete("train")
    assert verify_store(made.path) == []
    assert tree_bytes(made.path) == tree_bytes(clean)  # byte for byte the undamaged store


def test_rewriting_a_block_removes_what_a_killed_write_of_it_left(synthetic_store, tmp_path):
    """A --part killed mid-write of block 2 leaves zarr's <chunk>.<uuid>.partial files; its rerun removes them."""
    made = synthetic_store()
    clean = tree_bytes(made.path)
    uuid = "0123456789abcdef0123456789abcdef"
    split = Path(made.path, "train")
    orphans = [split / "encoder" / "hidden" / "c" / "2" / "0" / f"0.{uuid}.partial",
               split / "checksums" / "c" / "2" / f"0.{uuid}.partial",
               split / "blocks_done" / "c" / f"2.{uuid}.partial"]
    others = [split / "blocks_done" / "c" / f"1.{uuid}.partial",  # block 1's: another part's, left alone
              split / "blocks_done" / "c" / "2.notes.partial"]  # not zarr's pattern
    for path in orphans + others:
        assert path.parent.is_dir(), path
        path.write_bytes(b"\x01")
    made.writer().write_block("train", 2, *made.block_buffers("train", 2))
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in others)
    for path in others:
        path.unlink()
    assert tree_bytes(made.path) == clean


def test_training_refuses_a_damaged_store_before_it_starts(synthetic_store, tmp_path):
    made = synthetic_store()
    args = ["train", "--cache", made.path, "--epochs", "1", "--rnn-dim", "8", "--seeds", "0", "--batch-size", "4",
            "--device", "cpu", "--quiet"]
    ok = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output  # a synthetic store trains like a real one
    damage_shard(Path(made.path, "validation", "decoder", "hidden", "c", "1", "0", "0"), "flip")
    bad = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "bad")])
    assert "validation/decoder block 1" in one_line_error(bad)
    assert not (tmp_path / "bad").exists()


# ---- the per-example arrays: labels, ids, block boundaries, offsets, lengths --------------------------------


TRAIN_ARGS = ["--epochs", "1", "--rnn-dim", "8", "--seeds", "0", "--batch-size", "4", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("array", ["labels", "ids", "block_starts", "encoder/offsets", "decoder/lengths"])
def test_a_lost_chunk_of_a_per_example_array_is_named_and_a_rerun_writes_it_again(synthetic_store, array):
    """A lost chunk reads back as zeros: without a check, training would take zeros for labels or offsets."""
    made = synthetic_store()
    clean = tree_bytes(made.path)
    chunks = [f for f in Path(made.path, "train", *array.split("/"), "c").rglob("*") if f.is_file()]
    assert chunks
    for chunk in chunks:
        chunk.unlink()
    problems = verify_store(made.path)
    assert len(problems) == 1 and f"train/{array} does not match its checksum" in problems[0], problems
    assert "rerun the same `pipeline extract`" in problems[0]
    with pytest.raises(StoreCorruptError, match=f"train/{array} does not match its checksum"):
        CacheStore(made.path).split("train")
    made.writer()  # what a rerun of the extraction does first: the split's arrays, checked against its data
    assert verify_store(made.path) == []
    assert tree_bytes(made.path) == clean


def test_verify_goes_on_to_the_blocks_after_a_damaged_per_example_array(synthetic_store):
    made = synthetic_store()
    for chunk in Path(made.path, "train", "ids", "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    damage_shard(Path(made.path, "train", "encoder", "hidden", "c", "1", "0", "0"), "flip")
    problems = verify_store(made.path)
    assert [p.split(" ")[0] for p in problems] == ["train/ids", "train/encoder"], problems
    assert problems[1].startswith("train/encoder block 1: hidden checksum mismatch")
    assert all(p.endswith("rerun the same `pipeline extract` command to re-extract it") for p in problems)


def test_training_refuses_altered_labels_in_one_line(synthetic_store, tmp_path):
    made = synthetic_store()
    labels = zarr.open_array(Path(made.path, "train", "labels"), mode="r+")
    labels[0] = labels[0] + 1
    bad = CliRunner().invoke(main, ["train", "--cache", made.path, *TRAIN_ARGS, "--out", str(tmp_path / "bad")])
    assert "train/labels does not match its checksum" in one_line_error(bad)
    assert not (tmp_path / "bad").exists()


def test_a_missing_array_is_one_line_that_says_to_rebuild_the_store(synthetic_store, tmp_path):
    made = synthetic_store()
    Path(made.path, "validation", "encoder", "hidden", "zarr.json").unlink()
    problems = verify_store(made.path)
    assert len(problems) == 1 and problems[0].startswith("split 'validation' lacks part of its layout"), problems
    assert problems[0].endswith("--overwrite to rebuild the store")
    result = CliRunner().invoke(main, ["verify", made.path])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["train", "--cache", made.path, *TRAIN_ARGS, "--out", str(tmp_path / "bad")])
    assert "split 'validation' lacks part of its layout" in one_line_error(bad)


def test_damaged_label_rows_are_caught_and_written_again(synthetic_store):
    made = synthetic_store()
    assert made.label_rows is not None
    clean = tree_bytes(made.path)
    for chunk in Path(made.path, "label_rows", "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    assert any("label_rows does not match its checksum" in p for p in verify_store(made.path))
    with pytest.raises(StoreCorruptError, match="label_rows does not match its checksum"):
        CacheStore(made.path).label_rows()
    made.writer().ensure_array("label_rows", made.label_rows)
    assert verify_store(made.path) == [] and tree_bytes(made.path) == clean


def test_a_store_written_before_the_per_example_checksums_reads_and_gains_them_on_a_rerun(synthetic_store):
    made = synthetic_store()
    group = zarr.open_group(Path(made.path, "train"), mode="r+")
    sums = dict(group.attrs[EXAMPLE_SUMS])
    del group.attrs[EXAMPLE_SUMS]
    split = CacheStore(made.path).split("train")
    assert np.array_equal(split.labels, made.splits["train"].labels)
    assert verify_store(made.path) == []
    made.writer()
    assert zarr.open_group(Path(made.path, "train"), mode="r").attrs[EXAMPLE_SUMS] == sums


# ---- refusals: format version, foreign paths, a busy store -------------------------------------------------


def test_a_format_1_store_is_refused_naming_the_version_and_the_fix(synthetic_store):
    made = synthetic_store()
    group = zarr.open_group(made.path, mode="r+")
    group.attrs[ATTRS_KEY] = {"format_version": 1, "fingerprint": "0123", "content": {}, "splits": {}}
    with pytest.raises(StoreFormatError, match=r"format version 1; this software reads version 2.*--overwrite"):
        CacheStore(made.path)
    assert "format version 1" in one_line_error(CliRunner().invoke(main, ["info", made.path]))
    with pytest.raises(StoreMismatchError, match="format version 1"):  # so `dvc repro` replaces it
        StoreWriter(made.path, made.meta)
    StoreWriter(made.path, made.meta, overwrite=True)  # it is a READ store: --overwrite may replace it
    assert CacheStore(made.path).meta.identity.format_version == FORMAT_VERSION == 2


def foreign_paths(tmp_path: Path, store: str) -> dict[str, Path]:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    afile = tmp_path / "file.zarr"
    afile.write_text("not a store")
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", attributes={"someone": "else"})
    link = tmp_path / "link.zarr"
    link.symlink_to(store, target_is_directory=True)
    return {"a folder that is not a Zarr store": plain, "a file": afile, "a Zarr store that is not a READ store": other,
            "a symbolic link": link}


def test_overwrite_deletes_only_a_read_store(synthetic_store, tmp_path):
    made = synthetic_store()
    before = tree_bytes(tmp_path)
    for kind, path in foreign_paths(tmp_path, made.path).items():
        contents = path.read_bytes() if path.is_file() else tree_bytes(path)
        with pytest.raises(NotAStoreError, match=f"refusing to delete {path} for --overwrite: it is {kind}"):
            StoreWriter(path, made.meta, overwrite=True)
        with pytest.raises(NotAStoreError, match="not a READ store"):
            StoreWriter(path, made.meta)
        assert contents == (path.read_bytes() if path.is_file() else tree_bytes(path)), kind
    assert Path(tmp_path / "link.zarr").is_symlink() and tree_bytes(made.path) == {
        k[len("s.zarr/"):]: v for k, v in before.items() if k.startswith("s.zarr/")}
    StoreWriter(made.path, made.meta, overwrite=True)  # a READ store is replaced
    assert CacheStore(made.path).splits == []
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"  # nothing beside it was touched
    StoreWriter(tmp_path / "empty", made.meta)  # an empty folder may be filled
    (tmp_path / "empty2").mkdir()
    StoreWriter(tmp_path / "empty2", made.meta, overwrite=True)
    assert CacheStore(tmp_path / "empty2").splits == []


@pytest.fixture
def tiny_glue(tmp_path: Path) -> Path:
    """A two-example RTE dev.tsv: enough for extraction's refusals, which come before any model loads."""
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"
                                 "0\tA cat sat.\tAn animal sat.\tentailment\n1\tIt rains.\tIt is dry.\tnot_entailment\n")
    return tmp_path / "glue"


def extract_cli(tmp_path: Path, glue: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["extract", "--model", str(tmp_path / "no-model"), "--task", "rte", "--glue-dir",
                                     str(glue), "--splits", "validation", "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("overwrite", [False, True])
def test_extract_refuses_a_path_that_is_not_a_store_in_one_line(tmp_path, tiny_glue, overwrite):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    result = extract_cli(tmp_path, tiny_glue, plain, *(["--overwrite"] if overwrite else []))
    assert "a folder that is not a Zarr store, not a READ store" in one_line_error(result)
    assert (plain / "notes.txt").read_text() == "mine" and list(plain.iterdir()) == [plain / "notes.txt"]
    assert not Path(f"{plain}.lock").exists()  # refused before anything was created beside it
    other = tmp_path / "plain.zarr"
    zarr.open_group(str(other), mode="w", attributes={"someone": "else"})
    line = one_line_error(extract_cli(tmp_path, tiny_glue, other, *(["--overwrite"] if overwrite else [])))
    assert line.count("not a READ store") == 1, line  # said once, with what marks one and the fix
    assert "a Zarr store that is not a READ store (no 'read_pipeline' attributes)" in line and "--out" in line


@contextlib.contextmanager
def lock_held_elsewhere(lock: str, *, shared: bool) -> Iterator[None]:
    """Another process holding ``lock`` as an extraction does: shared as a --part process, else as a whole one."""
    mode = "LOCK_SH" if shared else "LOCK_EX"
    script = (f"import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              f"fcntl.flock(fd, fcntl.{mode}); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(("held_by", "part", "expected"), [
    ("whole", None, "another extraction is filling"),
    ("part", None, "--part processes are filling"),  # a whole one would rewrite the parts' blocks under them
    ("whole", "1/2", "a whole extraction is filling"),
])
def test_an_extraction_refuses_while_a_conflicting_one_holds_the_store(tmp_path, tiny_glue, monkeypatch, held_by,
                                                                       part, expected):
    out = tmp_path / "s.zarr"
    monkeypatch.setattr("pipeline.store.writer.BUSY_WAIT_S", 0.2)
    with lock_held_elsewhere(f"{out.resolve()}.lock", shared=held_by == "part"):
        result = extract_cli(tmp_path, tiny_glue, out, *(["--part", part] if part else []))
    assert expected in one_line_error(result) and "--part" in result.output
    assert not out.exists()


def test_an_extraction_refused_before_making_the_store_leaves_no_lock_file(tmp_path, tiny_glue):
    out = tmp_path / "s.zarr"
    result = extract_cli(tmp_path, tiny_glue, out)  # no model there: refused inside the hold
    assert "no-model" in one_line_error(result)
    assert not out.exists() and not Path(f"{out}.lock").exists() and not Path(f"{out}.attrs.lock").exists()


def test_a_lock_taken_on_a_removed_lock_file_is_retaken_on_the_new_one(tmp_path):
    """A refused extraction removes the lock file it made; one that waited on it must not hold a lock on a file
    nobody else can see."""
    from pipeline.store.writer import _held_lock

    lock = tmp_path / "s.zarr.lock"
    first = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(first, fcntl.LOCK_EX)
    taken: list[int | None] = []
    waiter = threading.Thread(target=lambda: taken.append(_held_lock(lock, exclusive=True, wait_s=5)))
    waiter.start()
    time.sleep(0.3)  # the waiter has opened the first file and polls its lock
    lock.unlink()
    os.close(first)
    waiter.join()
    assert taken[0] is not None and os.fstat(taken[0]).st_ino == lock.stat().st_ino
    os.close(taken[0])


def test_a_store_that_parts_are_filling_reads_as_being_extracted(synthetic_store):
    store = CacheStore(synthetic_store().path)
    assert not store.being_extracted()
    with lock_held_elsewhere(f"{Path(store.path).resolve()}.lock", shared=True):
        assert store.being_extracted()
        assert verify_store(store.path)[0].startswith("an extraction is writing it now (it holds ")  # not "damaged"
    assert not store.being_extracted() and verify_store(store.path) == []


def test_a_whole_extraction_removes_writes_a_killed_process_left(synthetic_store):
    """kill -9 in the middle of zarr's write leaves <file>.<uuid>.partial; the next whole extraction deletes it."""
    from pipeline.store.writer import extraction_hold

    made = synthetic_store()
    flags = Path(made.path) / "train" / "blocks_done" / "c"
    orphan = flags / "1.0123456789abcdef0123456789abcdef.partial"
    orphan.write_bytes(b"\x01")
    mine = flags / "notes.partial"  # not zarr's pattern: not ours to delete
    mine.write_bytes(b"")
    before = tree_bytes(made.path)
    with extraction_hold(made.path, whole=True):
        assert not orphan.exists() and mine.exists()
    assert tree_bytes(made.path) == {k: v for k, v in before.items() if not k.endswith("cdef.partial")}


def test_a_store_being_read_is_not_replaced(synthetic_store, tmp_path, monkeypatch):
    """A training run holds the store for reading; replacing it (--overwrite, or other settings under dvc repro)
    refuses meanwhile. Extractions that only add to it, and other runs, go on side by side."""
    from pipeline.common.config import TrainConfig
    from pipeline.common.errors import StoreBusyError
    from pipeline.store import extraction_hold, reading_hold, remove_store
    from pipeline.training import trainer

    path = synthetic_store().path
    with reading_hold(path), reading_hold(path):  # two runs read one store together
        with pytest.raises(StoreBusyError, match=r"a training run is reading .*s\.zarr now .*readers\.lock"):
            remove_store(path)
        CacheStore(path).require_complete(["train"])
        with extraction_hold(path, whole=True):  # e.g. adding a split: nothing read is touched
            pass
    remove_store(path)  # released by both: replaced
    assert not Path(path).exists() and not Path(path + ".readers.lock").exists()

    absent = str(tmp_path / "typo.zarr")
    with reading_hold(absent):  # no store, no lock (opening it fails with its own message)
        pass
    assert not Path(absent + ".readers.lock").exists()

    # `train` holds it from opening the store to its last output.
    path = synthetic_store("t.zarr").path
    tried = []

    def run(self):
        with pytest.raises(StoreBusyError):
            remove_store(path)
        tried.append(self.store.path)
        return {}

    monkeypatch.setattr(trainer.Trainer, "run", run)
    trainer.train(TrainConfig(cache=path, out=str(tmp_path / "run"), epochs=1), progress=False)
    assert tried == [path]


def test_a_missing_store_is_a_pipeline_error_a_library_user_can_catch(tmp_path):
    from pipeline.common.errors import PipelineError

    (tmp_path / "empty.zarr").mkdir()
    for missing in (tmp_path / "absent.zarr", tmp_path / "empty.zarr"):
        with pytest.raises(PipelineError, match=r"no store at .*; run `pipeline extract` first") as caught:
            CacheStore(str(missing))
        assert isinstance(caught.value, FileNotFoundError)
