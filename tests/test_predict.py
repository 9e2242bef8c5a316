"""`pipeline predict`: live text through the backbone and trained adapters equals the cached path.

The core check trains small adapters from real stores (tiny T5, tiny GPT-2, real MiniLM) and compares the
logits predict computes from raw text with the logits stage two computes from the stored states of the
same split. Then the outputs (GLUE submission, TSV/JSONL with probabilities, ensembles) and every refusal,
by its message.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_store

from pipeline.cli import main
from pipeline.common.config import TrainConfig
from pipeline.common.errors import AdapterError, AdapterNotFoundError, InputFormatError
from pipeline.common.tasks import get_task
from pipeline.extraction.glue import load_split
from pipeline.inference import Predictor, find_adapters, load_adapters
from pipeline.inference.texts import read_texts
from pipeline.store import CacheStore
from pipeline.training import train
from pipeline.training.adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from pipeline.training.batches import SplitBatches
from pipeline.training.model import ReadModel

LIMIT = 48
# case -> (backbone fixture, task, extraction settings besides the dtype)
CASES = {
    "t5-rte": ("tiny_t5", "rte", {}),
    "gpt2-sst2": ("tiny_gpt2", "sst2", {}),
    "minilm-stsb": ("minilm", "stsb", {}),
    "minilm-rte-pooled": ("minilm", "rte", {"tokens": "pooled"}),
}


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory, glue_dir):
    """(store, run folder, task) of a case: a small store and two seeds trained from it, built once."""
    built: dict[tuple[str, str], tuple[str, Path, str]] = {}

    def get(case: str, dtype: str = "float32") -> tuple[str, Path, str]:
        if (case, dtype) not in built:
            fixture, task, settings = CASES[case]
            model = request.getfixturevalue(fixture)
            store = make_store(tmp_path_factory, model, glue_dir, task, limit=LIMIT, dtype=dtype, **settings)
            run = tmp_path_factory.mktemp(f"run-{case}-{dtype}")
            # lr 1e-2: two short epochs move the zero-initialised output projection well away from zero
            train(TrainConfig(cache=store, out=str(run), seeds=(0, 1), epochs=2, rnn_dim=16, batch_size=8, lr=1e-2,
                              device="cpu", threads=1), progress=False)
            built[(case, dtype)] = (store, run, task)
        return built[(case, dtype)]

    return get


def cached_outputs(store: str, run: Path, split: str = "validation") -> np.ndarray:
    """Stage two's outputs from the stored states: (seeds, n, K) logits or (seeds, n) scores, split order."""
    data = CacheStore(store).split(split)
    batches = SplitBatches(data, torch.from_numpy(data.labels), memory_budget=2**40)
    outputs = []
    for folder in find_adapters([run]):
        model = ReadModel.from_pretrained(folder).eval()
        values: np.ndarray | None = None
        with torch.no_grad():
            for index, batch in batches.epoch(16, shuffle=False):
                out = model(batch)[0].numpy()
                if values is None:
                    values = np.zeros((len(data), *out.shape[1:]), dtype=np.float32)
                values[index] = out
        outputs.append(values)
    return np.stack(outputs)


def live_outputs(run: Path, task: str, glue_dir: Path, **kw) -> np.ndarray:
    predictor = Predictor.load(load_adapters([run]), device="cpu", **kw)
    texts = load_split(task, "validation", glue_dir, limit=LIMIT).texts
    return predictor.predict(texts, batch_tokens=512, progress=False).outputs


# ---- parity: live = cached -----------------------------------------------------------------------------


