"""Random backbones of a named shape: loadable by stage one, each family's tokenizer working."""

from __future__ import annotations

import pytest

from pipeline.common.tasks import get_task
from pipeline.extraction.backbones import load_backbone
from pipeline.extraction.shapes import SHAPES, build_random_backbone, main


@pytest.mark.parametrize("shape", ["t5-tiny", "bert-tiny", "gpt2-tiny"])
def test_a_tiny_shape_loads_as_its_family(shape, tmp_path, glue_dir):
    assert main(["--shape", shape, "--out", str(tmp_path / shape), "--glue-dir", str(glue_dir)]) == 0
    backbone = load_backbone(str(tmp_path / shape), dtype="float32", device="cpu")
    assert backbone.family == SHAPES[shape].family
    task = get_task("rte")
    ids = backbone.tokenize(task, [{"sentence1": "A cat sat.", "sentence2": "An animal sat."}], 64)[0]
    assert 2 < len(ids) < 30  # a real vocabulary: words, not characters
    if backbone.family != "encoder":
        labels = backbone.label_token_ids(task)
        assert len(set(labels)) == len(labels) == 2


def test_the_full_size_configs_are_the_published_shapes():
    t5 = SHAPES["t5-base"].config
    assert (t5["d_model"], t5["num_layers"], t5["num_decoder_layers"], t5["d_ff"], t5["vocab_size"]) == (768, 12, 12, 3072, 32128)
    assert SHAPES["bert-base"].config["hidden_size"] == SHAPES["gpt2"].config["n_embd"] == 768


def test_a_tokenizer_folder_is_copied_not_retrained(tmp_path, glue_dir):
    first = build_random_backbone("t5-tiny", tmp_path / "a", glue_dir=glue_dir)
    second = build_random_backbone("t5-tiny", tmp_path / "b", tokenizer=first, seed=1)
    task = get_task("sst2")
    example = [{"sentence": "a gripping, well acted film"}]
    one, two = (load_backbone(str(p), dtype="float32", device="cpu") for p in (first, second))
    assert one.tokenize(task, example, 32) == two.tokenize(task, example, 32)


def test_without_tokenizer_or_text_it_says_what_to_give(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert main(["--shape", "t5-tiny", "--out", str(tmp_path / "x")]) == 2
    assert "--tokenizer FOLDER or --glue-dir DIR" in capsys.readouterr().err
    assert main(["--shape", "t5-tiny", "--out", str(tmp_path / "y"), "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == (f"Error: --tokenizer {tmp_path / 'nowhere'}: no such folder "
                                               "(a folder with a saved tokenizer, e.g. a model's)")
    assert not (tmp_path / "y").exists()
