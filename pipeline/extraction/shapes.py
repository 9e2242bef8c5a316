"""Randomly initialised backbones of a named shape: measuring at scale where no checkpoint can be had.

Speed and memory do not depend on the weights' values, so a random model of t5-base's shape costs the
same FLOPs and bytes per token as t5-base and serves every throughput and memory figure. Its
predictions are meaningless: never use one for a quality claim.

    python -m pipeline.extraction.shapes --shape t5-base --out models/t5-base-random --glue-dir DIR
    python -m pipeline.extraction.shapes --shape t5-base --out DIR --tokenizer FOLDER   # reuse a tokenizer

The tokenizer is copied from ``--tokenizer`` (any folder ``AutoTokenizer`` loads) or trained on GLUE
training text (sentencepiece unigram for T5, WordPiece for BERT, byte-level BPE for GPT-2), with the
GLUE label words kept whole so label words get distinct first sub-words, as in a real vocabulary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.tasks import TASKS

# Words a trained tokenizer must keep whole: the label words and the T5 template words.
LABEL_WORDS = sorted({word for task in TASKS.values() for word in task.label_words})
TEMPLATE_WORDS = [f"{name}" for name in TASKS] + ["sentence1:", "sentence2:", "sentence:", "question:",
                                                   "hypothesis:", "premise:", "question1:", "question2:", "answer:"]


@dataclass(frozen=True)
class Shape:
    """A published architecture: its family, config class and sizes, and the tokenizer to train for it."""

    family: str  # seq2seq | encoder | decoder
    config: dict[str, Any]  # keyword arguments of the transformers config class
    tokenizer_vocab: int  # pieces of a tokenizer trained on GLUE text (at most the model's vocab_size)


SHAPES: dict[str, Shape] = {
    # t5-base (v1.0): 12+12 layers, d=768, ReLU feed-forward, tied embeddings (so the LM head scales by d**-0.5).
    "t5-base": Shape("seq2seq", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                     num_decoder_layers=12, num_heads=12, feed_forward_proj="relu",
                                     tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                                     eos_token_id=1), 16000),
    # bert-base-uncased: 12 layers, d=768.
    "bert-base": Shape("encoder", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                       num_attention_heads=12, intermediate_size=3072), 16000),
    # gpt2 (124M): 12 layers, d=768.
    "gpt2": Shape("decoder", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                  bos_token_id=0, eos_token_id=0), 16000),
    # Tiny shapes of each family, for tests.
    "t5-tiny": Shape("seq2seq", dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                     num_decoder_layers=3, num_heads=4, feed_forward_proj="relu",
                                     tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                                     eos_token_id=1, dropout_rate=0.0), 1000),
    "bert-tiny": Shape("encoder", dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64), 960),  # + label words
    "gpt2-tiny": Shape("decoder", dict(vocab_size=800, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                       bos_token_id=0, eos_token_id=0), 800),
}


def glue_text(glue_dir: str | Path, limit: int = 20000) -> list[str]:
    """Real GLUE sentences (RTE, SST-2, CoLA training text) plus the words a vocabulary must keep whole."""
    lines: list[str] = []
    sources = [("RTE", (1, 2), True), ("SST-2", (0,), True), ("CoLA", (3,), False)]  # text columns
    for folder, columns, header in sources:
        path = Path(glue_dir) / folder / "train.tsv"
        if not path.is_file():
            continue
        taken: list[str] = []
        with open(path, encoding="utf-8") as handle:
            rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            if header:
                next(rows, None)
            for row in rows:
                taken.extend(row[c] for c in columns if c < len(row))
                if len(taken) >= limit // len(sources):
                    break
        lines.extend(taken)
    if not lines:
        raise FileNotFoundError(f"no GLUE training text under {glue_dir} (expected RTE/train.tsv, ...)")
    return lines + [" ".join(TEMPLATE_WORDS)] * 50 + [" ".join(LABEL_WORDS)] * 200


def train_tokenizer(shape: Shape, texts: list[str], folder: Path) -> Any:
    """A tokenizer for the shape's family, trained on ``texts``, saved into ``folder``."""
    if shape.family == "seq2seq":
        import sentencepiece as spm
        from transformers import T5TokenizerFast

        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus.write_text("\n".join(texts), encoding="utf-8")
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=shape.tokenizer_vocab,
                pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0,
                minloglevel=2, user_defined_symbols=LABEL_WORDS,
            )
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<pad>",
        }))
        tokenizer = T5TokenizerFast.from_pretrained(folder)
    elif shape.family == "encoder":
        from tokenizers import BertWordPieceTokenizer
        from transformers import BertTokenizerFast

        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(texts, vocab_size=shape.tokenizer_vocab)
        wordpiece.add_tokens(LABEL_WORDS)
        tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", sep_token="[SEP]",
                                      pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    else:
        from tokenizers import ByteLevelBPETokenizer
        from transformers import GPT2TokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=shape.tokenizer_vocab, special_tokens=["<|endoftext|>"])
        tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_random_backbone(shape_name: str, out: str | Path, *, glue_dir: str | Path | None = None,
                          tokenizer: str | Path | None = None, seed: int = 0,
                          overrides: dict[str, Any] | None = None) -> Path:
    """Write a Hugging Face folder (config, random weights, tokenizer) of a named shape; returns it.

    ``overrides`` changes config entries (e.g. ``tie_word_embeddings=False`` for a T5 v1.1-like head).
    """
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    if tokenizer is not None and not Path(tokenizer).is_dir():  # from_pretrained would take it for a Hub name
        raise ValueError(f"--tokenizer {tokenizer}: no such folder (a folder with a saved tokenizer, e.g. a model's)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        loaded = AutoTokenizer.from_pretrained(str(tokenizer))
        loaded.save_pretrained(out)
        for extra in ("spiece.model",):  # the slow T5 tokenizer's file, when the source has it
            if (Path(tokenizer) / extra).is_file():
                shutil.copy2(Path(tokenizer) / extra, out / extra)
    else:
        directory = glue_dir or os.environ.get("GLUE_DIR")
        if not directory:
            raise ValueError("give --tokenizer FOLDER or --glue-dir DIR (GLUE text to train a tokenizer on)")
        loaded = train_tokenizer(shape, glue_text(directory), out)
    config_class, model_class = {
        "seq2seq": (T5Config, T5ForConditionalGeneration),
        "encoder": (BertConfig, BertModel),
        "decoder": (GPT2Config, GPT2LMHeadModel),
    }[shape.family]
    settings = {**shape.config, **(overrides or {})}
    if len(loaded) > settings["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(loaded)} pieces, more than the {shape_name} vocabulary "
                         f"({settings['vocab_size']})")
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    model.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {shape_name}, random weights\n\nThe published {shape_name} architecture with randomly initialised "
        f"weights (seed {seed}), built by `python -m pipeline.extraction.shapes`. It costs the same FLOPs and "
        "bytes per token as the real model, so it serves speed and memory measurements; its predictions are "
        "meaningless.\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="the architecture to build")
    parser.add_argument("--out", required=True, help="folder to write (a Hugging Face model folder)")
    parser.add_argument("--tokenizer", default=None, help="a folder whose tokenizer to copy")
    parser.add_argument("--glue-dir", default=None, help="GLUE data to train a tokenizer on [default: $GLUE_DIR]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    try:
        path = build_random_backbone(args.shape, args.out, glue_dir=args.glue_dir, tokenizer=args.tokenizer,
                                     seed=args.seed)
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