@pytest.mark.parametrize("case, dtype, tolerance", [
    ("t5-rte", "float32", 1e-4),
    ("gpt2-sst2", "float32", 1e-4),
    ("minilm-stsb", "float32", 1e-4),
    ("minilm-rte-pooled", "float32", 1e-4),
    # bfloat16 stores: the live states are rounded on the way like the stored ones
    ("t5-rte", "bfloat16", 1e-3),
    ("minilm-stsb", "bfloat16", 1e-3),
])
def test_predict_equals_stage_two_on_the_cached_states(trained, glue_dir, case, dtype, tolerance):
    store, run, task = trained(case, dtype)
    live = live_outputs(run, task, glue_dir)
    cached = cached_outputs(store, run)
    assert live.shape == cached.shape and live.shape[:2] == (2, LIMIT)
    assert np.abs(live - cached).max() <= tolerance
    # The trainer's own validation predictions (best epoch, from the store) are reproduced exactly.
    saved = np.loadtxt(run / "predictions" / "validation.csv", delimiter=",", skiprows=1)
    for k in range(2):
        if get_task(task).kind == "classification":
            np.testing.assert_array_equal(live[k].argmax(-1), saved[:, 2 + k].astype(int))
        else:
            np.testing.assert_allclose(live[k], saved[:, 2 + k], atol=1e-4)


def test_parity_is_not_vacuous(trained, glue_dir):
    """Without the bf16 rounding, or without the side network, the outputs measurably differ."""
    _, run, task = trained("t5-rte", "bfloat16")
    adapters = load_adapters([run])
    predictor = Predictor.load(adapters, device="cpu")
    texts = load_split(task, "validation", glue_dir, limit=LIMIT).texts
    rounded = predictor.predict(texts, batch_tokens=512, progress=False).outputs
    predictor.extraction = dataclasses.replace(predictor.extraction, dtype="float32")
    unrounded = predictor.predict(texts, batch_tokens=512, progress=False).outputs
    assert np.abs(rounded - unrounded).max() > 1e-3
    with torch.no_grad():
        for model, _ in predictor.groups:
            model.decoder_net.out_weight.zero_()
            model.decoder_net.out_bias.zero_()
    frozen = predictor.predict(texts, batch_tokens=512, progress=False).outputs
    assert np.abs(frozen - unrounded).max() > 1e-2


def test_adapters_share_one_forward_and_stack_by_config(trained, glue_dir, monkeypatch):
    _, run, task = trained("gpt2-sst2")
    adapters = load_adapters([run])
    predictor = Predictor.load(adapters, device="cpu")
    assert [a.name for a in adapters] == ["seed_0", "seed_1"]
    assert len(predictor.groups) == 1 and predictor.groups[0][0].seeds == [0, 1]
    calls = []
    forward = predictor.backbone.forward
    monkeypatch.setattr(predictor.backbone, "forward", lambda ids, *rest: calls.append(len(ids)) or forward(ids, *rest))
    texts = load_split(task, "validation", glue_dir, limit=LIMIT).texts
    predictor.predict(texts, batch_tokens=10**6, progress=False)
    assert calls == [LIMIT]  # one batch, one forward, both seeds


def test_a_long_input_is_predicted_in_windows_as_in_one(trained, glue_dir, monkeypatch):
    # The token ids of a whole file are not held at once: windows of examples are tokenized and batched in turn,
    # and every example gets what one window over the whole input gives it, in its place.
    _, run, task = trained("minilm-stsb")
    predictor = Predictor.load(load_adapters([run]), device="cpu")
    texts = load_split(task, "validation", glue_dir, limit=LIMIT).texts
    whole = predictor.predict(texts, batch_tokens=512, progress=False)
    tokenized = []
    encode = predictor.encode
    monkeypatch.setattr(predictor, "encode", lambda window: tokenized.append(len(window)) or encode(window))
    monkeypatch.setattr("pipeline.inference.predictor.PREDICT_WINDOW", 7)
    windowed = predictor.predict(texts, batch_tokens=512, progress=False)
    assert tokenized == [7] * (LIMIT // 7) + ([LIMIT % 7] if LIMIT % 7 else [])
    np.testing.assert_allclose(windowed.outputs, whole.outputs, atol=1e-5)
    assert windowed.cut == whole.cut


# ---- the command ---------------------------------------------------------------------------------------


def invoke(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, ["predict", "--device", "cpu", "--quiet", *args], input=stdin)


def test_validation_split_writes_a_submission_and_prints_the_metric(trained, glue_dir, tmp_path):
    store, run, _ = trained("t5-rte")
    out = tmp_path / "rte_validation.tsv"
    result = invoke("--adapter", str(run / "adapters" / "seed_0"), "--task", "rte", "--split", "validation",
                    "--glue-dir", str(glue_dir), "--limit", str(LIMIT), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.open(), delimiter="\t"))
    assert rows[0] == ["index", "prediction"] and len(rows) == LIMIT + 1
    split = CacheStore(store).split("validation")
    assert [int(r[0]) for r in rows[1:]] == split.ids.tolist()
    names = get_task("rte").label_names
    want = cached_outputs(store, run)[0].argmax(-1)
    assert [r[1] for r in rows[1:]] == [names[i] for i in want]  # RTE: GLUE's label names
    accuracy = 100 * float((want == split.labels).mean())
    assert f"rte/validation seed_0: accuracy {accuracy:.2f}" in result.stdout


