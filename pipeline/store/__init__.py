"""The activation store: stage one's output and stage two's only input (Zarr v3, no backbone code).

``format`` owns the layout and the fingerprint, ``writer`` creates and fills a store, ``reader``
opens one read-only, ``verify`` checks and summarises one.
"""

from pipeline.store.format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    SIDES,
    STORED_DTYPES,
    TARGET_SHARD_BYTES,
    BlockPlan,
    chunk_rows_for,
    compressor,
    fingerprint,
    logical_view,
    plan_blocks,
    round_up,
    row_bytes,
    to_float32,
)
from pipeline.store.reader import CachedSplit, CacheStore
from pipeline.store.verify import summarize_store, verify_store
from pipeline.store.writer import StoreWriter

__all__ = [
    "ATTRS_KEY", "FORMAT_VERSION", "SIDES", "STORED_DTYPES", "TARGET_SHARD_BYTES", "BlockPlan", "CacheStore",
    "CachedSplit", "StoreWriter", "chunk_rows_for", "compressor", "fingerprint", "logical_view", "plan_blocks",
    "round_up", "row_bytes", "summarize_store", "to_float32", "verify_store",
]
