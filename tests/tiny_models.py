"""Tiny random backbones built on the spot: no pretrained T5 or GPT-2 can be downloaded here.

The tokenizers are trained on real GLUE text so label words tokenize the way they would in
practice (several sub-words, shared prefixes) — enough to exercise every code path.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Words the tokenizers must know as whole pieces so label words get distinct first sub-words.
LABEL_WORDS = [
    "entailment", "not_entailment", "neutral", "contradiction", "acceptable", "unacceptable",
    "positive", "negative", "equivalent", "not_equivalent", "duplicate", "not_duplicate",
]


def glue_sentences(glue_dir: Path, limit: int = 3000) -> list[str]:
    """A few thousand real sentences plus the template words, to train the tokenizers on."""
    lines: list[str] = []
    with open(glue_dir / "RTE" / "train.tsv", encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            lines.extend(row[1:3])
            if len(lines) > limit:
                break
    extra = "rte sst2 qnli mnli qqp stsb mrpc cola wnli sentence1: sentence2: sentence: question: hypothesis: premise: question1: question2: answer:"
    return lines + [extra] * 50 + [" ".join(LABEL_WORDS)] * 200


def build_tiny_t5(folder: Path, glue_dir: Path, *, tie_word_embeddings: bool = True, seed: int = 0,
                  **shape: int) -> Path:
    """A 2-layer random T5 with a sentencepiece vocabulary trained on GLUE text.

    ``shape`` overrides T5Config sizes (benchmarks/inference.py builds a t5-base-shaped model this way).
    """
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    text_file = folder / "corpus.txt"
    text_file.write_text("\n".join(glue_sentences(glue_dir)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(folder / "spiece"), vocab_size=1000,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=[], model_type="unigram",
        character_coverage=1.0, minloglevel=2,
    )
    text_file.unlink()
    # T5Tokenizer(vocab_file=...) is broken in transformers 5.x; from_pretrained on the folder works.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>",
    }))
    T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(seed)
    sizes = {"vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3,
             "num_heads": 4, **shape}
    config = T5Config(
        **sizes, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=tie_word_embeddings,
        feed_forward_proj="relu" if tie_word_embeddings else "gated-gelu", dropout_rate=0.0,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def build_tiny_gpt2(folder: Path, glue_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer random GPT-2 with a byte-level BPE trained on GLUE text."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(glue_sentences(glue_dir), vocab_size=800, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
