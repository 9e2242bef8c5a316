"""Reading a block's rows straight from its shard file, without zarr's read path.

Stage two reads whole blocks, and each block is one shard file in a local store. zarr's synchronous read path
runs the Python part of every inner chunk on one event-loop thread shared by the process and copies each
decoded chunk into place there; on two cores it reads about 0.4-0.5 GiB/s whatever the number of reading
threads, and on a 16-core GPU host it read 0.6 GB/s (BENCHMARKS.md). A shard file is simple: the inner
chunks' encoded bytes, then an index of (offset, length) pairs and its crc32c. ``ShardFile`` reads the index
and decodes each inner chunk of the wanted rows with numcodecs straight into the caller's array, on the calling
thread, the GIL released while it reads and decompresses: as many threads, as many cores.

It takes only the layouts this store writes (a regular grid of shards of whole rows; the index at the end,
little-endian with a crc32c; the chunks in little-endian bytes, then blosc, zstd or nothing; a local folder, on a
system with ``os.pread``) and says None for anything else, which zarr then reads as before. What it decodes is
what zarr decodes (tests compare them bit for bit); a missing shard or inner chunk reads as the fill value, as in
zarr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EMPTY = 2**64 - 1  # an index entry of a chunk that was never written
Decode = Callable[[bytes, np.ndarray], None]


@dataclass(frozen=True)
class ShardFile:
    """How to decode the rows of any block of one local array whose blocks are its shards."""

    array: Any  # the zarr array: its chunk keys name the files
    folder: Path
    block_rows: int  # rows per shard
    chunk_rows: int  # rows per inner chunk
    row_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    decode: Decode  # an inner chunk's bytes -> into a C-contiguous array of its shape

    @property
    def chunks(self) -> int:
        return self.block_rows // self.chunk_rows

    @classmethod
    def of(cls, array: Any) -> ShardFile | None:
        """The reader for ``array``, or None when its layout or store is not one this module reads."""
        from zarr.codecs import (
            BloscCodec,
            BytesCodec,
            Crc32cCodec,
            ShardingCodec,
            ShardingCodecIndexLocation,
            ZstdCodec,
        )
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.storage import LocalStore

        store = array.store_path.store
        codecs = getattr(array.metadata, "codecs", ())  # zarr v2 metadata has none: left to zarr
        if (sys.byteorder != "little" or not hasattr(os, "pread") or not isinstance(store, LocalStore)
                or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec)
                or not isinstance(array.metadata.chunk_grid, RegularChunkGrid)):
            return None
        sharding = codecs[0]
        shape, shard = array.shape, array.metadata.chunk_grid.chunk_shape
        inner, index = sharding.chunk_shape, sharding.index_codecs
        def little_bytes(codec: Any) -> bool:
            return isinstance(codec, BytesCodec) and (codec.endian is None or codec.endian.value == "little")

        first, rest = sharding.codecs[0], sharding.codecs[1:]
        if (sharding.index_location != ShardingCodecIndexLocation.end or tuple(shard[1:]) != tuple(shape[1:])
                or tuple(inner[1:]) != tuple(shape[1:]) or shard[0] % inner[0]
                or len(index) != 2 or not little_bytes(index[0]) or not isinstance(index[1], Crc32cCodec)
                or not little_bytes(first) or len(rest) > 1
                or (rest and not isinstance(rest[0], (BloscCodec, ZstdCodec)))):
            return None
        return cls(array, Path(store.root) / array.store_path.path, int(shard[0]), int(inner[0]), tuple(shape[1:]),
                   np.dtype(array.dtype), array.fill_value, _decoder(rest[0] if rest else None))

    def read(self, block: int, start: int, end: int, out: np.ndarray) -> np.ndarray:
        """Rows [start, end) of the array, all inside ``block``, decoded into ``out`` (their shape and dtype,
        C-contiguous)."""
        base = block * self.block_rows
        if not (base <= start <= end <= base + self.block_rows) or out.shape != (end - start, *self.row_shape):
            raise ValueError(f"rows {start}:{end} are not inside block {block} of {self.block_rows} rows, or out "
                             f"has shape {out.shape}")
        path = self.folder / self.array.metadata.encode_chunk_key((block,) + (0,) * len(self.row_shape))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard never written (or deleted) reads as the fill value, as in zarr
            out[...] = self.fill_value
            return out
        try:
            index = self._index(fd)
            scratch: np.ndarray | None = None
            for c in range((start - base) // self.chunk_rows, -(-(end - base) // self.chunk_rows)):
                first = base + c * self.chunk_rows  # the chunk's rows: [first, first + chunk_rows)
                lo, hi = max(first, start), min(first + self.chunk_rows, end)
                offset, length = index[c]
                whole = lo == first and hi == first + self.chunk_rows
                if whole:
                    target = out[lo - start : hi - start]
                else:
                    scratch = np.empty((self.chunk_rows, *self.row_shape), self.dtype) if scratch is None else scratch
                    target = scratch
                if offset == EMPTY and length == EMPTY:
                    target[...] = self.fill_value
                else:
                    data = os.pread(fd, int(length), int(offset))
                    if len(data) != length:
                        raise ValueError(f"chunk {c} runs past the end of the shard")
                    self.decode(data, target)
                if not whole:
                    out[lo - start : hi - start] = scratch[lo - first : hi - first]
        finally:
            os.close(fd)
        return out

    def _index(self, fd: int) -> np.ndarray:
        """The shard's (offset, length) pairs, checked against their crc32c."""
        import google_crc32c

        size = os.fstat(fd).st_size
        nbytes = self.chunks * 16 + 4
        if size < nbytes:
            raise ValueError(f"the shard has {size} bytes, less than its index")
        raw = os.pread(fd, nbytes, size - nbytes)
        if google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise ValueError("the shard index does not match its crc32c")
        index = np.frombuffer(raw, dtype="<u8", count=self.chunks * 2).reshape(self.chunks, 2)
        written = index[:, 0] != EMPTY
        if (index[written, 0] + index[written, 1] > size - nbytes).any():
            raise ValueError("the shard index points past the chunks")
        return index


def _decoder(codec: Any) -> Decode:
    """An inner chunk's decoder for one of the codecs ``pipeline.store.format.compressor`` writes (or none)."""
    if codec is None:
        def raw(data: bytes, out: np.ndarray) -> None:
            if len(data) != out.nbytes:
                raise ValueError(f"an uncompressed chunk of {len(data)} bytes where {out.nbytes} were expected")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)

        return raw
    import numcodecs

    # Both formats carry what decoding needs in their own header (blosc: shuffle and type size).
    decoder = numcodecs.Blosc() if type(codec).__name__ == "BloscCodec" else numcodecs.Zstd()

    def decompress(data: bytes, out: np.ndarray) -> None:
        decoder.decode(data, out=out)

    return decompress
