"""Architectures beyond the three tiny test models: what each stores must be the model's own computation, and what
cannot be stored is refused in one line before a store exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.common.config import ExtractConfig
from pipeline.common.errors import ConfigError, UnsupportedModelError
from pipeline.common.tasks import get_task
from pipeline.extraction import extract
from pipeline.extraction.backbones import DECODER_SUFFIX, load_backbone
from pipeline.extraction.glue import load_split
from pipeline.store import CacheStore

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "vocab.json", "merges.txt")


def save_model(folder: Path, model: torch.nn.Module, tokenizer_from: Path) -> Path:
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, folder / name)
    return folder


def small_extract(model: Path, out: Path, glue_dir: Path, **kw) -> CacheStore:
    extract(ExtractConfig(model=str(model), task="rte", out=str(out), glue_dir=str(glue_dir), splits="validation",
                          limit=6, max_length=kw.pop("max_length", 64), **kw), progress=False)
    return CacheStore(str(out))


def test_mt5_does_not_scale_its_outputs_and_its_label_rows_give_its_logits(tiny_t5, tmp_path, glue_dir):
    # mT5's config claims tied embeddings (transformers forces it), yet the model never scales by d**-0.5 before
    # its head: read from the config, the label rows missed its logits and every mT5 was refused.
    from transformers import MT5Config, MT5ForConditionalGeneration

    sizes = {k: v for k, v in json.loads((tiny_t5 / "config.json").read_text()).items()
             if k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                      "decoder_start_token_id", "pad_token_id", "eos_token_id")}
    torch.manual_seed(0)
    path = save_model(tmp_path / "mt5", MT5ForConditionalGeneration(MT5Config(**sizes)), tiny_t5)
    assert load_backbone(str(path), device="cpu").extra["scale_decoder_outputs"] is False
    assert load_backbone(str(tiny_t5), device="cpu").extra["scale_decoder_outputs"] is True  # T5 v1.0 does
    store = small_extract(path, tmp_path / "s.zarr", glue_dir)  # its first batch checks rows against logits
    assert store.label_rows() is not None and len(store.split("validation")) == 6


def test_a_model_whose_states_change_width_is_refused_before_a_store_exists(tiny_gpt2, tmp_path, glue_dir):
    # OPT with a projection (opt-350m) ends in a narrower state than its layers': it crashed mid-split with a
    # traceback, leaving a store that asked to be finished by the same command.
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=800, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=64, max_position_embeddings=128, do_layer_norm_before=False,
                       pad_token_id=1, bos_token_id=0, eos_token_id=0)
    path = save_model(tmp_path / "opt", OPTForCausalLM(config), tiny_gpt2)
    out = tmp_path / "s.zarr"
    with pytest.raises(UnsupportedModelError, match=r"hidden states are not all 32 wide \(16, 32\)"):
        small_extract(path, out, glue_dir)
    assert not out.exists()


@pytest.mark.parametrize("head", ["bias", "softcap", "cohere", "granite"])
def test_a_head_with_terms_beyond_the_label_rows_is_refused_before_a_store_exists(head, tiny_gpt2, tmp_path,
                                                                                  glue_dir):
    # A small bias on the label words (GPT-J and Phi have one) or soft-capping (Gemma 2) changes the model's label
    # logits by less than the first-batch check's tolerance on a random model, so such stores were written with
    # label rows that are not the model's head. Scaled logits (Cohere, Granite) were caught only at the first batch,
    # with a store already made.
    if head == "bias":
        from transformers import GPTJConfig, GPTJForCausalLM

        model = GPTJForCausalLM(GPTJConfig(vocab_size=800, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                           n_positions=128, bos_token_id=0, eos_token_id=0))
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 1e-4)
        expected = "have a bias on the label words"
    elif head == "softcap":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=800, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, max_position_embeddings=128, pad_token_id=0,
                                               bos_token_id=0, eos_token_id=0, final_logit_softcapping=30.0))
        expected = "have soft-capping"
    elif head == "cohere":
        from transformers import CohereConfig, CohereForCausalLM

        model = CohereForCausalLM(CohereConfig(vocab_size=800, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, pad_token_id=0, bos_token_id=0,
                                               eos_token_id=0, logit_scale=0.0625))
        expected = r"have scaling \(logit_scale 0.0625\)"
    else:
        from transformers import GraniteConfig, GraniteForCausalLM

        model = GraniteForCausalLM(GraniteConfig(vocab_size=800, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=128, pad_token_id=0, bos_token_id=0,
                                                 eos_token_id=0, logits_scaling=8.0))
        expected = r"have scaling \(logits_scaling 8.0\)"
    path = save_model(tmp_path / head, model, tiny_gpt2)
    out = tmp_path / "s.zarr"
    with pytest.raises(UnsupportedModelError, match=expected):
        small_extract(path, out, glue_dir, dtype="float32")
    assert not out.exists()


def llama_style(tiny_t5: Path, folder: Path) -> Path:
    """A tiny Llama whose tokenizer, like Llama's in transformers 5, adds "▁" before the first word of a text."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tiny_t5 / "tokenizer.json"))
    raw.normalizer = None
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    raw.post_processor = None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, pad_token_id=0, eos_token_id=1))
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_decoder_prompt_is_the_tokenizers_own_encoding_of_it(tiny_t5, tmp_path, glue_dir):
    # Encoded alone, "\nanswer:" gains a leading "▁" with such a tokenizer: a token the model never sees before
    # the cue, so the stored states were not the model's reading of its prompt.
    path = llama_style(tiny_t5, tmp_path / "llama")
    backbone = load_backbone(str(path), device="cpu")
    task = get_task("rte")
    examples = load_split(task, "validation", glue_dir, limit=6).texts
    own = [backbone.tokenizer(backbone.input_text(task, ex)[0])["input_ids"] for ex in examples]
    assert backbone.tokenize(task, examples, 512) == own
    cue = backbone._cue_ids()
    assert backbone.tokenizer.convert_ids_to_tokens(cue[:1]) != ["▁"]
    alone = backbone.tokenizer(DECODER_SUFFIX, add_special_tokens=False)["input_ids"]
    assert alone == [backbone.tokenizer.convert_tokens_to_ids("▁"), *cue]  # encoded alone, it gains one


