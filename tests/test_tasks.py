"""The GLUE task table: names, labels, splits and the T5 text-to-text templates."""

from __future__ import annotations

import pytest

from pipeline.common.errors import UnknownTaskError
from pipeline.common.tasks import TASKS, TaskSpec, get_task

ALL = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


def test_all_nine_tasks():
    assert set(TASKS) == set(ALL)
    assert all(TASKS[name].name == name for name in ALL)


@pytest.mark.parametrize(
    "name, words",
    [
        ("cola", ("unacceptable", "acceptable")),
        ("sst2", ("negative", "positive")),
        ("mrpc", ("not_equivalent", "equivalent")),
        ("qqp", ("not_duplicate", "duplicate")),
        ("mnli", ("entailment", "neutral", "contradiction")),
        ("qnli", ("entailment", "not_entailment")),
        ("rte", ("entailment", "not_entailment")),
        ("wnli", ("not_entailment", "entailment")),
    ],
)
def test_label_names_and_words_in_hub_order(name, words):
    spec = TASKS[name]
    assert spec.label_names == words
    assert spec.label_words == words
    assert spec.kind == "classification"
    assert spec.num_labels == len(words)


def test_stsb_is_regression():
    spec = TASKS["stsb"]
    assert spec.kind == "regression"
    assert spec.label_names == () and spec.label_words == ()
    assert spec.num_labels == 1


def test_splits():
    for name in ALL:
        if name != "mnli":
            assert TASKS[name].splits == ("train", "validation", "test")
            assert TASKS[name].validation_splits == ("validation",)
    mnli = TASKS["mnli"]
    assert mnli.splits == (
        "train",
        "validation_matched",
        "validation_mismatched",
        "test_matched",
        "test_mismatched",
    )
    assert mnli.validation_splits == ("validation_matched", "validation_mismatched")


@pytest.mark.parametrize(
    "name, example, expected",
    [
        ("rte", {"sentence1": "A b.", "sentence2": "C d."}, "rte sentence1: A b. sentence2: C d."),
        ("sst2", {"sentence": "it 's fine . "}, "sst2 sentence: it 's fine . "),
        ("qnli", {"question": "Q?", "sentence": "S."}, "qnli question: Q? sentence: S."),
        ("mnli", {"premise": "P.", "hypothesis": "H."}, "mnli hypothesis: H. premise: P."),
        ("qqp", {"question1": "Q1?", "question2": "Q2?"}, "qqp question1: Q1? question2: Q2?"),
        ("stsb", {"sentence1": "A.", "sentence2": "B."}, "stsb sentence1: A. sentence2: B."),
        ("mrpc", {"sentence1": "A.", "sentence2": "B."}, "mrpc sentence1: A. sentence2: B."),
        ("cola", {"sentence": "Him left."}, "cola sentence: Him left."),
        ("wnli", {"sentence1": "A.", "sentence2": "B."}, "wnli sentence1: A. sentence2: B."),
    ],
)
def test_t5_input(name, example, expected):
    assert TASKS[name].t5_input(example) == expected


def test_t5_input_missing_field():
    with pytest.raises(KeyError, match="hypothesis"):
        TASKS["mnli"].t5_input({"premise": "P."})


@pytest.mark.parametrize(
    "alias, name",
    [("RTE", "rte"), ("sst-2", "sst2"), ("SST-2", "sst2"), ("STS-B", "stsb"), ("sts-b", "stsb"),
     ("CoLA", "cola"), (" mnli ", "mnli"), ("QQP", "qqp")],
)
def test_get_task_aliases(alias, name):
    assert get_task(alias) is TASKS[name]


def test_get_task_unknown_names_valid_ones():
    with pytest.raises(UnknownTaskError, match=r"unknown GLUE task 'squad'.*cola, sst2, mrpc"):
        get_task("squad")
    with pytest.raises(ValueError):  # UnknownTaskError is a ValueError too
        get_task("sst_2")


def test_taskspec_refuses_inconsistent_labels():
    with pytest.raises(ValueError, match="label words"):
        TaskSpec(
            name="x", glue_dir_name="X", text_fields=("a",), t5_prefix="x", t5_fields=("a",),
            label_names=("n", "p"), label_words=("n",), kind="classification",
        )
