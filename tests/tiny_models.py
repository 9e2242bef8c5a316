"""Tiny random backbones built on the spot: no pretrained T5 or GPT-2 can be downloaded here.

They come from the same builder as the full-size random shapes (``pipeline.extraction.shapes``): a
tokenizer trained on real GLUE text, so label words tokenize the way they would in practice, and
random weights of a tiny config — enough to exercise every code path.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.extraction.shapes import build_random_backbone


def build_tiny_t5(folder: Path, glue_dir: Path, *, tie_word_embeddings: bool = True, seed: int = 0,
                  **shape: int) -> Path:
    """A 2+3-layer random T5; untied like T5 v1.1 / Flan-T5 (gated-GELU, no output scaling) on request.

    ``shape`` overrides T5Config sizes.
    """
    overrides = {} if tie_word_embeddings else {"tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"}
    return build_random_backbone("t5-tiny", folder, glue_dir=glue_dir, seed=seed, overrides={**overrides, **shape})


def build_tiny_gpt2(folder: Path, glue_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer random GPT-2 with a byte-level BPE trained on GLUE text."""
    return build_random_backbone("gpt2-tiny", folder, glue_dir=glue_dir, seed=seed)
