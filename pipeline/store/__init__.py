"""The activation store: stage one's output and stage two's only input (Zarr v3, no backbone code).

``format`` owns the layout, block arithmetic, checksums and the bfloat16 helpers, ``meta`` the one
metadata record and the fingerprint, ``writer`` creates and fills a store (and alone deletes one),
``reader`` opens one read-only, ``verify`` checks and summarises one.
"""

from pipeline.store.format import (
    ATTRS_KEY,
    FORMAT_VERSION,
    SIDES,
    STORED_DTYPES,
    BlockPlan,
    block_layout,
    block_rows,
    checksum,
    compressor,
    examples_hash,
    fingerprint,
    logical_view,
    plan_blocks,
    stored_view,
    to_float32,
    torch_dtype,
    torch_view,
)
from pipeline.store.meta import (
    BackboneInfo,
    ExtractionSettings,
    SplitData,
    SplitInfo,
    StoreIdentity,
    StoreLayout,
    StoreMeta,
    TaskInfo,
)
from pipeline.store.reader import CachedSplit, CacheStore
from pipeline.store.verify import summarize_store, verify_store
from pipeline.store.writer import (
    StoreWriter,
    check_target,
    enclosing_store,
    extraction_hold,
    path_kind,
    reading_hold,
    remove_store,
)

__all__ = [
    "ATTRS_KEY", "FORMAT_VERSION", "SIDES", "STORED_DTYPES", "BackboneInfo", "BlockPlan", "CacheStore",
    "CachedSplit", "ExtractionSettings", "SplitData", "SplitInfo", "StoreIdentity", "StoreLayout", "StoreMeta",
    "StoreWriter", "TaskInfo", "block_layout", "block_rows", "check_target", "checksum", "compressor", "enclosing_store",
    "examples_hash", "extraction_hold", "fingerprint", "logical_view", "path_kind", "plan_blocks", "reading_hold", "remove_store",
    "summarize_store", "stored_view", "to_float32", "torch_dtype", "torch_view", "verify_store",
]
