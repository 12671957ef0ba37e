"""topk_attention against an independent dense reference in float64 (ops/reference.py), plus gradcheck."""

import pytest
import torch

from topk_lightning.ops import dense_attention, topk_attention
from topk_lightning.ops.torch_backend import select_topk


def _inputs(batch=2, heads=4, kv_heads=2, q_len=19, k_len=23, dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def _grads(out, tensors, seed=1):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, grad, allow_unused=True)


def _assert_matches(a_out, a_grads, b_out, b_grads, atol):
    torch.testing.assert_close(a_out, b_out, atol=atol, rtol=0)
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_topk_at_least_length_is_exact_dense_attention_fp64(causal, chunk):
    q, k, v = _inputs()
    out = topk_attention(q, k, v, topk=23, query_chunk_size=chunk, causal=causal)
    ref = dense_attention(q, k, v, causal=causal)
    _assert_matches(out, _grads(out, (q, k, v)), ref, _grads(ref, (q, k, v)), atol=1e-10)


def test_topk_larger_than_length_is_exact_fp32():
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(k_len=40, q_len=33))
    out = topk_attention(q, k, v, topk=1000, query_chunk_size=8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    _assert_matches(out, _grads(out, (q, k, v)), ref, _grads(ref, (q, k, v)), atol=1e-5)


@pytest.mark.parametrize("topk", [1, 3, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_small_topk_equals_dense_scores_keep_topk_softmax(topk, causal):
    q, k, v = _inputs()
    mask = torch.rand(2, 23, generator=torch.Generator().manual_seed(3)) > 0.3
    bias = torch.randn(1, 4, 19, 23, dtype=torch.float64, requires_grad=True)
    out = topk_attention(q, k, v, topk=topk, query_chunk_size=4, key_padding_mask=mask, bias=bias, causal=causal)
    ref = dense_attention(q, k, v, topk=topk, key_padding_mask=mask, bias=bias, causal=causal)
    _assert_matches(
        out, _grads(out, (q, k, v, bias)), ref, _grads(ref, (q, k, v, bias)), atol=1e-10
    )


def test_long_rows_use_the_grouped_selection_and_stay_exact():
    # Lk >= 32 * topk switches select_topk to the two-stage grouped search.
    q, k, v = _inputs(batch=1, heads=2, kv_heads=1, q_len=9, k_len=512, dim=4)
    out = topk_attention(q, k, v, topk=4, query_chunk_size=3)
    ref = dense_attention(q, k, v, topk=4)
    _assert_matches(out, _grads(out, (q, k, v)), ref, _grads(ref, (q, k, v)), atol=1e-10)


@pytest.mark.parametrize("length", [64, 1024, 4096])
def test_select_topk_returns_the_true_top_values(length):
    scores = torch.randn(3, 5, length, generator=torch.Generator().manual_seed(length))
    values, index = select_topk(scores, 16)
    expected = scores.topk(16, dim=-1).values
    torch.testing.assert_close(values.sort(-1, descending=True).values, expected, atol=0, rtol=0)
    torch.testing.assert_close(scores.gather(-1, index), values, atol=0, rtol=0)


@pytest.mark.parametrize("shape", ["full", "per_head_keys", "per_batch_keys", "keys_only"])
def test_bias_broadcast_shapes_and_their_gradients(shape):
    q, k, v = _inputs(batch=2, heads=2, kv_heads=2, q_len=6, k_len=7)
    shapes = {"full": (2, 2, 6, 7), "per_head_keys": (2, 1, 7), "per_batch_keys": (2, 1, 1, 7), "keys_only": (7,)}
    bias = torch.randn(shapes[shape], dtype=torch.float64, requires_grad=True)
    out = topk_attention(q, k, v, topk=3, query_chunk_size=4, bias=bias)
    ref = dense_attention(q, k, v, topk=3, bias=bias)
    _assert_matches(out, _grads(out, (q, k, v, bias)), ref, _grads(ref, (q, k, v, bias)), atol=1e-10)


def test_gradcheck_small_shapes_with_mask_bias_and_causal():
    q, k, v = _inputs(batch=1, heads=2, kv_heads=1, q_len=5, k_len=6, dim=3)
    mask = torch.tensor([[True, True, False, True, True, True]])
    bias = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, bias):
        return topk_attention(q, k, v, topk=3, query_chunk_size=2, key_padding_mask=mask, bias=bias, causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_fully_masked_rows_give_zeros_not_nan_forward_and_backward():
    q, k, v = _inputs(batch=2, heads=2, kv_heads=2, q_len=4, k_len=5)
    mask = torch.tensor([[False] * 5, [True, False, True, False, False]])
    out = topk_attention(q, k, v, topk=3, key_padding_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    grads = _grads(out, (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
    # causal with Lq > Lk: the first rows see no key at all
    out = topk_attention(q[:, :, :4], k[:, :, :2], v[:, :, :2], topk=2, causal=True)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert all(torch.isfinite(g).all() for g in _grads(out, (q, k, v)) if g is not None)


def test_padding_keys_never_influence_the_output():
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, q_len=6, k_len=8)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    out = topk_attention(q, k, v, topk=2, key_padding_mask=mask)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 5:] = 100.0  # would dominate every row if it were attended
    v2[:, :, 5:] = -7.0
    torch.testing.assert_close(out, topk_attention(q, k2, v2, topk=2, key_padding_mask=mask), atol=0, rtol=0)


def test_dropout_is_replayed_exactly_in_backward():
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, q_len=7, k_len=9)
    p_drop = 0.4
    out = topk_attention(q, k, v, topk=4, dropout_p=p_drop, query_chunk_size=3)
    # Rebuild the op's dropout as a dense keep-mask from what it saved, then differentiate a dense reference.
    _, _, _, index, _, dropped, _ = out.grad_fn.saved_tensors
    grads = _grads(out, (q, k, v))
    assert dropped.any() and not dropped.all()
    keep = torch.ones(1, 2, 7, 9, dtype=torch.float64)
    keep.scatter_(-1, index.long(), (~dropped).double())
    scores = torch.matmul(q, k.transpose(-1, -2)) * 8**-0.5
    kth = scores.topk(4, dim=-1).values[..., -1:]
    probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
    ref = torch.matmul(probs * keep / (1 - p_drop), v)
    _assert_matches(out, grads, ref, _grads(ref, (q, k, v)), atol=1e-10)
    assert not torch.allclose(out, topk_attention(q, k, v, topk=4)), "dropout had no effect"


def test_bfloat16_inputs_and_cpu_autocast():
    q, k, v = (t.detach().float() for t in _inputs(q_len=16, k_len=16))
    ref = dense_attention(q.double(), k.double(), v.double(), topk=5).float()
    out_bf16 = topk_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), topk=5)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), ref, atol=5e-2, rtol=0)
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = topk_attention(qa, ka, va, topk=5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)
    out.float().sum().backward()
    assert qa.grad is not None and qa.grad.dtype == torch.float32 and torch.isfinite(qa.grad).all()