def test_unlabeled_test_split_in_glue_format(trained, glue_dir, tmp_path):
    """A GLUE test.tsv (no label column): submission only; SST-2 is written as 0/1, like GLUE's files."""
    _, run, _ = trained("gpt2-sst2")
    local = tmp_path / "glue"
    (local / "SST-2").mkdir(parents=True)
    with open(glue_dir / "SST-2" / "dev.tsv") as source, open(local / "SST-2" / "test.tsv", "w") as test:
        rows = list(csv.reader(source, delimiter="\t", quoting=csv.QUOTE_NONE))[: LIMIT + 1]
        test.write("index\tsentence\n" + "".join(f"{i}\t{r[0]}\n" for i, r in enumerate(rows[1:])))
    result = invoke("--adapter", str(run), "--ensemble", "--split", "test", "--glue-dir", str(local))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == LIMIT + 1
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    assert "accuracy" not in result.output  # nothing to score


def test_free_text_jsonl_from_stdin_with_probabilities(trained):
    _, run, _ = trained("gpt2-sst2")
    lines = [json.dumps({"sentence": s}) for s in ("a gripping , funny film", "dull and far too long")]
    result = invoke("--adapter", str(run), "--input", "-", stdin="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1] and records[1]["sentence"] == "dull and far too long"
    assert "reached max_length" not in result.stderr
    long = json.dumps({"sentence": "a gripping , funny film " * 400})  # far past the adapters' max_length
    cut = invoke("--adapter", str(run), "--input", "-", stdin="\n".join([long, *lines]) + "\n")
    assert cut.exit_code == 0 and len(cut.stdout.splitlines()) == 3, cut.output
    assert re.search(r"note: 1 of 3 examples reached max_length \(\d+ tokens, the adapters' extraction setting\) "
                     r"and were cut to fit it, as in training", cut.stderr)
    for r in records:  # one column set per adapter
        for seed in ("seed_0", "seed_1"):
            p = [r[f"p_negative_{seed}"], r[f"p_positive_{seed}"]]
            assert sum(p) == pytest.approx(1, abs=1e-5)
            assert r[f"prediction_{seed}"] == ("negative", "positive")[int(np.argmax(p))]


def test_the_readme_python_example_predicts_what_the_command_predicts(trained, capsys):
    # The README's snippet, run as written but for the run folder (and the CPU): its ensemble is the CLI's.
    _, run, _ = trained("gpt2-sst2")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    assert '"runs/sst2"' in snippet and 'device="auto"' in snippet
    names: dict = {}
    exec(snippet.replace('"runs/sst2"', repr(str(run))).replace('device="auto"', 'device="cpu"'), names)
    printed = capsys.readouterr().out
    cli = invoke("--adapter", str(run), "--ensemble", "--input", "-", stdin='{"sentence": "a gripping, funny film"}\n')
    assert cli.exit_code == 0, cli.output
    row = json.loads(cli.stdout)
    assert printed.startswith(row["prediction"] + " ")
    np.testing.assert_allclose(names["ensemble"].probabilities[0], [row["p_negative"], row["p_positive"]], atol=1e-6)


def test_ensemble_averages_probabilities(trained, tmp_path):
    _, run, _ = trained("minilm-rte-pooled")
    source = tmp_path / "pairs.tsv"
    source.write_text("id\tsentence1\tsentence2\n7\tA cat sat.\tA cat is sitting.\n")
    each = invoke("--adapter", str(run / "adapters" / "seed_0"), "--adapter", str(run / "adapters" / "seed_1"),
                  "--input", str(source), "--out", str(tmp_path / "each.jsonl"))
    both = invoke("--adapter", str(run), "--ensemble", "--input", str(source), "--out", str(tmp_path / "mean.tsv"))
    assert each.exit_code == 0 and both.exit_code == 0, each.output + both.output
    single = json.loads((tmp_path / "each.jsonl").read_text())
    rows = list(csv.DictReader((tmp_path / "mean.tsv").open(), delimiter="\t"))
    assert len(rows) == 1 and rows[0]["sentence2"] == "A cat is sitting."
    for label in ("entailment", "not_entailment"):
        mean = (single[f"p_{label}_seed_0"] + single[f"p_{label}_seed_1"]) / 2
        assert float(rows[0][f"p_{label}"]) == pytest.approx(mean, abs=2e-6)


def test_regression_scores_from_a_tsv(trained, glue_dir, tmp_path):
    """STS-B free text gives scores; they equal the GLUE-split path on the same sentences."""
    _, run, _ = trained("minilm-stsb")
    split = load_split("stsb", "validation", glue_dir, limit=5)
    source = tmp_path / "pairs.tsv"
    source.write_text("sentence1\tsentence2\n" + "".join(f"{t['sentence1']}\t{t['sentence2']}\n" for t in split.texts))
    result = invoke("--adapter", str(run / "adapters" / "seed_1"), "--input", str(source))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(result.stdout.splitlines(), delimiter="\t"))
    assert list(rows[0]) == ["index", "sentence1", "sentence2", "prediction"]
    live = live_outputs(run, "stsb", glue_dir)[1, :5]
    np.testing.assert_allclose([float(r["prediction"]) for r in rows], live, atol=1e-5)


