"""The lazy T5 relative position bias of topk_attention, against transformers' own T5 code in float64.

References: ``T5Attention._relative_position_bucket`` / ``compute_bias`` (the bias) and T5's ``eager_attention_forward``
(the attention); ops.dense_attention with the materialised bias for top-k below the length.
"""

import pytest
import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention, eager_attention_forward

from topk_lightning.ops import dense_attention, resolve_backend, topk_attention
from topk_lightning.ops.relative_bias import RelativePositionBias, relative_position_bucket


def _t5_attention(*, is_decoder: bool, num_buckets: int, max_distance: int, heads: int = 4) -> T5Attention:
    config = T5Config(d_model=16, d_kv=4, num_heads=heads, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=max_distance, is_decoder=is_decoder)
    torch.manual_seed(0)
    module = T5Attention(config, has_relative_attention_bias=True, layer_idx=0).double()
    torch.nn.init.normal_(module.relative_attention_bias.weight)
    return module


def _lazy(module: T5Attention, query_offset: int = 0) -> RelativePositionBias:
    return RelativePositionBias(
        weight=module.relative_attention_bias.weight, bidirectional=not module.is_decoder,
        num_buckets=module.relative_attention_num_buckets, max_distance=module.relative_attention_max_distance,
        query_offset=query_offset,
    )


def _qkv(batch=2, heads=4, kv_heads=4, q_len=21, k_len=21, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
            for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len))]


def _grads(out, tensors, seed=1):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, grad)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20), (10, 13), (6, 40)])
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-600, 601)
    expected = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    got = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                                   max_distance=max_distance)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize(("q_len", "k_len", "past"), [(13, 13, 0), (1, 30, 29), (4, 9, 5), (7, 40, 0)])