def test_saved_state_is_linear_in_length():
    # Backward keeps q, k, v, int32 indices and fp32 probabilities: nothing of size Lq x Lk.
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(batch=1, heads=2, kv_heads=2, q_len=256,
                                                                      k_len=256, dim=8))
    out = topk_attention(q, k, v, topk=4, query_chunk_size=32)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) <= 2 * 256 * 8
    index = saved[3]
    assert index.dtype == torch.int32 and tuple(index.shape) == (1, 2, 256, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"topk": 0}, "topk must be a positive int, got 0"),
        ({"topk": 2, "query_chunk_size": 0}, "query_chunk_size must be a positive int, got 0"),
        ({"topk": 2, "dropout_p": 1.0}, "dropout_p must be in"),
        ({"topk": 2, "key_padding_mask": torch.ones(2, 3, dtype=torch.bool)}, r"key_padding_mask must be .*\(2, 23\)"),
        ({"topk": 2, "key_padding_mask": torch.ones(2, 23)}, "key_padding_mask must be a bool tensor"),
        ({"topk": 2, "bias": torch.zeros(3, 1, 1, 1)}, "bias must be a float tensor broadcastable"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=match):
        topk_attention(q, k, v, **kwargs)


def test_bad_shapes_and_dtypes_raise_value_errors():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="key/value heads"):
        topk_attention(q, k[:, :1].expand(2, 3, 23, 8), v[:, :1].expand(2, 3, 23, 8), topk=2)
    with pytest.raises(ValueError, match="share a dtype"):
        topk_attention(q, k.float(), v.float(), topk=2)
    with pytest.raises(ValueError, match="4-D tensor"):
        topk_attention(q[0], k, v, topk=2)
    with pytest.raises(ValueError, match="same shape"):
        topk_attention(q, k, v[:, :, :5], topk=2)


def test_score_tiles_follow_the_device_budget_and_the_chunk_bound(monkeypatch):
    from topk_lightning.ops import torch_backend

    scores = torch.empty(0, dtype=torch.float32)  # only its device and element size matter
    monkeypatch.delenv(torch_backend.SCORE_BUDGET_ENV, raising=False)
    cpu_elements = torch_backend.SCORE_BUDGET_BYTES["cpu"] // 4
    assert torch_backend.rows_per_tile(1, 12, 8192, 1024, scores) == cpu_elements // (12 * 8192)
    assert torch_backend.rows_per_tile(1, 12, 64, 100, scores) == 100  # query_chunk_size stays the upper bound
    assert torch_backend.rows_per_tile(4, 12, 1 << 20, 1024, scores) == 1  # never fewer than one row
    monkeypatch.setenv(torch_backend.SCORE_BUDGET_ENV, "1")
    assert torch_backend.rows_per_tile(1, 1, 1024, 4096, scores) == (1 << 20) // 4 // 1024
    monkeypatch.setenv(torch_backend.SCORE_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="TOPK_LIGHTNING_SCORE_BUDGET_MB must be a positive number of MiB, got 'lots'"):
        torch_backend.rows_per_tile(1, 1, 1024, 4096, scores)


def test_small_score_budget_gives_the_same_result(monkeypatch):
    q, k, v = _inputs(q_len=40, k_len=50)
    expected = topk_attention(q, k, v, topk=5)
    monkeypatch.setenv("TOPK_LIGHTNING_SCORE_BUDGET_MB", "0.001")  # ~2 rows per tile
    torch.testing.assert_close(topk_attention(q, k, v, topk=5), expected, atol=1e-12, rtol=0)
