"""Blocks read straight from their shard files (``pipeline.store.shards``) are what zarr reads, bit for bit, for
every codec and layout the store writes; anything else is left to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.store import CacheStore
from pipeline.store.format import compressor
from pipeline.store.shards import ShardFile


def zarr_rows(array, start: int, end: int) -> np.ndarray:
    return np.asarray(array[start:end])


@pytest.mark.parametrize("codec", ["blosc-lz4", "blosc-zstd", "zstd", "none"])
@pytest.mark.parametrize("dtype, tokens", [("bfloat16", "all"), ("float32", "pooled")])
def test_every_block_reads_as_zarr_reads_it(synthetic_store, codec, dtype, tokens):
    made = synthetic_store(dtype=dtype, tokens=tokens, codec=codec, block_tokens=24 if tokens == "all" else 8)
    store = CacheStore(made.path)
    checked = 0
    for name in made.splits:
        split = store.split(name)
        assert split.num_blocks > 1
        for side in split.sides:
            arrays = ["hidden"] + (["token_ids"] if f"{side}/token_ids" in split.columns else [])
            for array in arrays:
                zarr_array = split.group[side][array]
                shard = ShardFile.of(zarr_array)
                assert shard is not None, (side, array)
                for block in range(split.num_blocks):
                    start, end = split.block_rows(block, side)
                    got = shard.read(block, start, end, np.empty((end - start, *shard.row_shape), shard.dtype))
                    np.testing.assert_array_equal(got, zarr_rows(zarr_array, start, end))
                    # rows from inside the block, across inner chunk boundaries, and up to the block's end
                    lo = start + (end - start) // 3
                    part = shard.read(block, lo, end, np.empty((end - lo, *shard.row_shape), shard.dtype))
                    np.testing.assert_array_equal(part, zarr_rows(zarr_array, lo, end))
                    checked += 1
    assert checked > 8


def small_array(tmp_path, name: str = "a.zarr", **options) -> zarr.Array:
    options = {"chunks": (4, 3), "shards": (8, 3), "dtype": "uint16", "fill_value": 0,
               "compressors": compressor("blosc-lz4"), **options}
    return zarr.create_array(tmp_path / name, shape=(24, 3), **options)


def test_a_missing_shard_and_a_chunk_never_written_read_as_the_fill_value(tmp_path):
    array = small_array(tmp_path)  # zarr's default: an inner chunk equal to the fill value is not written
    values = np.arange(1, 73, dtype=np.uint16).reshape(24, 3)
    values[4:8] = 0  # block 0's second inner chunk: left out of the shard, an empty index entry
    array[:16] = values[:16]  # block 2 never written: no file
    shard = ShardFile.of(array)
    for block in range(3):
        rows = slice(block * 8, block * 8 + 8)
        got = shard.read(block, rows.start, rows.stop, np.empty((8, 3), np.uint16))
        np.testing.assert_array_equal(got, np.asarray(array[rows]))
    np.testing.assert_array_equal(shard.read(2, 16, 24, np.ones((8, 3), np.uint16)), 0)


def test_a_damaged_shard_index_is_refused(tmp_path):
    array = small_array(tmp_path)
    array[:8] = np.arange(1, 25, dtype=np.uint16).reshape(8, 3)
    path = tmp_path / "a.zarr" / "c" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the index: its crc32c no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c"):
        ShardFile.of(array).read(0, 0, 8, np.empty((8, 3), np.uint16))
    path.write_bytes(bytes(data[:10]))  # shorter than its index
    with pytest.raises(ValueError, match="less than its index"):
        ShardFile.of(array).read(0, 0, 8, np.empty((8, 3), np.uint16))


def test_layouts_it_does_not_know_are_left_to_zarr(tmp_path):
    from zarr.codecs import BytesCodec, ShardingCodec

    assert ShardFile.of(zarr.create_array(tmp_path / "plain.zarr", shape=(8, 3), chunks=(4, 3), dtype="uint16")) is None
    index_first = ShardingCodec(chunk_shape=(4, 3), codecs=[BytesCodec()], index_location="start")
    assert ShardFile.of(zarr.create_array(tmp_path / "start.zarr", shape=(8, 3), chunks=(8, 3), dtype="uint16",
                                          serializer=index_first)) is None
    assert ShardFile.of(small_array(tmp_path, "split-rows.zarr", chunks=(4, 1), shards=(8, 3))) is None
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 3), chunks=(4, 3), shards=(8, 3), dtype="uint16")
    assert ShardFile.of(memory) is None
    assert ShardFile.of(zarr.create_array(tmp_path / "v2.zarr", shape=(8, 3), chunks=(4, 3), dtype="uint16",
                                          zarr_format=2)) is None
    assert ShardFile.of(small_array(tmp_path, "ours.zarr")) is not None
