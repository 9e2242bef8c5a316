"""Typed errors: each says what was expected, what was found, and what to run.

The CLI and the DVC stages turn any ``PipelineError``, and any ``OSError`` (disk full, permission
denied), into a one-line message from ``error_message`` and exit code 2; no traceback. Any other
exception is a bug and keeps its traceback.
Each subclasses the built-in error it resembles, so library users can catch either.
"""

from __future__ import annotations

import errno


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
    """A model that cannot be loaded: no such folder, not on the Hub nor in its cache, Hub unreachable, broken files."""


class UnsupportedModelError(PipelineError, ValueError):
    """An architecture outside the three supported families, or a head we cannot reproduce."""


class LabelWordCollisionError(PipelineError, ValueError):
    """Two label words whose first sub-words coincide, so the LM head cannot tell them apart."""


class ConfigError(PipelineError, ValueError):
    """Settings that clash or are out of range (raised from a config's __post_init__)."""


class StoreMismatchError(PipelineError, ValueError):
    """An existing store made with other settings than the ones asked for now. ``what``: the difference alone,
    without the advice to the user, for a caller that acts on it itself (the DVC stage replaces the store)."""

    def __init__(self, message: str, what: str | None = None) -> None:
        super().__init__(message)
        self.what = what or message


class StoreIncompleteError(PipelineError, ValueError):
    """A store whose extraction has not finished (some blocks missing)."""


class StoreCorruptError(PipelineError, ValueError):
    """A store that fails verification: a damaged shard (checksum), non-finite values, inconsistent metadata."""


class StoreFormatError(PipelineError, ValueError):
    """A store written in a format version this software does not read."""


class StoreNotFoundError(PipelineError, FileNotFoundError):
    """No store at the path given (nothing there, or an empty folder): extract it first."""


class NotAStoreError(PipelineError, FileExistsError):
    """A path that holds something other than a READ store: the pipeline neither writes into nor deletes it."""


class StoreBusyError(PipelineError, RuntimeError):
    """Another extraction (not a --part of the same run) is filling the same store right now."""


class RunBusyError(PipelineError, RuntimeError):
    """Another training run is writing the same run folder right now."""


class TrainingError(PipelineError, RuntimeError):
    """Training met something it cannot go on from (non-finite loss or values, unusable label set)."""


class RunFormatError(PipelineError, ValueError):
    """A run folder's metrics.json not as `pipeline train` writes it (cut short, or edited by hand), so no report."""


# ---- the one translation both front doors use (the `pipeline` CLI and the DVC stages) ----------------