@pytest.mark.parametrize("style", ["gpt2", "llama", "words"])
def test_a_long_decoder_prompt_is_cut_from_its_longest_field(style, tiny_gpt2, tiny_t5, tmp_path, glue_dir,
                                                             monkeypatch):
    # Cut at its end, a prompt with a long premise lost "sentence2:" and the hypothesis: the model was asked about
    # entailment without the second sentence. Cut longest field first, every field keeps its name and a start.
    path = tiny_gpt2 if style == "gpt2" else llama_style(tiny_t5, tmp_path / "llama")
    backbone = load_backbone(str(path), device="cpu")
    if style == "words":  # a tokenizer without offsets: fields are cut at word ends
        monkeypatch.setattr(type(backbone.tokenizer), "is_fast", False)
    task, max_length = get_task("rte"), 48
    examples = load_split(task, "validation", glue_dir, limit=40).texts
    cue = backbone._cue_ids()
    decode = backbone.tokenizer.decode
    encoded = backbone.encode(task, examples, max_length)
    cut = 0
    for example, ids, was_cut in zip(examples, encoded.ids, encoded.cut):
        own = backbone.tokenizer(backbone.input_text(task, example)[0])["input_ids"]
        assert len(ids) <= max_length and ids[-len(cue):] == cue
        assert was_cut == (len(own) > max_length)  # counted as cut even where the cut leaves a token or two spare
        if len(own) <= max_length:
            assert ids == own  # a prompt that fits is left as it was
            continue
        cut += 1
        slack = 4 if style == "words" else 2  # an estimated cut (no offsets) may leave a few tokens unused
        assert len(ids) >= max_length - slack  # the budget is used, not wasted
        text = decode(ids[: -len(cue)], skip_special_tokens=True)
        first, second = text.split(" sentence2: ")  # the second field and its name survive every cut
        first = first.removeprefix("rte sentence1: ")
        assert example["sentence1"].startswith(first.strip()) and example["sentence2"].startswith(second.strip())
        # Longest first: a field is cut only down to the other's length (a short hypothesis stays whole).
        count = {name: len(backbone.tokenizer(part.strip(), add_special_tokens=False)["input_ids"])
                 for name, part in (("first", first), ("second", second))}
        if second.strip() != example["sentence2"].strip():
            assert abs(count["first"] - count["second"]) <= slack
        else:
            assert count["first"] >= count["second"] - slack
    assert cut >= 10


