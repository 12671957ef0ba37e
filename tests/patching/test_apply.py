"""apply_topk / remove_topk on tiny models of every supported family, compared with the same model under "sdpa"."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers

from topk_lightning import TopKConfig, apply_topk, remove_topk
from topk_lightning.patching.apply import PatchedFeedForward
from topk_lightning.patching.attention import LAYER_SETTINGS_ATTR
from topk_lightning.patching.families import FAMILIES as FAMILY_TABLE

from .tiny_models import (
    PAD_FROM,
    SEQ_LEN,
    hidden,
    max_diff_unpadded,
    padded_batch,
    register_dense_topk_reference,
    tiny_model,
    weighted_loss,
)


def _patched_feed_forwards(model) -> list[PatchedFeedForward]:
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, PatchedFeedForward)]


def _backward_and_grads(model, batch):
    output = hidden(model, batch)
    weighted_loss(output, batch["attention_mask"]).backward()
    return output, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(grads, reference_grads):
    assert sorted(grads) == sorted(reference_grads)  # the same parameters receive gradients
    projections = (".query.", "q_lin", "Attention.q.")  # BERT-like, DistilBERT, T5
    assert any(q in name for name in grads for q in projections), "no gradient reached the attention"
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_exact_when_topk_covers_all_keys_with_gradients(family):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference, reference_grads = _backward_and_grads(copy.deepcopy(model), batch)
    apply_topk(model, TopKConfig(topk=SEQ_LEN))
    assert model.config._attn_implementation == "topk"
    output, grads = _backward_and_grads(model, batch)
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) < 1e-5
    _assert_same_gradients(grads, reference_grads)


@pytest.mark.parametrize("topk", [1, 4])
def test_small_topk_matches_a_dense_topk_reference_with_gradients(family, topk):
    """k below the 16 keys (and chunks of 5 queries that do not divide 16): outputs and parameter gradients equal
    those of the same model whose attention keeps each query's k best keys in a plain dense computation."""
    model = tiny_model(family)
    batch = padded_batch(family)
    reference_model = copy.deepcopy(model)
    reference_model.set_attn_implementation(register_dense_topk_reference(topk))
    reference, reference_grads = _backward_and_grads(reference_model, batch)
    apply_topk(model, TopKConfig(topk=topk, query_chunk_size=5))
    output, grads = _backward_and_grads(model, batch)
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) < 1e-5
    _assert_same_gradients(grads, reference_grads)


@pytest.mark.parametrize("ff_topk", [None, 24])
def test_backends_agree_through_the_bridge_in_training_mode(ff_topk):
    # The Triton kernels (Triton's interpreter without a GPU) and the PyTorch backend compute the same model,
    # dropout aside: a tiny BERT in train mode with dropout off, small k, padding, a randomly weighted loss.
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = tiny_model("bert", attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0).to(device).train()
    batch = {name: t.to(device) for name, t in padded_batch("bert").items()}
    weight = torch.randn(2, SEQ_LEN, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for backend in ("torch", "triton"):
        model = apply_topk(copy.deepcopy(base), TopKConfig(topk=3, ff_topk=ff_topk, backend=backend))
        loss = (hidden(model, batch) * weight * batch["attention_mask"][..., None]).sum()
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_k, loss_t, atol=1e-4, rtol=1e-5)
    assert grads_k.keys() == grads_t.keys()
    assert any(".key." in name for name in grads_k)
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], atol=1e-4, rtol=1e-3, msg=name)


def test_small_topk_differs(family):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference = hidden(model, batch)
    output = hidden(apply_topk(model, TopKConfig(topk=2)), batch)
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) > 1e-3


def test_remove_topk_restores_exactly(family):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference = hidden(model, batch)
    apply_topk(model, TopKConfig(topk=2, ff_topk=4, ff_chunk_size=5))
    assert _patched_feed_forwards(model)
    remove_topk(model)
    assert model.config._attn_implementation == "sdpa"
    assert not _patched_feed_forwards(model)
    assert not any(hasattr(m, LAYER_SETTINGS_ATTR) for m in model.modules())
    torch.testing.assert_close(hidden(model, batch), reference, atol=0, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_topk_none_patches_only_the_feed_forward_layers(implementation):
    model = tiny_model("bert", attn_implementation=implementation)
    batch = padded_batch("bert")
    reference = hidden(model, batch)
    apply_topk(model, TopKConfig(topk=None, ff_topk=4, ff_chunk_size=5))
    assert model.config._attn_implementation == implementation  # attention untouched
    assert not any(hasattr(m, LAYER_SETTINGS_ATTR) for m in model.modules())
    assert len(_patched_feed_forwards(model)) == 2
    assert max_diff_unpadded(hidden(model, batch), reference, batch["attention_mask"]) > 1e-3  # ff_topk=4 of 64 units
    remove_topk(model)
    assert model.config._attn_implementation == implementation and not _patched_feed_forwards(model)
    torch.testing.assert_close(hidden(model, batch), reference, atol=0, rtol=0)


def test_remove_topk_restores_eager():
    model = tiny_model("bert", attn_implementation="eager")
    remove_topk(apply_topk(model, TopKConfig(topk=4)))
    assert model.config._attn_implementation == "eager"


def test_ff_chunk_size_is_exact(family):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference = hidden(model, batch)
    output = hidden(apply_topk(model, TopKConfig(topk=SEQ_LEN, ff_chunk_size=5)), batch)
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) < 1e-5