# errno -> (what happened, how to fix it); {path} is the file the system named, else the output.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device writing {path}", "free space or choose another --out"),
    errno.EDQUOT: ("disk quota exceeded writing {path}", "free space or choose another --out"),
    errno.EACCES: ("permission denied on {path}", "choose another --out or fix its permissions"),
    errno.EPERM: ("operation not permitted on {path}", "choose another --out or fix its permissions"),
    errno.EROFS: ("read-only file system at {path}", "choose another --out on a writable disk"),
    errno.ENOTDIR: ("{path} is a file where a folder was expected", "remove it or choose another --out"),
    errno.EISDIR: ("{path} is a folder where a file was expected", "remove it or choose another path"),
    errno.EEXIST: ("{path} already exists", "remove it or choose another --out"),
    errno.ENOTEMPTY: ("the folder {path} is not empty", "remove what it holds or choose another --out"),
    errno.ENOENT: ("{path} does not exist", "check the path"),
    errno.ENAMETOOLONG: ("the name {path} is too long for the file system", "choose a shorter path"),
    errno.ELOOP: ("{path} is a loop of symbolic links", "fix the link or choose another path"),
    errno.EBUSY: ("{path} is in use", "let what holds it finish, or choose another path"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n`) and rerun"),
    errno.ENFILE: ("too many open files on this system", "close other programs and rerun"),
    errno.EFBIG: ("{path} reached the file-size limit", "raise it (`ulimit -f`) or choose another --out"),
}
# Errors after which the work already written is kept, so the same command carries on from there.
_RESUMABLE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

# What a stopped command leaves, so that Ctrl-C's message is true of it. An extraction keeps its finished
# blocks (a rerun resumes); training writes its outputs only at the end, each file whole and metrics.json last
# (removed first), and saves its state between steps (a rerun goes on from there); predict and the report
# write their outputs only at the end, so nothing of a stopped run is on disk (a rerun starts it again); a
# sweep keeps the grid points that had finished, each a whole training run (a rerun keeps them), and the
# checkpoints of those it stopped.
INTERRUPTED = {
    "resumes": "Interrupted; rerun {rerun} to resume.",
    "checkpoints": ("Interrupted; the run's outputs are written when it ends (an earlier run's stay until then), "
                    "metrics.json last: a folder without it is unfinished, and predict and the report refuse it; "
                    "rerun {rerun} to go on from its last checkpoint (saved between steps; with none yet, "
                    "the run starts again)."),
    "restarts": ("Interrupted; nothing of this run was written and earlier outputs are untouched; "
                 "rerun {rerun} to start it again."),
    # Under `dvc repro`, which removes a stage's outputs (but not the run's checkpoint) before it runs the stage:
    "stage checkpoints": ("Interrupted; DVC removed this stage's outputs when it started it, so they are missing "
                          "until a rerun of {rerun} goes on from the run's last checkpoint (saved between steps; with "
                          "none yet, the run starts again) and writes them."),
    "stage restarts": ("Interrupted; DVC removed this stage's outputs when it started it; rerun {rerun} to write "
                       "them again."),
    "sweep": ("Interrupted; the grid points that had finished are in their run folders, the others and sweep.json "
              "were not written; rerun {rerun} to go on with the sweep (finished points are kept, stopped ones go on "
              "from their checkpoints)."),
}


def one_line(text: str) -> str:
    """Collapse whitespace and newlines, so a message is exactly one line on stderr."""
    return " ".join(text.split())


def plural(count: int, noun: str) -> str:
    """``noun`` as ``count`` of it reads in a message: 1 seed, 3 seeds."""
    return noun if count == 1 else f"{noun}s"


def mean_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    """A mean over seeds as it is printed: "62.12 ± 2.03", or the mean alone when there is no spread to give.

    One seed has no sample std (metrics.json holds null): "± 0.00" would read as a perfectly stable score.
    """
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def error_message(exc: PipelineError | OSError, *, rerun: str, out: str | None = None,
                  stopped: str = "resumes") -> str:
    """The one-line message for an expected failure: a typed error's own text, or an OS error explained.

    ``rerun`` names what to run again (the same command, or ``dvc repro``), and ``stopped`` (a key of
    ``INTERRUPTED``) whether that resumes; ``out`` is the path to name when the system did not say which
    file it was writing (a failed ``write()`` names none). A typed error, or an OSError raised with a
    message of ours (no errno), is shown as it is.
    """
    if isinstance(exc, PipelineError) or exc.errno is None:
        return one_line(str(exc))
    path = str(exc.filename) if exc.filename is not None else (out or "the output")
    known = _OS_ERRORS.get(exc.errno)
    if known is None:
        text = f"{exc.strerror or type(exc).__name__}: {path}"
    else:
        what, fix = known
        text = f"{what.format(path=path)}; {fix}"
    if exc.errno in _RESUMABLE:
        text += f"; rerun {rerun} to resume" if stopped == "resumes" else f"; then rerun {rerun}"
    return one_line(text)


def interrupted_message(rerun: str, stopped: str = "resumes") -> str:
    """What to say on Ctrl-C, true of the command stopped (``stopped``: a key of ``INTERRUPTED``)."""
    return INTERRUPTED[stopped].format(rerun=rerun)


class AdapterNotFoundError(PipelineError, FileNotFoundError):
    """An adapter folder without its adapter_config.json or adapter_model.safetensors."""


class AdapterError(PipelineError, ValueError):
    """An adapter that cannot serve this request: a broken config, another backbone, task or extraction."""


class InputFormatError(PipelineError, ValueError):
    """Text to predict on that cannot be read: a malformed line, a missing column or field, no examples."""