# ---- refusals --------------------------------------------------------------------------------------------


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr


def test_a_backbone_with_another_revision_is_refused(trained, tiny_t5_untied, tmp_path):
    _, run, _ = trained("t5-rte")
    result = invoke("--adapter", str(run), "--model", str(tiny_t5_untied), "--input", "-",
                    stdin="sentence1\tsentence2\na\tb\n")
    one_line_error(result, "has revision sha256:")
    assert "was trained on" in result.stderr
    # The same check fires when the recorded revision is not the backbone's.
    copy = tmp_path / "seed_0"
    shutil.copytree(run / "adapters" / "seed_0", copy)
    payload = json.loads((copy / ADAPTER_CONFIG_NAME).read_text())
    payload["revision"] = "sha256:0000000000000000"
    (copy / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    with pytest.raises(AdapterError, match="at revision sha256:0000000000000000"):
        Predictor.load(load_adapters([copy]), device="cpu")


def test_an_adapter_of_an_earlier_template_gets_its_inputs_or_a_way_out(trained, tmp_path, monkeypatch):
    # An adapter trained when long decoder prompts were cut at their end is served inputs made that way; one of a
    # template this version no longer makes is refused in one line saying what to do.
    _, run, _ = trained("gpt2-sst2")
    copy = tmp_path / "seed_0"
    shutil.copytree(run / "adapters" / "seed_0", copy)
    payload = json.loads((copy / ADAPTER_CONFIG_NAME).read_text())
    payload["extraction"]["template"] = "t5+answer/in-context"
    (copy / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    predictor = Predictor.load(load_adapters([copy]), device="cpu")
    asked = []
    encode = predictor.backbone.encode
    monkeypatch.setattr(predictor.backbone, "encode", lambda *a, **kw: asked.append(kw["template"]) or encode(*a, **kw))
    predictor.predict([{"sentence": "a gripping, funny film"}], progress=False)
    assert asked == ["t5+answer/in-context"]
    payload["extraction"]["template"] = "t5+answer"
    (copy / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    one_line_error(invoke("--adapter", str(copy), "--input", "-", stdin="sentence\na film\n"),
                   "was trained on inputs made as 't5+answer', which this version no longer makes")


def test_a_task_that_is_not_the_adapters_is_refused(trained, glue_dir):
    _, run, _ = trained("t5-rte")
    one_line_error(invoke("--adapter", str(run), "--task", "sst2", "--split", "validation", "--glue-dir", str(glue_dir)),
                   "--task sst2 does not match adapter")
    one_line_error(invoke("--adapter", str(run), "--task", "glue9", "--split", "validation"), "unknown GLUE task 'glue9'")


def test_missing_adapter_files_are_refused(trained, tmp_path):
    _, run, _ = trained("t5-rte")
    broken = tmp_path / "seed_0"
    shutil.copytree(run / "adapters" / "seed_0", broken)
    (broken / ADAPTER_WEIGHTS_NAME).unlink()
    one_line_error(invoke("--adapter", str(broken), "--input", "-", stdin="x\n"), f"it has no {ADAPTER_WEIGHTS_NAME}")
    one_line_error(invoke("--adapter", str(tmp_path / "nowhere"), "--input", "-", stdin="x\n"), "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFoundError, match="holds no adapter"):
        find_adapters([tmp_path / "empty"])


def test_an_adapter_without_the_extraction_record_is_refused(trained, tmp_path):
    _, run, _ = trained("gpt2-sst2")
    old = tmp_path / "seed_0"
    shutil.copytree(run / "adapters" / "seed_0", old)
    payload = json.loads((old / ADAPTER_CONFIG_NAME).read_text())
    del payload["extraction"]  # as adapters were written before the typed record
    (old / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    assert ReadModel.from_pretrained(old).seeds == [0]  # it still loads
    one_line_error(invoke("--adapter", str(old), "--input", "-", stdin='{"sentence": "fine"}\n'),
                   "predates the extraction record")


def test_adapters_of_different_tasks_cannot_share_a_pass(trained):
    _, rte, _ = trained("minilm-rte-pooled")
    _, stsb, _ = trained("minilm-stsb")
    with pytest.raises(AdapterError, match="differ in task"):
        load_adapters([rte, stsb])


@pytest.mark.parametrize("text, needle", [
    ("sentence1\tsentence2\na\tb\nonly one field\n", "<stdin>, line 3: 1 tab-separated field(s), expected 2"),
    ("premise\thypothesis\na\tb\n", "lacks column(s) ['sentence1', 'sentence2']"),
    ('{"sentence1": "a", "sentence2": "b"}\n{"sentence1": "a"\n', "<stdin>, line 2: not valid JSON"),
    ('{"sentence1": "a", "sentence2": "b"}\n\n{"sentence1": "a"}\n', "<stdin>, line 3: no text field(s) ['sentence2']"),
    ("", "has no examples"),
    ("sentence1\tsentence2\n\n", "has no examples"),
    ("sentence1,sentence2\na,b\n", "the header 'sentence1,sentence2' is comma-separated: CSV input is not read; "
     "give a TSV (tab-separated, header naming the columns) or JSONL"),
])
def test_bad_input_is_one_line_with_its_line_number(trained, text, needle):
    _, run, _ = trained("minilm-rte-pooled")
    one_line_error(invoke("--adapter", str(run), "--input", "-", stdin=text), needle)


def test_split_or_input_exactly_one(trained, tmp_path):
    _, run, _ = trained("minilm-rte-pooled")
    one_line_error(invoke("--adapter", str(run)), "exactly one of --split")
    one_line_error(invoke("--adapter", str(run), "--split", "validation", "--input", "-"), "exactly one of --split")
    one_line_error(invoke("--adapter", str(run), "--input", str(tmp_path / "missing.tsv")), "no such file")


def test_an_out_folder_and_csv_input_are_refused_before_the_adapters_load(tmp_path):
    """Both used to surface late: a folder after the forward passes (naming a temporary file), CSV as missing
    columns. No adapter exists here: refusing its absence would mean the check came too late."""
    source = tmp_path / "in.tsv"
    source.write_text("sentence\nfine\n")
    (tmp_path / "outdir").mkdir()
    none = str(tmp_path / "none")
    one_line_error(invoke("--adapter", none, "--input", str(source), "--out", str(tmp_path / "outdir")),
                   f"--out {tmp_path / 'outdir'} is a folder; name a file (.tsv, .csv or .jsonl) or - for stdout")
    csv_input = tmp_path / "in.csv"
    csv_input.write_text("sentence,label\nfine,1\n")
    one_line_error(invoke("--adapter", none, "--input", str(csv_input)),
                   f"{csv_input}: CSV input is not read; give a TSV (tab-separated, header naming the columns) or JSONL")
    with pytest.raises(InputFormatError, match="CSV input is not read"):
        read_texts(str(csv_input), get_task("sst2"))
    assert [p.name for p in (tmp_path / "outdir").iterdir()] == []


def test_batch_tokens_below_max_length_is_refused_before_the_backbone_loads(trained, monkeypatch):
    """As extract refuses it: a batch must hold the longest example (max_length, recorded with the adapter)."""
    _, run, _ = trained("minilm-rte-pooled")
    max_length = load_adapters([run])[0].config.extraction.max_length
    monkeypatch.setattr(Predictor, "load", lambda *_a, **_k: pytest.fail("loaded the backbone first"))
    one_line_error(invoke("--adapter", str(run), "--batch-tokens", str(max_length - 1), "--input", "-",
                          stdin="sentence1\tsentence2\na\tb\n"),
                   f"--batch-tokens {max_length - 1} must be at least max_length ({max_length}, the adapters' "
                   f"extraction setting) so the longest example fits in a batch; pass --batch-tokens {max_length}")


def test_a_backbone_the_adapter_names_but_that_is_missing_says_to_pass_model(trained, tmp_path):
    """An adapter records the backbone as extract was given it (maybe a relative folder): say how to point at it."""
    _, run, _ = trained("minilm-rte-pooled")
    moved = tmp_path / "seed_0"
    shutil.copytree(run / "adapters" / "seed_0", moved)
    payload = json.loads((moved / ADAPTER_CONFIG_NAME).read_text())
    payload["base_model_name_or_path"] = str(tmp_path / "models" / "minilm")
    (moved / ADAPTER_CONFIG_NAME).write_text(json.dumps(payload))
    stdin = "sentence1\tsentence2\na\tb\n"
    one_line_error(invoke("--adapter", str(moved), "--input", "-", stdin=stdin),
                   f"adapter {moved} names its backbone as `pipeline extract --model` was given it: pass --model "
                   "with the backbone's folder")
    given = invoke("--adapter", str(moved), "--input", "-", "--model", str(tmp_path / "elsewhere"), stdin=stdin)
    one_line_error(given, f"the folder {tmp_path / 'elsewhere'} does not exist")
    assert "names its backbone" not in given.stderr  # --model was given: the path to check is that one


def test_text_not_in_utf8_and_damaged_weights_are_one_line(trained, tmp_path):
    import shutil

    _, run, _ = trained("minilm-rte-pooled")
    latin = tmp_path / "latin1.tsv"
    latin.write_bytes("sentence1\tsentence2\ncaf\u00e9\tb\n".encode("latin-1"))
    one_line_error(invoke("--adapter", str(run), "--input", str(latin)), "not UTF-8 text (byte 23")
    damaged = tmp_path / "seed_0"
    shutil.copytree(run / "adapters" / "seed_0", damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    one_line_error(invoke("--adapter", str(damaged), "--input", "-", stdin="sentence1\tsentence2\na\tb\n"),
                   "adapter_model.safetensors is damaged")


def test_reading_texts_keeps_an_index_column(tmp_path):
    rte = get_task("rte")
    source = tmp_path / "in.tsv"
    source.write_text("index\tsentence1\tsentence2\tlabel\n12\ta\tb\tentailment\n40\tc\td\tnot_entailment\n")
    texts = read_texts(str(source), rte)
    assert texts.ids == [12, 40] and texts.texts[1] == {"sentence1": "c", "sentence2": "d"}  # JSONL: numbers
    source.write_text("idx\tsentence1\tsentence2\n007\ta\tb\n-3\tc\td\n")
    assert read_texts(str(source), rte).ids == ["007", -3]  # only an integer's own spelling becomes one
    lines = '{"sentence1": "a", "sentence2": "b", "idx": "q7"}\n{"sentence1": "a", "sentence2": "b", "idx": 9}\n'
    assert read_texts("-", rte, stdin=io.StringIO(lines)).ids == ["q7", 9]
    assert read_texts("-", rte, stdin=io.StringIO(lines.replace(', "idx": "q7"', ""))).ids == [0, 9]
    assert texts.format == "tsv" and len(read_texts(str(source), rte, limit=1)) == 1
    with pytest.raises(InputFormatError, match="line 2"):
        read_texts("-", rte, stdin=io.StringIO('{"sentence1": "a", "sentence2": "b"}\n[1]\n'))


def test_reading_texts_breaks_lines_where_files_do_and_checks_the_index(tmp_path):
    rte, sst2 = get_task("rte"), get_task("sst2")
    # U+2028 and NEL are text inside a JSON string and a TSV cell, as the GLUE files' own reading takes them.
    jsonl = '{"sentence": "first\u2028second"}\n{"sentence": "third\u0085fourth"}\r\n'
    assert read_texts("-", sst2, stdin=io.StringIO(jsonl)).texts == [{"sentence": "first\u2028second"},
                                                                     {"sentence": "third\u0085fourth"}]
    source = tmp_path / "nel.tsv"
    source.write_bytes("sentence\nfirst\u0085second\r\nthird\n".encode())
    assert [t["sentence"] for t in read_texts(str(source), sst2).texts] == ["first\u0085second", "third"]
    # A GLUE test.tsv as it is: MRPC names its text columns "#1 String" and "#2 String".
    source.write_text("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n1\t3\t4\tc\td\n")
    mrpc = read_texts(str(source), get_task("mrpc"))
    assert mrpc.texts == [{"sentence1": "a", "sentence2": "b"}, {"sentence1": "c", "sentence2": "d"}]
    assert mrpc.ids == [0, 1]
    # An index is an integer or a string; null is none given (the row number); each names one example.
    pair = '"sentence1": "a", "sentence2": "b"'
    assert read_texts("-", rte, stdin=io.StringIO(f'{{{pair}, "idx": null}}\n{{{pair}, "idx": 5}}\n')).ids == [0, 5]
    for bad, needle in (("true", "index true must be an integer or a string"),
                        ('{"a": 1}', 'index {"a": 1} must be'), ("1.5", "index 1.5 must be")):
        with pytest.raises(InputFormatError, match=re.escape(f"<stdin>, line 1: {needle}")):
            read_texts("-", rte, stdin=io.StringIO(f'{{{pair}, "idx": {bad}}}\n'))
    with pytest.raises(InputFormatError, match="index 1 is given to two examples"):
        read_texts("-", rte, stdin=io.StringIO(f'{{{pair}, "idx": 1}}\n{{{pair}, "idx": "1"}}\n'))
    source.write_text("index\tsentence\n\tx\n1\ty\n")
    with pytest.raises(InputFormatError, match="line 2: the index cell is empty"):
        read_texts(str(source), sst2)


def test_the_python_api_checks_its_examples_as_the_readers_do(trained):
    _, run, _ = trained("minilm-rte-pooled")
    predictor = Predictor.load(load_adapters([str(run)]), device="cpu")
    for texts, needle in (([], "no examples to predict on"), (["a b"], "example 0: expected a mapping"),
                          ([{"sentence1": "a"}], "example 0: no text field(s) ['sentence2']"),
                          ([{"sentence1": "a", "sentence2": None}], "example 0: no text field(s) ['sentence2']")):
        with pytest.raises(InputFormatError, match=re.escape(needle)):
            predictor.predict(texts, progress=False)


def test_one_example_is_one_prediction(trained, tmp_path):
    _, run, _ = trained("minilm-rte-pooled")
    out = tmp_path / "one.csv"
    result = invoke("--adapter", str(run / "adapters" / "seed_0"), "--input", "-", "--out", str(out),
                    stdin='{"sentence1": "a, b", "sentence2": "c"}\n')
    assert result.exit_code == 0 and f"wrote 1 prediction (rte) to {out}" in result.stdout, result.output
    assert next(csv.DictReader(out.open()))["sentence1"] == "a, b"


def test_the_output_format_follows_the_out_extension(tmp_path):
    """.tsv, .csv and .jsonl are written as named (no model needed); an extension we cannot write is refused."""
    from pipeline.inference.outputs import output_format, write_rows, write_submission
    from pipeline.inference.predictor import Head

    assert [output_format(out, "tsv") for out in ("p.tsv", "P.CSV", "val.jsonl", "-", "RTE")] == [
        "tsv", "csv", "jsonl", "tsv", "tsv"]
    assert output_format("-", "jsonl") == "jsonl"  # stdout: the input's format
    rte = get_task("rte")
    head = Head("seed_0", np.array([0, 1]), np.array([[0.75, 0.25], [0.5, 0.5]]))
    written = {}
    for fmt in ("tsv", "csv", "jsonl"):
        stream = io.StringIO()
        write_submission(stream, fmt, rte, [3, 4], [head])
        written[fmt] = stream.getvalue()
    assert written["tsv"] == "index\tprediction\n3\tentailment\n4\tnot_entailment\n"
    assert list(csv.reader(io.StringIO(written["csv"]))) == [["index", "prediction"], ["3", "entailment"],
                                                            ["4", "not_entailment"]]
    assert [json.loads(line) for line in written["jsonl"].splitlines()] == [
        {"index": 3, "prediction": "entailment"}, {"index": 4, "prediction": "not_entailment"}]
    stream = io.StringIO()
    write_rows(stream, "csv", rte, ["a", "b"], [{"sentence1": "x, \"y\"", "sentence2": "z"}] * 2, [head])
    rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert rows[0] == {"index": "a", "sentence1": 'x, "y"', "sentence2": "z", "prediction": "entailment",
                       "p_entailment": "0.75", "p_not_entailment": "0.25"}
    result = CliRunner().invoke(main, ["predict", "--adapter", str(tmp_path), "--split", "validation",
                                       "--device", "cpu", "--out", str(tmp_path / "p.xlsx")])
    one_line_error(result, "p.xlsx: cannot write .xlsx files; name it .tsv, .csv or .jsonl")


@pytest.mark.parametrize("case, dtype", [("t5-rte", "bfloat16"), ("minilm-rte-pooled", "float32")])
def test_states_gathered_on_the_device_are_the_host_s_rows(trained, glue_dir, case, dtype):
    # On an accelerator the live states go into device buffers (run here on CPU tensors; tests/test_cuda.py's
    # block-buffer test runs the same gather on a GPU) and must be the rows the host path builds.
    _, run, task = trained(case, dtype)
    predictor = Predictor.load(load_adapters([run]), device="cpu")
    batch_ids = predictor.tokenize(load_split(task, "validation", glue_dir, limit=6).texts)
    host, device = (predictor.side_batch(batch_ids, on_device=flag) for flag in (False, True))
    for field in ("encoder", "decoder", "encoder_segment", "encoder_first"):
        a, b = getattr(host, field), getattr(device, field)
        assert (a is None) == (b is None), field
        if a is None:
            continue
        if dtype == "float32" and a.is_floating_point():  # pooled means, summed in another order
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b), field