def test_dense_bias_equals_compute_bias(is_decoder, q_len, k_len, past):
    module = _t5_attention(is_decoder=is_decoder, num_buckets=8, max_distance=12)
    expected = module.compute_bias(q_len, k_len, past_seen_tokens=past)
    torch.testing.assert_close(_lazy(module, past).dense(q_len, k_len), expected, atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_encoder_attention_equals_t5_eager_fp64(chunk):
    """Bidirectional buckets with key padding at topk >= L: outputs and all gradients, the embedding's included."""
    module = _t5_attention(is_decoder=False, num_buckets=8, max_distance=12)
    weight = module.relative_attention_bias.weight
    q, k, v = _qkv()
    padding = torch.ones(2, 21, dtype=torch.bool)
    padding[1, 15:] = False
    additive = torch.zeros(2, 1, 1, 21, dtype=torch.float64).masked_fill(~padding[:, None, None, :], -1e300)

    expected, _ = eager_attention_forward(module, q, k, v, additive, scaling=1.0,
                                          position_bias=module.compute_bias(21, 21))
    got = topk_attention(q, k, v, topk=21, query_chunk_size=chunk, scale=1.0, key_padding_mask=padding,
                         position_bias=_lazy(module)).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    for a, b in zip(_grads(got, (q, k, v, weight)), _grads(expected, (q, k, v, weight))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("q_len", "k_len", "past"), [(17, 17, 0), (1, 23, 22), (5, 23, 18)])
def test_causal_attention_equals_t5_eager_fp64(q_len, k_len, past):
    """Decoder buckets, causal, including the KV-cache case (queries start at position ``past``)."""
    module = _t5_attention(is_decoder=True, num_buckets=8, max_distance=12)
    weight = module.relative_attention_bias.weight
    q, k, v = _qkv(q_len=q_len, k_len=k_len, kv_heads=2)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    additive = torch.zeros(1, 1, q_len, k_len, dtype=torch.float64).masked_fill(~causal, -1e300)
    k_full, v_full = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)

    expected, _ = eager_attention_forward(module, q, k_full, v_full, additive, scaling=1.0,
                                          position_bias=module.compute_bias(q_len, k_len, past_seen_tokens=past))
    got = topk_attention(q, k, v, topk=k_len, query_chunk_size=3, scale=1.0, causal=True,
                         position_bias=_lazy(module, past)).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    for a, b in zip(_grads(got, (q, k, v, weight)), _grads(expected, (q, k, v, weight))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_small_topk_keeps_the_top_scores_with_bias_and_only_they_train_the_embedding(causal):
    module = _t5_attention(is_decoder=causal, num_buckets=8, max_distance=12)
    weight = module.relative_attention_bias.weight
    lazy = _lazy(module)
    q, k, v = _qkv(q_len=19, k_len=19)
    padding = torch.rand(2, 19, generator=torch.Generator().manual_seed(3)) > 0.2
    got = topk_attention(q, k, v, topk=3, query_chunk_size=4, scale=1.0, key_padding_mask=padding, causal=causal,
                         position_bias=lazy)
    expected = dense_attention(q, k, v, topk=3, scale=1.0, key_padding_mask=padding, causal=causal,
                               bias=lazy.dense(19, 19))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    for a, b in zip(_grads(got, (q, k, v, weight)), _grads(expected, (q, k, v, weight))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_position_bias_adds_to_an_additive_bias():
    module = _t5_attention(is_decoder=False, num_buckets=8, max_distance=12)
    lazy = _lazy(module)
    q, k, v = _qkv(q_len=9, k_len=11)
    extra = torch.randn(2, 1, 1, 11, dtype=torch.float64, requires_grad=True)
    got = topk_attention(q, k, v, topk=4, query_chunk_size=4, position_bias=lazy, bias=extra)
    expected = dense_attention(q, k, v, topk=4, bias=lazy.dense(9, 11) + extra)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    for a, b in zip(_grads(got, (q, extra, module.relative_attention_bias.weight)),
                    _grads(expected, (q, extra, module.relative_attention_bias.weight))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_no_operator_builds_a_length_squared_tensor_in_forward_or_backward(largest_storage):
    length, heads, chunk, topk = 512, 2, 16, 8
    weight = torch.randn(32, heads, requires_grad=True)
    lazy = RelativePositionBias(weight=weight, bidirectional=True, num_buckets=32, max_distance=128)
    q, k, v = (torch.randn(1, heads, length, 4, requires_grad=True) for _ in range(3))
    with largest_storage() as spy:
        out = topk_attention(q, k, v, topk=topk, query_chunk_size=chunk, position_bias=lazy)
        out.sum().backward()
    # Largest: one fp32 score tile (heads x chunk x L) or the int64 kept indices (heads x L x k); the bias table
    # would be heads x L x L x 4 bytes, 16 times more.
    assert spy.largest <= heads * length * max(chunk, topk) * 8
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_bad_position_bias_is_rejected_with_the_reason():
    q, k, v = _qkv(q_len=5, k_len=5)
    with pytest.raises(ValueError, match="position_bias must be a RelativePositionBias"):
        topk_attention(q, k, v, topk=2, position_bias=torch.zeros(1, 4, 5, 5))
    three_heads = RelativePositionBias(weight=torch.zeros(8, 3), bidirectional=True, num_buckets=8, max_distance=12)
    with pytest.raises(ValueError, match="3 heads"):
        topk_attention(q, k, v, topk=2, position_bias=three_heads)
    with pytest.raises(ValueError, match="num_buckets=16"):
        RelativePositionBias(weight=torch.zeros(8, 4), bidirectional=True, num_buckets=16, max_distance=40)
    with pytest.raises(ValueError, match="max_distance must be larger"):
        RelativePositionBias(weight=torch.zeros(8, 4), bidirectional=True, num_buckets=8, max_distance=2)
    with pytest.raises(ValueError, match="query_offset"):
        RelativePositionBias(weight=torch.zeros(8, 4), bidirectional=False, num_buckets=8, max_distance=12,
                             query_offset=-1)


def test_auto_backend_runs_pytorch_and_triton_refuses_with_a_reason():
    q, k, _ = _qkv(q_len=5, k_len=5)
    lazy = RelativePositionBias(weight=torch.zeros(8, 4), bidirectional=True, num_buckets=8, max_distance=12)
    assert resolve_backend("auto", q, k, topk=2, position_bias=lazy) == "torch"
    with pytest.raises(ValueError, match="relative position_bias is supported by the PyTorch backend only"):
        resolve_backend("triton", q, k, topk=2, position_bias=lazy)