@pytest.mark.parametrize("ff_topk", [64, 1000])
def test_ff_topk_covering_all_units_is_exact(family, ff_topk):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference = hidden(model, batch)
    output = hidden(apply_topk(model, TopKConfig(topk=SEQ_LEN, ff_topk=ff_topk)), batch)
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) < 1e-5


def test_small_ff_topk_differs_and_chunking_it_is_exact(family):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference = hidden(model, batch)
    topk_ff = hidden(apply_topk(model, TopKConfig(topk=SEQ_LEN, ff_topk=4)), batch)
    assert max_diff_unpadded(topk_ff, reference, batch["attention_mask"]) > 1e-3
    chunked = hidden(apply_topk(model, TopKConfig(topk=SEQ_LEN, ff_topk=4, ff_chunk_size=5)), batch)
    assert max_diff_unpadded(chunked, topk_ff, batch["attention_mask"]) < 1e-5


def test_padding_is_respected(family):
    """Changing the ids of padded tokens must not change any unpadded output: the mask reaches top-k attention."""
    model = apply_topk(tiny_model(family), TopKConfig(topk=4))
    batch = padded_batch(family)
    output = hidden(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1, PAD_FROM:] = torch.arange(50, 50 + SEQ_LEN - PAD_FROM)
    assert max_diff_unpadded(hidden(model, changed), output, batch["attention_mask"]) < 1e-6


def test_only_chosen_layers_change(family):
    model = tiny_model(family)
    batch = padded_batch(family)
    reference = model(**batch, output_hidden_states=True).hidden_states
    apply_topk(model, TopKConfig(topk=2, ff_topk=4, layers=[1]))
    assert len(_patched_feed_forwards(model)) == 1
    states = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    assert max_diff_unpadded(states[1], reference[1], mask) < 1e-5
    assert max_diff_unpadded(states[2], reference[2], mask) > 1e-3


def test_layer_index_out_of_range(family):
    with pytest.raises(ValueError, match=r"TopKConfig.layers .*\[2\].*valid indices 0\.\.1"):
        apply_topk(tiny_model(family), TopKConfig(layers=[0, 2]))


def test_albert_layers_are_weight_owning_modules():
    """Default ALBERT shares one layer module across all depths: only index 0 exists, and it patches every depth."""
    model = tiny_model("albert", num_hidden_groups=1)
    with pytest.raises(ValueError, match="1 ALBERT layer modules"):
        apply_topk(model, TopKConfig(layers=[1]))
    batch = padded_batch("albert")
    reference = model(**batch, output_hidden_states=True).hidden_states
    states = apply_topk(model, TopKConfig(topk=2, layers=[0]))(**batch, output_hidden_states=True).hidden_states
    assert max_diff_unpadded(states[1], reference[1], batch["attention_mask"]) > 1e-3


def test_task_heads_are_patched_too():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertForQuestionAnswering(config).eval()
    batch = padded_batch("bert")
    reference = model(**batch).start_logits
    apply_topk(model, TopKConfig(topk=SEQ_LEN, ff_chunk_size=4))
    assert model.bert.config._attn_implementation == "topk"
    assert max_diff_unpadded(model(**batch).start_logits, reference, batch["attention_mask"]) < 1e-5


def test_causal_decoder_matches_sdpa():
    model = tiny_model("bert", is_decoder=True)
    assert model.encoder.layer[0].attention.self.is_causal
    batch = padded_batch("bert")
    reference = hidden(model, batch)
    output = hidden(apply_topk(model, TopKConfig(topk=SEQ_LEN)), batch)
    assert max_diff_unpadded(output, reference, batch["attention_mask"]) < 1e-5


def test_unsupported_architecture_names_the_class():
    config = transformers.DebertaV2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = transformers.DebertaV2Model(config)
    with pytest.raises(ValueError, match="DebertaV2Model.*not supported"):
        apply_topk(model, TopKConfig())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_topk(torch.nn.Linear(2, 2), TopKConfig())


def test_family_table_model_types_are_real():
    for model_type in FAMILY_TABLE:
        assert model_type in transformers.CONFIG_MAPPING


def test_patched_model_survives_deepcopy_and_pickle():
    model = apply_topk(tiny_model("bert"), TopKConfig(topk=4, ff_topk=8, ff_chunk_size=5))
    batch = padded_batch("bert")
    output = hidden(model, batch)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(hidden(clone, batch), output, atol=0, rtol=0)
        patched = _patched_feed_forwards(clone)
        assert {id(p.owner) for p in patched} == {id(layer) for layer in clone.encoder.layer}
        with torch.no_grad():
            clone.encoder.layer[0].output.dense.weight.zero_()
        assert max_diff_unpadded(hidden(clone, batch), output, batch["attention_mask"]) > 1e-3
        remove_topk(clone)
        assert not _patched_feed_forwards(clone) and clone.config._attn_implementation == "sdpa"


def test_remove_topk_on_a_model_loaded_as_topk_switches_to_sdpa():
    model = tiny_model("roberta", attn_implementation="topk")
    assert remove_topk(model).config._attn_implementation == "sdpa"
    assert remove_topk(model).config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="PreTrainedModel"):
        remove_topk(torch.nn.Linear(2, 2))
