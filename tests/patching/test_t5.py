"""The T5 family (T5, MT5, UMT5) under top-k, against transformers' own eager T5 in float64.

References: the same weights under attn_implementation="eager" (exact at topk >= L); for small top-k, transformers'
eager T5 with its attention function replaced by ops.dense_attention keeping the top k of the very scores eager
builds (its own compute_bias tensor and additive masks): `_dense_topk_reference`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from topk_lightning import TopKConfig, apply_topk, remove_topk
from topk_lightning.ops import RelativePositionBias, dense_attention

ENC_LEN, DEC_LEN = 20, 7  # cross-attention with different lengths


def _config(model_type: str = "t5", *, gated: bool = False, layers: int = 2) -> transformers.PreTrainedConfig:
    config_class = {"t5": transformers.T5Config, "mt5": transformers.MT5Config, "umt5": transformers.UMT5Config}
    return config_class[model_type](
        vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=layers, num_decoder_layers=layers,
        # 8 buckets up to distance 12: 20 tokens reach the exact, the log-spaced and the last (far) buckets.
        relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )


def _model(model_class, config, *, attn_implementation: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    return model_class._from_config(config, attn_implementation=attn_implementation).double().eval()


def _batch(model_class) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    # No token twice in a row: equal keys at distances sharing a bucket would tie at the k-th place, where the
    # choice of key is unspecified.
    input_ids = torch.stack([torch.randperm(98, generator=gen)[:ENC_LEN] + 2 for _ in range(2)])
    attention_mask = torch.ones(2, ENC_LEN, dtype=torch.long)
    attention_mask[1, 14:] = 0
    input_ids[1, 14:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "Encoder" not in model_class.__name__:
        batch["decoder_input_ids"] = torch.stack([torch.randperm(98, generator=gen)[:DEC_LEN] + 2 for _ in range(2)])
        batch["decoder_attention_mask"] = torch.ones(2, DEC_LEN, dtype=torch.long)
        batch["decoder_attention_mask"][1, 5:] = 0
    return batch


def _output(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _loss(output: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(2), dtype=output.dtype)
    return (output * weights).sum()


def _assert_same_function(model, reference, batch, atol=1e-10):
    """Outputs and the gradient of every parameter, the relative-bias embeddings included."""
    out, ref = _output(model, batch), _output(reference, batch)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    _loss(out).backward()
    _loss(ref).backward()
    reference_params = dict(reference.named_parameters())
    bias_grads = 0
    for name, param in model.named_parameters():
        expected = reference_params[name].grad
        if expected is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        torch.testing.assert_close(param.grad, expected, atol=atol, rtol=0, msg=name)
        if "relative_attention_bias" in name:
            assert expected.abs().sum() > 0, name
            bias_grads += 1
    assert bias_grads > 0, "no relative_attention_bias gradient compared"


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
@pytest.mark.parametrize(
    "model_class", [transformers.T5EncoderModel, transformers.T5Model, transformers.T5ForConditionalGeneration]
)
def test_topk_covering_every_key_equals_eager_fp64(model_class, gated):
    reference = _model(model_class, _config(gated=gated))
    model = apply_topk(copy.deepcopy(reference), TopKConfig(topk=64, query_chunk_size=3, ff_chunk_size=6))
    _assert_same_function(model, reference, _batch(model_class))


@pytest.mark.parametrize(
    ("model_type", "model_class"),
    [("mt5", transformers.MT5ForConditionalGeneration), ("umt5", transformers.UMT5ForConditionalGeneration)],
)
def test_mt5_and_umt5_equal_eager_fp64(model_type, model_class):
    reference = _model(model_class, _config(model_type, gated=True))
    model = apply_topk(copy.deepcopy(reference), TopKConfig(topk=64, query_chunk_size=4))
    _assert_same_function(model, reference, _batch(model_class))
    if model_type == "umt5":  # a bias in every self-attention layer, each trained
        names = [n for n, p in model.named_parameters() if "relative_attention_bias" in n and p.grad.any()]
        assert len(names) == 4, names


def _dense_topk_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                          **kwargs):
    """Eager T5's scores (its own position_bias tensor and additive mask), then ops.dense_attention's top-k."""
    bias = position_bias if attention_mask is None else position_bias + attention_mask
    out = dense_attention(query, key, value, topk=module.reference_topk, bias=bias, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def dense_topk_implementation():
    AttentionInterface.register("dense_topk_reference", _dense_topk_reference)
    AttentionMaskInterface.register("dense_topk_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return "dense_topk_reference"


@pytest.mark.parametrize("model_type", ["t5", "umt5"])
def test_small_topk_equals_dense_topk_of_eager_scores(model_type, dense_topk_implementation):
    """Encoder (bidirectional buckets), decoder (causal buckets) and cross-attention, with padding, topk=3."""
    model_class = getattr(transformers, f"{model_type.upper()}ForConditionalGeneration")
    model = _model(model_class, _config(model_type, gated=True))
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(dense_topk_implementation)
    for module in reference.modules():
        module.reference_topk = 3
    apply_topk(model, TopKConfig(topk=3, query_chunk_size=4))
    _assert_same_function(model, reference, _batch(model_class))


def _largest_storage(spy_class, model, batch) -> int:
    with spy_class() as spy:
        _output(model, batch).sum().backward()
    return spy.largest


def test_position_bias_is_never_materialised(largest_storage):
    """Encoder length 512, decoder 256, 4 heads, fp32: the encoder's bias table alone would be 4 MiB, the
    cross-attention zeros 2 MiB; with top-k no operator returns a tensor of even 1/8 of the table."""
    enc_len, dec_len, heads = 512, 256, 4
    config = _config()
    eager = _model(transformers.T5ForConditionalGeneration, config).float()
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 100, (1, enc_len), generator=gen),
             "decoder_input_ids": torch.randint(2, 100, (1, dec_len), generator=gen)}
    table_bytes = heads * enc_len * enc_len * 4
    assert _largest_storage(largest_storage, eager, batch) >= table_bytes  # the spy sees the table when it exists
    model = apply_topk(eager, TopKConfig(topk=16, query_chunk_size=32, ff_chunk_size=64))
    assert _largest_storage(largest_storage, model, batch) <= table_bytes // 8


def test_the_bias_reaches_attention_as_a_description(monkeypatch):
    model = apply_topk(_model(transformers.T5ForConditionalGeneration, _config()), TopKConfig(topk=4))
    seen = []
    original = transformers.models.t5.modeling_t5.T5Attention.forward

    def spy(self, hidden_states, *args, **kwargs):
        output = original(self, hidden_states, *args, **kwargs)
        seen.append((self.is_decoder, self.is_causal, output[1]))
        return output

    monkeypatch.setattr(transformers.models.t5.modeling_t5.T5Attention, "forward", spy)
    _output(model, _batch(transformers.T5ForConditionalGeneration))
    encoder = [bias for is_decoder, _, bias in seen if not is_decoder]
    decoder_self = [bias for is_decoder, causal, bias in seen if is_decoder and causal]
    cross = [bias for is_decoder, causal, bias in seen if is_decoder and not causal]
    assert all(isinstance(bias, RelativePositionBias) and bias.bidirectional for bias in encoder)
    assert all(isinstance(bias, RelativePositionBias) and not bias.bidirectional for bias in decoder_self)
    assert len(cross) == 2 and not any(isinstance(bias, torch.Tensor) for bias in cross)
    remove_topk(model)
    seen.clear()
    _output(model, _batch(transformers.T5ForConditionalGeneration))
    assert all(isinstance(bias, torch.Tensor) for _, _, bias in seen)  # transformers' own tables again


@pytest.mark.parametrize("model_type", ["t5", "umt5"])
def test_generation_with_kv_cache(model_type):
    """topk >= lengths: the same tokens as eager. Small topk: the cached steps equal recomputing every step."""
    model_class = getattr(transformers, f"{model_type.upper()}ForConditionalGeneration")
    model = _model(model_class, _config(model_type))
    batch = _batch(transformers.T5EncoderModel)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    eager_tokens = model.generate(**batch, **settings)
    apply_topk(model, TopKConfig(topk=64))
    assert torch.equal(model.generate(**batch, **settings), eager_tokens)
    apply_topk(model, TopKConfig(topk=3))
    cached = model.generate(**batch, **settings)
    assert torch.equal(cached, model.generate(**batch, **settings, use_cache=False))


def test_attn_implementation_topk_at_load(tmp_path):
    reference = _model(transformers.T5ForConditionalGeneration, _config(gated=True))
    reference.save_pretrained(tmp_path)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="topk")
    loaded = loaded.double().eval()
    assert loaded.encoder.block[0].layer[0].SelfAttention.config._attn_implementation == "topk"
    _assert_same_function(loaded, reference, _batch(transformers.T5ForConditionalGeneration))


def test_gradient_checkpointing_gives_the_same_gradients():
    reference = _model(transformers.T5ForConditionalGeneration, _config())
    model = apply_topk(copy.deepcopy(reference), TopKConfig(topk=5))
    reference = apply_topk(reference, TopKConfig(topk=5))
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert model.encoder.gradient_checkpointing
    model.train()
    reference.train()
    _assert_same_function(model, reference, _batch(transformers.T5ForConditionalGeneration))


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
def test_ff_topk_keeps_the_top_units_of_the_selecting_map(gated):
    """T5LayerFF with ff_topk=5 against the dense FF whose units outside the top 5 of wi x (gated: of the gate
    wi_0 x) are zeroed; outputs and gradients."""
    model = apply_topk(_model(transformers.T5EncoderModel, _config(gated=gated)), TopKConfig(ff_topk=5))
    layer = model.encoder.block[1].layer[-1]
    dense = layer.DenseReluDense
    hidden = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    out = layer(hidden)

    normed = layer.layer_norm(hidden)
    select = normed @ (dense.wi_0 if gated else dense.wi).weight.t()
    units = dense.act(select) * (normed @ dense.wi_1.weight.t() if gated else 1.0)
    kept = select >= select.topk(5, dim=-1).values[..., -1:]
    expected = hidden + (units * kept) @ dense.wo.weight.t()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    params = [hidden, *dense.parameters(), layer.layer_norm.weight]
    for a, b in zip(torch.autograd.grad(_loss(out), params), torch.autograd.grad(_loss(expected), params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
def test_ff_topk_covering_every_unit_is_exact(gated):
    reference = _model(transformers.T5ForConditionalGeneration, _config(gated=gated))
    model = apply_topk(copy.deepcopy(reference), TopKConfig(topk=64, ff_topk=64, ff_chunk_size=4))
    _assert_same_function(model, reference, _batch(transformers.T5ForConditionalGeneration))


def test_layers_index_encoder_blocks_then_decoder_blocks():
    model = _model(transformers.T5ForConditionalGeneration, _config())
    with pytest.raises(ValueError, match=r"\[4\].*4 T5 layer modules \(valid indices 0\.\.3\)"):
        apply_topk(model, TopKConfig(layers=[4]))
    apply_topk(model, TopKConfig(topk=2, ff_topk=4, layers=[3]))
    settings = [module.topk_lightning_attention.topk for module in
                (model.encoder.block[0].layer[0].SelfAttention, model.decoder.block[0].layer[1].EncDecAttention,
                 model.decoder.block[1].layer[0].SelfAttention, model.decoder.block[1].layer[1].EncDecAttention)]
    assert settings == [None, None, 2, 2]
    assert "forward" in vars(model.decoder.block[1].layer[-1]) and "forward" not in vars(model.encoder.block[0].layer[-1])
