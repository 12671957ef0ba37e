"""Tiny random T5 encoders saved with save_pretrained (the tiny BERT comes from tests/conftest.py)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """Directory of a tiny random T5ForConditionalGeneration (encoder and decoder, as t5-base checkpoints are) plus
    the MiniLM tokenizer, written by recipes/tiny_t5.py."""
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "recipes" / "tiny_t5.py"))
    return str(script["save_tiny_t5"](tmp_path_factory.mktemp("tiny-t5")))
