"""Typed errors: each says what was expected, what was found, and what to run.

The CLI turns any ``PipelineError`` into a one-line message and exit code 2; no traceback.
Each subclasses the built-in error it resembles, so library users can catch either.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the CLI reports as a one-line message."""


class UnknownTaskError(PipelineError, ValueError):
    """A task name that is not one of the nine GLUE tasks."""


class UnknownSplitError(PipelineError, ValueError):
    """A split name that the task does not have."""


class DataNotFoundError(PipelineError, FileNotFoundError):
    """GLUE data missing from the local directory and not reachable on the Hub."""


class MalformedGlueFileError(PipelineError, ValueError):
    """A local GLUE TSV that does not have the columns or labels its task needs."""


class EmptySplitError(PipelineError, ValueError):
    """A split with no examples (after --limit), which would make an empty store."""


class ModelLoadError(PipelineError, OSError):
    """A model that cannot be loaded (not on disk and the Hub is unreachable, or broken files)."""


class UnsupportedModelError(PipelineError, ValueError):
    """An architecture outside the three supported families, or a head we cannot reproduce."""


class LabelWordCollisionError(PipelineError, ValueError):
    """Two label words whose first sub-words coincide, so the LM head cannot tell them apart."""


class ConfigError(PipelineError, ValueError):
    """Settings that clash or are out of range (raised from a config's __post_init__)."""


class StoreMismatchError(PipelineError, ValueError):
    """An existing store made with other settings than the ones asked for now."""


class StoreIncompleteError(PipelineError, ValueError):
    """A store whose extraction has not finished (some blocks missing)."""


class StoreCorruptError(PipelineError, ValueError):
    """A store that fails verification: missing blocks, non-finite values, inconsistent metadata."""


class StoreFormatError(PipelineError, ValueError):
    """A store written in a format version this software does not read."""


class TrainingError(PipelineError, RuntimeError):
    """Training met something it cannot go on from (non-finite loss or values, unusable label set)."""


class AdapterNotFoundError(PipelineError, FileNotFoundError):
    """An adapter folder without its adapter_config.json or adapter_model.safetensors."""


class AdapterError(PipelineError, ValueError):
    """An adapter that cannot serve this request: a broken config, another backbone, task or extraction."""


class InputFormatError(PipelineError, ValueError):
    """Text to predict on that cannot be read: a malformed line, a missing column or field, no examples."""
