"""The GLUE loader against the real glue_data files, small synthetic files, and the offline Hub."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.errors import (
    DataNotFoundError,
    EmptySplitError,
    MalformedGlueFileError,
    UnknownSplitError,
)
from pipeline.common.tasks import TASKS
from pipeline.extraction.glue import GlueSplit, load_split, resolve_glue_dir

# Official GLUE sizes (PROVENANCE.md), for every file in ../shared/data/glue.
OFFICIAL_SIZES = [
    ("cola", "train", 8551),
    ("cola", "validation", 1043),
    ("sst2", "train", 67349),
    ("sst2", "validation", 872),
    ("mrpc", "train", 3668),
    ("mrpc", "validation", 408),
    ("stsb", "train", 5749),
    ("stsb", "validation", 1500),
    ("qnli", "validation", 5463),
    ("rte", "train", 2490),
    ("rte", "validation", 277),
    ("wnli", "train", 635),
    ("wnli", "validation", 71),
]


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


# --- the real files -----------------------------------------------------------------------------


@pytest.mark.parametrize("task, split, n", OFFICIAL_SIZES)
def test_official_row_counts(glue_dir, task, split, n):
    data = load_split(task, split, glue_dir)
    assert isinstance(data, GlueSplit)
    assert len(data) == n
    assert data.labels.shape == (n,) and data.ids.shape == (n,)
    np.testing.assert_array_equal(data.ids, np.arange(n))
    assert data.ids.dtype == np.int64
    spec = TASKS[task]
    assert all(set(t) == set(spec.text_fields) for t in data.texts)
    if spec.kind == "regression":
        assert data.labels.dtype == np.float32
        assert np.isfinite(data.labels).all()
        assert data.labels.min() >= 0.0 and data.labels.max() <= 5.0
    else:
        assert data.labels.dtype == np.int64
        assert set(np.unique(data.labels)) == set(range(spec.num_labels))  # labeled, both classes
    expected_file = Path(glue_dir, spec.glue_dir_name, "train.tsv" if split == "train" else "dev.tsv")
    assert data.source == f"local:{expected_file.resolve()}"


def test_cola_has_no_header(glue_dir):
    data = load_split("cola", "train", glue_dir)
    # The file's first line is a data row: it must not be swallowed as a header.
    assert data.texts[0] == {"sentence": "Our friends won't buy this analysis, let alone the next one we propose."}
    assert data.labels[0] == 1
    dev = load_split("cola", "validation", glue_dir)
    assert dev.texts[0]["sentence"] == "The sailors rode the breeze clear of the rocks."
    assert np.bincount(dev.labels).tolist() == [322, 721]  # unacceptable, acceptable


def test_sst2_keeps_text_verbatim(glue_dir):
    data = load_split("sst2", "validation", glue_dir)
    assert data.texts[0] == {"sentence": "it 's a charming and often affecting journey . "}
    assert data.labels[:2].tolist() == [1, 0]
    assert np.bincount(data.labels).tolist() == [428, 444]


def test_mrpc_first_column_read_despite_bom(glue_dir):
    header = (Path(glue_dir) / "MRPC" / "dev.tsv").read_bytes()[:10]
    assert header.startswith(b"\xef\xbb\xbfQuality")  # the BOM is really there
    data = load_split("mrpc", "validation", glue_dir)
    # With the BOM left on, "Quality" would not be found and the split would look unlabeled.
    assert (data.labels >= 0).all()
    assert np.bincount(data.labels).tolist() == [129, 279]
    assert data.texts[0] == {
        "sentence1": "He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
        "sentence2": '"The foodservice pie business does not fit our long-term growth strategy.',
    }
    assert data.labels[0] == 1
    assert load_split("mrpc", "train", glue_dir).labels[:2].tolist() == [1, 0]


def test_stsb_scores(glue_dir):
    data = load_split("stsb", "validation", glue_dir)
    assert data.texts[0] == {
        "sentence1": "A man with a hard hat is dancing.",
        "sentence2": "A man wearing a hard hat is dancing.",
    }
    assert data.labels[:2].tolist() == [5.0, 4.75]


def test_string_labels_map_to_hub_indices(glue_dir):
    rte = load_split("rte", "validation", glue_dir)
    assert rte.labels[:2].tolist() == [1, 0]  # not_entailment, entailment
    assert np.bincount(rte.labels).tolist() == [146, 131]
    qnli = load_split("qnli", "validation", glue_dir)
    assert qnli.texts[0]["question"] == "What came into force after the new constitution was herald?"
    assert qnli.labels[:2].tolist() == [0, 1]  # entailment, not_entailment


def test_wnli_digit_labels_keep_hub_order(glue_dir):
    dev = load_split("wnli", "validation", glue_dir)
    assert dev.texts[1] == {
        "sentence1": "Jane knocked on Susan's door but she did not answer.",
        "sentence2": "Susan did not answer.",
    }
    assert dev.labels[:2].tolist() == [0, 1]  # 0 not_entailment, 1 entailment, as in the file
    assert TASKS["wnli"].label_names[dev.labels[1]] == "entailment"
    assert np.bincount(dev.labels).tolist() == [40, 31]


def test_rte_keeps_literal_quotes(glue_dir):
    path = Path(glue_dir) / "RTE" / "dev.tsv"
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    with open(path, encoding="utf-8", newline="") as fh:
        default_quoting = list(csv.reader(fh, delimiter="\t"))[1:]
    data = load_split("rte", "validation", glue_dir)
    assert [[t["sentence1"], t["sentence2"]] for t in data.texts] == [r[1:3] for r in rows]
    # Row 23 is one that default CSV quoting silently rewrites.
    assert data.texts[23]["sentence2"] == '"The Osbournes" is the name of a reality show starring Ozzy Osbourne.'
    assert default_quoting[23][2] == "The Osbournes is the name of a reality show starring Ozzy Osbourne."
    assert sum('"' in t["sentence1"] + t["sentence2"] for t in data.texts) > 1


def test_limit_takes_the_first_rows(glue_dir):
    data = load_split("sst2", "train", glue_dir, limit=5)
    assert len(data) == 5
    assert data.texts[0]["sentence"] == "hide new secretions from the parental units "
    np.testing.assert_array_equal(data.ids, np.arange(5))
    assert len(load_split("wnli", "validation", glue_dir, limit=1000)) == 71


def test_limit_zero_is_empty(glue_dir):
    with pytest.raises(EmptySplitError, match=r"rte/validation has no examples \(limit=0\)"):
        load_split("rte", "validation", glue_dir, limit=0)


def test_task_spec_and_alias_accepted(glue_dir):
    assert load_split(TASKS["rte"], "validation", glue_dir, limit=2).task is TASKS["rte"]
    assert load_split("SST-2", "validation", glue_dir, limit=2).task.name == "sst2"


def test_glue_dir_from_environment(glue_dir, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    assert resolve_glue_dir(None) == Path(glue_dir)
    assert len(load_split("wnli", "validation")) == 71
    assert resolve_glue_dir("/elsewhere") == Path("/elsewhere")  # the argument wins
    monkeypatch.delenv("GLUE_DIR")
    assert resolve_glue_dir(None) is None


# --- errors -------------------------------------------------------------------------------------


def test_unknown_split_names_valid_ones(glue_dir):
    with pytest.raises(UnknownSplitError, match=r"rte has no split 'dev'; expected one of: train, validation, test"):
        load_split("rte", "dev", glue_dir)
    with pytest.raises(UnknownSplitError, match="validation_matched, validation_mismatched"):
        load_split("mnli", "validation", glue_dir)


def test_missing_local_file_names_path(glue_dir):
    # QNLI/train.tsv is not part of the shared data.
    expected = Path(glue_dir) / "QNLI" / "train.tsv"
    with pytest.raises(DataNotFoundError, match=rf"no file {expected}.*glue_data/ layout, <glue-dir>/QNLI/train.tsv"):
        load_split("qnli", "train", glue_dir)


def test_missing_glue_dir(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"MNLI/dev_mismatched.tsv"):
        load_split("mnli", "validation_mismatched", tmp_path / "nowhere")


def test_hub_offline_raises_data_not_found(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read these at import time: set the parsed values too, and an empty cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataNotFoundError) as info:
        load_split("rte", "validation", None)
    message = str(info.value)
    assert "--glue-dir DIR (or GLUE_DIR) pointing at a glue_data folder" in message
    assert "network access to the Hugging Face Hub" in message


def test_wrong_field_count_names_file_and_line(tmp_path):
    path = _write(
        tmp_path / "RTE" / "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n",
    )
    with pytest.raises(MalformedGlueFileError, match=rf"{path}, line 3: 3 tab-separated fields, expected 4"):
        load_split("rte", "validation", tmp_path)


def test_unknown_label_names_file_and_line(tmp_path):
    path = _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(MalformedGlueFileError, match=rf"{path}, line 2: label 'maybe'"):
        load_split("rte", "validation", tmp_path)
    _write(tmp_path / "WNLI" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t2\n")
    with pytest.raises(MalformedGlueFileError, match="class index below 2"):
        load_split("wnli", "validation", tmp_path)


def test_missing_column_names_header(tmp_path):
    _write(tmp_path / "QNLI" / "dev.tsv", "index\tquery\tsentence\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(MalformedGlueFileError, match=r"header lacks column\(s\) \['question'\]"):
        load_split("qnli", "validation", tmp_path)


# --- layouts not in the shared data (synthetic files in the classic format) ----------------------


def test_unlabeled_test_splits(tmp_path):
    _write(tmp_path / "CoLA" / "test.tsv", "index\tsentence\n0\tBill left.\n1\tLeft Bill.\n")
    _write(tmp_path / "STS-B" / "test.tsv", "index\tgenre\tsentence1\tsentence2\n0\tnews\tA.\tB.\n")
    _write(
        tmp_path / "MRPC" / "test.tsv",
        "\ufeffindex\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA \"q.\tB.\n",
    )
    cola = load_split("cola", "test", tmp_path)
    assert cola.texts == [{"sentence": "Bill left."}, {"sentence": "Left Bill."}]
    assert cola.labels.tolist() == [-1, -1] and cola.labels.dtype == np.int64
    stsb = load_split("stsb", "test", tmp_path)
    assert stsb.texts == [{"sentence1": "A.", "sentence2": "B."}]
    assert np.isnan(stsb.labels).all() and stsb.labels.dtype == np.float32
    mrpc = load_split("mrpc", "test", tmp_path)
    assert mrpc.texts == [{"sentence1": 'A "q.', "sentence2": "B."}]
    assert mrpc.labels.tolist() == [-1]


def test_mnli_by_header_names(tmp_path):
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    _write(
        tmp_path / "MNLI" / "dev_matched.tsv",
        head
        + "0\t1\t1e\tfiction\tThe cat sat.\tA cat sat.\tentailment\tentailment\tneutral\tentailment\tentailment\tentailment\n"
        + "1\t2\t2c\tfiction\tIt rained.\tIt was dry.\tneutral\tcontradiction\tcontradiction\tcontradiction\tneutral\tcontradiction\n",
    )
    _write(
        tmp_path / "MNLI" / "test_mismatched.tsv",
        "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\n0\t1\t1\tletters\tP.\tH.\n",
    )
    dev = load_split("mnli", "validation_matched", tmp_path)
    assert dev.texts[0] == {"premise": "The cat sat.", "hypothesis": "A cat sat."}
    assert dev.labels.tolist() == [0, 2]  # gold_label, not label1
    test = load_split("mnli", "test_mismatched", tmp_path)
    assert test.texts == [{"premise": "P.", "hypothesis": "H."}] and test.labels.tolist() == [-1]
    assert TASKS["mnli"].t5_input(test.texts[0]) == "mnli hypothesis: H. premise: P."


def test_qqp_columns(tmp_path):
    _write(
        tmp_path / "QQP" / "train.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "0\t1\t2\tHow do I \"cook\"?\tHow to cook?\t1\n5\t3\t4\tWhy?\tWhen?\t0\n",
    )
    _write(tmp_path / "QQP" / "test.tsv", "id\tquestion1\tquestion2\n0\tA?\tB?\n")
    train = load_split("qqp", "train", tmp_path)
    assert train.texts[0] == {"question1": 'How do I "cook"?', "question2": "How to cook?"}
    assert train.labels.tolist() == [1, 0]
    assert train.ids.tolist() == [0, 1]  # row positions, like the Hub's idx
    assert load_split("qqp", "test", tmp_path).labels.tolist() == [-1]