@pytest.mark.parametrize("model", ["minilm", "tiny_t5"])
def test_an_example_of_exactly_max_length_is_not_counted_as_cut(model, request, glue_dir):
    # Encoder and T5 inputs are cut by the tokenizer; one that fits max_length exactly was counted as cut.
    backbone = load_backbone(str(request.getfixturevalue(model)), device="cpu")
    task = get_task("rte")
    examples = load_split(task, "validation", glue_dir, limit=20).texts
    whole = [len(ids) for ids in backbone.tokenize(task, examples, 10**4)]
    exact = whole[0]
    encoded = backbone.encode(task, examples, exact)
    assert encoded.cut == [n > exact for n in whole] and not encoded.cut[0] and any(encoded.cut)
    assert [len(ids) for ids in encoded.ids] == [min(n, exact) for n in whole]


def test_an_adapter_of_the_earlier_decoder_template_gets_its_own_inputs(tiny_gpt2, glue_dir):
    # Adapters trained when a long decoder prompt was cut at its end ("t5+answer/in-context") are still served
    # the inputs they were trained on; a template this version never made is refused in predict.
    backbone = load_backbone(str(tiny_gpt2), device="cpu")
    task, max_length = get_task("rte"), 48
    examples = load_split(task, "validation", glue_dir, limit=20).texts
    cue = backbone._cue_ids()
    bodies = backbone.tokenizer([backbone.input_text(task, ex)[0][: -len(DECODER_SUFFIX)] for ex in examples])
    earlier = backbone.encode(task, examples, max_length, template="t5+answer/in-context")
    assert earlier.ids == [body[: max_length - len(cue)] + cue for body in bodies["input_ids"]]
    assert earlier.cut == backbone.encode(task, examples, max_length).cut and any(earlier.cut)
    assert earlier.ids != backbone.tokenize(task, examples, max_length)
    assert backbone.makes("t5+answer/in-context") and not backbone.makes("t5+answer")
    with pytest.raises(ValueError, match="not 't5\\+answer'"):
        backbone.encode(task, examples, max_length, template="t5+answer")


def test_roberta_positions_start_after_the_padding_index(tiny_gpt2, tmp_path):
    # RoBERTa counts positions from pad_token_id + 1: a 50-row table embeds 48 tokens. A tokenizer that does not
    # declare the limit let --max-length 50 through, and the split crashed in the embedding lookup.
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=800, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=50, pad_token_id=1, type_vocab_size=1)
    path = save_model(tmp_path / "roberta", RobertaModel(config), tiny_gpt2)
    backbone = load_backbone(str(path), device="cpu")
    assert backbone.max_positions == 48
    with pytest.raises(ConfigError, match=r"\(48 positions\); pass --max-length 48 or less"):
        backbone.check_max_length(49)
    backbone.check_max_length(48)
    backbone.model(input_ids=torch.full((1, 48), 5))  # the limit is the model's own: 48 tokens embed ...
    with pytest.raises((IndexError, RuntimeError)):
        backbone.model(input_ids=torch.full((1, 49), 5))  # ... and 49 do not
