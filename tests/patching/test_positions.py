"""extend_position_embeddings: tiled copies of the learned table, RoBERTa's padding offset, buffers and config."""

from __future__ import annotations

import pytest
import torch
import transformers

from topk_lightning import TopKConfig, apply_topk, extend_position_embeddings

from .tiny_models import tiny_model


@pytest.mark.parametrize("family", ["bert", "electra", "albert", "distilbert"])
def test_table_is_tiled_and_model_runs_at_twice_the_length(family):
    model = tiny_model(family)
    old = model.embeddings.position_embeddings.weight.detach().clone()
    assert extend_position_embeddings(model, 128) is model
    new = model.embeddings.position_embeddings.weight
    assert new.shape == (128, old.shape[1])
    torch.testing.assert_close(new[:64], old, atol=0, rtol=0)
    torch.testing.assert_close(new[64:], old, atol=0, rtol=0)
    assert new.requires_grad
    assert model.config.max_position_embeddings == 128
    assert torch.equal(model.embeddings.position_ids, torch.arange(128)[None])
    if hasattr(model.embeddings, "token_type_ids"):
        assert model.embeddings.token_type_ids.shape == (1, 128)
        assert "embeddings.token_type_ids" not in model.state_dict()
    apply_topk(model, TopKConfig(topk=8))
    output = model(input_ids=torch.randint(2, 100, (1, 128))).last_hidden_state
    assert output.shape == (1, 128, 32) and torch.isfinite(output).all()


def test_partial_copy_when_not_a_multiple():
    model = tiny_model("bert")
    old = model.embeddings.position_embeddings.weight.detach().clone()
    extend_position_embeddings(model, 100)
    new = model.embeddings.position_embeddings.weight
    assert new.shape[0] == 100
    torch.testing.assert_close(new[64:], old[:36], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_offset_keeps_reserved_rows(family):
    model = tiny_model(family)  # 66 rows = 2 reserved (padding_idx 1) + 64 positions
    old = model.embeddings.position_embeddings.weight.detach().clone()
    extend_position_embeddings(model, 128)
    new = model.embeddings.position_embeddings.weight
    assert new.shape[0] == 130 and model.config.max_position_embeddings == 130
    assert model.embeddings.position_embeddings.padding_idx == 1
    torch.testing.assert_close(new[:66], old, atol=0, rtol=0)
    torch.testing.assert_close(new[66:130], old[2:66], atol=0, rtol=0)
    output = model(input_ids=torch.randint(2, 100, (1, 128))).last_hidden_state
    assert torch.isfinite(output).all()


def test_no_op_when_long_enough():
    model = tiny_model("roberta")
    table = model.embeddings.position_embeddings
    extend_position_embeddings(model, 64)
    assert model.embeddings.position_embeddings is table and model.config.max_position_embeddings == 66


def test_models_without_a_learned_table_are_rejected():
    model = tiny_model("distilbert", sinusoidal_pos_embds=True)
    with pytest.raises(ValueError, match="DistilBertModel uses sinusoidal"):
        extend_position_embeddings(model, 128)
    config = transformers.DebertaV2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        position_biased_input=False,
    )
    with pytest.raises(ValueError, match="DebertaV2Model has no learned absolute position table"):
        extend_position_embeddings(transformers.DebertaV2Model(config), 1024)
    with pytest.raises(ValueError, match="max_positions must be an int >= 1"):
        extend_position_embeddings(tiny_model("bert"), 0)
