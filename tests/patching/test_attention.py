"""The "topk" registration: transformers accepts the name, the mask builder hands over key padding only, and the
attention function reaches ops.topk_attention with each module's settings."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, bidirectional_mask_function

import topk_lightning
from topk_lightning import TopKConfig, apply_topk
from topk_lightning.patching.attention import key_padding_mask

from .tiny_models import SEQ_LEN, hidden, max_diff_unpadded, padded_batch, tiny_model


def test_import_registers_topk():
    attention_function = topk_lightning.patching.attention.topk_attention_forward
    assert transformers.AttentionInterface._global_mapping["topk"] is attention_function
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["topk"] is key_padding_mask


def test_mask_builder_returns_key_padding_or_none():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    out = key_padding_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=mask)
    assert out.shape == (2, 4) and out.dtype == torch.bool and torch.equal(out, mask)
    no_padding = torch.ones(2, 4, dtype=torch.bool)
    assert key_padding_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=no_padding) is None
    assert key_padding_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=None) is None


def test_model_mask_is_two_dimensional(monkeypatch):
    """What the model hands the attention function under "topk": a (B, L) bool mask, never L x L."""
    seen = []
    original = topk_lightning.ops.topk_attention

    def spy(query, key, value, **kwargs):
        seen.append(kwargs["key_padding_mask"])
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(topk_lightning.ops, "topk_attention", spy)
    model = apply_topk(tiny_model("bert"), TopKConfig(topk=4))
    batch = padded_batch("bert")
    hidden(model, batch)
    assert len(seen) == 2
    for mask in seen:
        assert mask.shape == (2, SEQ_LEN) and mask.dtype == torch.bool
        assert torch.equal(mask, batch["attention_mask"].bool())
    seen.clear()
    hidden(model, {"input_ids": batch["input_ids"]})
    assert seen == [None, None]


def test_custom_mask_overlay_is_rejected():
    overlay = and_masks(bidirectional_mask_function, lambda b, h, q, kv: kv <= q)
    with pytest.raises(NotImplementedError, match="key padding only"):
        key_padding_mask(batch_size=1, q_length=4, kv_length=4, mask_function=overlay)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_user_4d_padding_mask_is_reduced_to_key_padding(kind):
    model = apply_topk(tiny_model("bert"), TopKConfig(topk=4))
    batch = padded_batch("bert")
    reference = hidden(model, batch)
    keys = batch["attention_mask"].bool()[:, None, None, :].expand(2, 1, SEQ_LEN, SEQ_LEN)
    mask4d = keys if kind == "bool" else torch.zeros(keys.shape).masked_fill(~keys, torch.finfo(torch.float32).min)
    output = hidden(model, {"input_ids": batch["input_ids"], "attention_mask": mask4d})
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) < 1e-6


def test_user_4d_mask_broadcast_over_the_batch():
    model = apply_topk(tiny_model("bert"), TopKConfig(topk=4))
    batch = padded_batch("bert")
    padding = torch.ones(2, SEQ_LEN, dtype=torch.long)
    padding[:, -3:] = 0
    reference = hidden(model, {"input_ids": batch["input_ids"], "attention_mask": padding})
    mask4d = padding[:1].bool()[:, None, None, :].expand(1, 1, SEQ_LEN, SEQ_LEN)
    output = hidden(model, {"input_ids": batch["input_ids"], "attention_mask": mask4d})
    assert max_diff_unpadded(output, reference, padding) < 1e-6


def test_user_4d_mask_that_is_not_key_padding_is_rejected():
    model = apply_topk(tiny_model("bert"), TopKConfig(topk=4))
    batch = padded_batch("bert")
    local = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril(2).triu(-2)[None, None].expand(2, 1, -1, -1)
    with pytest.raises(ValueError, match="key-padding mask"):
        model(input_ids=batch["input_ids"], attention_mask=local)
    with pytest.raises(ValueError, match="additive bias"):
        model(input_ids=batch["input_ids"], attention_mask=torch.randn(2, 1, SEQ_LEN, SEQ_LEN))


def test_from_pretrained_with_topk_round_trip(tmp_path, monkeypatch):
    calls = []
    original = topk_lightning.ops.topk_attention

    def spy(query, key, value, **kwargs):
        calls.append(kwargs["topk"])
        return original(query, key, value, **kwargs)

    tiny_model("bert").save_pretrained(tmp_path)
    reference_model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="topk").eval()
    assert model.config._attn_implementation == "topk"
    monkeypatch.setattr(topk_lightning.ops, "topk_attention", spy)
    batch = padded_batch("bert")
    output = hidden(model, batch)
    assert calls == [TopKConfig().topk] * 2
    assert max_diff_unpadded(output, hidden(reference_model, batch), batch["attention_mask"]) < 1e-5

    # A patched model saves as a plain checkpoint and loads back as "topk".
    apply_topk(model, TopKConfig(topk=SEQ_LEN))
    model.save_pretrained(tmp_path / "patched")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "patched", attn_implementation="topk").eval()
    torch.testing.assert_close(hidden(reloaded, batch), output)


def test_set_attn_implementation_accepts_topk():
    model = tiny_model("distilbert")
    batch = padded_batch("distilbert")
    reference = hidden(model, batch)
    model.set_attn_implementation("topk")
    assert model.config._attn_implementation == "topk"
    assert max_diff_unpadded(hidden(model, batch), reference, batch["attention_mask"]) < 1e-5
    topk_lightning.remove_topk(model)
    assert model.config._attn_implementation == "sdpa"


def test_training_mode_applies_attention_dropout_on_both_paths(monkeypatch):
    """In training mode the bridge hands the module's attention dropout to top-k attention (and to SDPA in layers
    left exact); in eval mode it hands 0. Hidden-state dropout is off, so any randomness is attention dropout's."""
    seen = []
    original = topk_lightning.ops.topk_attention

    def spy(query, key, value, **kwargs):
        seen.append(kwargs["dropout_p"])
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(topk_lightning.ops, "topk_attention", spy)
    model = tiny_model("bert", attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    apply_topk(model, TopKConfig(topk=4, layers=[1]))  # layer 0 exact (SDPA), layer 1 top-k
    batch = padded_batch("bert")
    mask = batch["attention_mask"]

    def states(seed):
        torch.manual_seed(seed)
        return model(**batch, output_hidden_states=True).hidden_states

    model.train()
    first, second, again = states(0), states(1), states(0)
    assert seen == [0.5, 0.5, 0.5]  # one top-k layer, three passes
    assert max_diff_unpadded(first[1], second[1], mask) > 1e-3  # the exact layer drops attention weights
    assert max_diff_unpadded(first[2], second[2], mask) > 1e-3  # so does the top-k one
    assert max_diff_unpadded(first[2], again[2], mask) == 0.0  # the draws follow torch's seed
    seen.clear()
    model.eval()
    assert max_diff_unpadded(states(0)[2], states(1)[2], mask) == 0.0
    assert seen == [0.0, 0.0]
