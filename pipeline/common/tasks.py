"""The nine GLUE tasks as data: fields, labels, splits and T5 text-to-text templates.

Everything task-specific that the loader, the backbones and the metrics need lives here, so that
adding or checking a task means reading one table rather than grepping for string literals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.common.errors import UnknownSplitError, UnknownTaskError

_SPLITS = ("train", "validation", "test")
_MNLI_SPLITS = (
    "train",
    "validation_matched",
    "validation_mismatched",
    "test_matched",
    "test_mismatched",
)


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task. Label indices follow the Hub (nyu-mll/glue) everywhere in the pipeline."""

    name: str  # Hub config name: "rte", "sst2", "mnli", ...
    glue_dir_name: str  # folder in the classic glue_data/ layout: "RTE", "SST-2", ...
    text_fields: tuple[str, ...]  # Hub column names, in Hub order
    t5_prefix: str  # task prefix of the T5 text-to-text input
    t5_fields: tuple[str, ...]  # fields in T5 template order (mnli puts hypothesis first)
    label_names: tuple[str, ...]  # class names by label index; () for regression
    label_words: tuple[str, ...]  # T5 target words by label index; () for regression
    kind: str  # "classification" or "regression"
    splits: tuple[str, ...] = _SPLITS
    validation_splits: tuple[str, ...] = ("validation",)

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"{self.name}: kind must be 'classification' or 'regression', got {self.kind!r}")
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"{self.name}: {len(self.label_words)} label words for {len(self.label_names)} label names"
            )
        if (self.kind == "regression") != (len(self.label_names) == 0):
            raise ValueError(f"{self.name}: label names must be given exactly for classification tasks")
        if set(self.t5_fields) != set(self.text_fields):
            raise ValueError(
                f"{self.name}: t5_fields {self.t5_fields} differ from text_fields {self.text_fields}"
            )
        if not set(self.validation_splits) <= set(self.splits):
            raise ValueError(f"{self.name}: validation splits {self.validation_splits} not in {self.splits}")

    def require_split(self, split: str) -> None:
        """Refuse a split name this task does not have, saying which it has (a typo is not missing data)."""
        if split not in self.splits:
            raise UnknownSplitError(f"task {self.name} has no split {split!r}; expected one of: {', '.join(self.splits)}")

    @property
    def num_labels(self) -> int:
        """Output width of a prediction head: the class count, or 1 for regression."""
        return 1 if self.kind == "regression" else len(self.label_names)

    def t5_input(self, example: Mapping[str, str]) -> str:
        """The T5 GLUE input, e.g. "rte sentence1: ... sentence2: ...", as T5 was trained on it."""
        parts = [self.t5_prefix]
        for field in self.t5_fields:
            if field not in example:
                raise KeyError(f"{self.name}: example lacks field {field!r} (has {sorted(example)})")
            parts.append(f"{field}: {example[field]}")
        return " ".join(parts)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cola",
            glue_dir_name="CoLA",
            text_fields=("sentence",),
            t5_prefix="cola",
            t5_fields=("sentence",),
            label_names=("unacceptable", "acceptable"),
            label_words=("unacceptable", "acceptable"),
            kind="classification",
        ),
        TaskSpec(
            name="sst2",
            glue_dir_name="SST-2",
            text_fields=("sentence",),
            t5_prefix="sst2",
            t5_fields=("sentence",),
            label_names=("negative", "positive"),
            label_words=("negative", "positive"),
            kind="classification",
        ),
        TaskSpec(
            name="mrpc",
            glue_dir_name="MRPC",
            text_fields=("sentence1", "sentence2"),
            t5_prefix="mrpc",
            t5_fields=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            label_words=("not_equivalent", "equivalent"),
            kind="classification",
        ),
        TaskSpec(
            name="qqp",
            glue_dir_name="QQP",
            text_fields=("question1", "question2"),
            t5_prefix="qqp",
            t5_fields=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            label_words=("not_duplicate", "duplicate"),
            kind="classification",
        ),
        TaskSpec(
            name="stsb",
            glue_dir_name="STS-B",
            text_fields=("sentence1", "sentence2"),
            t5_prefix="stsb",
            t5_fields=("sentence1", "sentence2"),
            label_names=(),
            label_words=(),
            kind="regression",  # similarity score in [0, 5]
        ),
        TaskSpec(
            name="mnli",
            glue_dir_name="MNLI",
            text_fields=("premise", "hypothesis"),
            t5_prefix="mnli",
            t5_fields=("hypothesis", "premise"),  # T5's order, the reverse of the Hub's
            label_names=("entailment", "neutral", "contradiction"),
            label_words=("entailment", "neutral", "contradiction"),
            kind="classification",
            splits=_MNLI_SPLITS,
            validation_splits=("validation_matched", "validation_mismatched"),
        ),
        TaskSpec(
            name="qnli",
            glue_dir_name="QNLI",
            text_fields=("question", "sentence"),
            t5_prefix="qnli",
            t5_fields=("question", "sentence"),
            label_names=("entailment", "not_entailment"),
            label_words=("entailment", "not_entailment"),
            kind="classification",
        ),
        TaskSpec(
            name="rte",
            glue_dir_name="RTE",
            text_fields=("sentence1", "sentence2"),
            t5_prefix="rte",
            t5_fields=("sentence1", "sentence2"),
            label_names=("entailment", "not_entailment"),
            label_words=("entailment", "not_entailment"),
            kind="classification",
        ),
        TaskSpec(
            name="wnli",
            glue_dir_name="WNLI",
            text_fields=("sentence1", "sentence2"),
            t5_prefix="wnli",
            t5_fields=("sentence1", "sentence2"),
            label_names=("not_entailment", "entailment"),  # the reverse of RTE/QNLI
            label_words=("not_entailment", "entailment"),
            kind="classification",
        ),
    )
}

# Other spellings users type: the glue_data folder names ("SST-2", "STS-B", "CoLA", ...).
_ALIASES: dict[str, str] = {spec.glue_dir_name.lower(): spec.name for spec in TASKS.values()}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case-insensitively, also under its glue_data folder name."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return TASKS[key]
    except KeyError:
        raise UnknownTaskError(
            f"unknown GLUE task {name!r}; expected one of: {', '.join(TASKS)}"
        ) from None
