"""Stage one: run a frozen backbone once over a GLUE task and fill the store.

The only package that imports ``transformers`` (``backbones``) or reads GLUE files (``glue``);
``stage`` drives both and writes through ``pipeline.store``.
"""

from pipeline.extraction.stage import (
    Extraction,
    extract,
    finished_store,
    length_batches,
)

__all__ = ["Extraction", "extract", "finished_store", "length_batches"]
