"""The compiled CPU kernels (ops/cpu_kernels.py, cpu_kernels.c) against torch.topk and a dense fp64 reference.

Every test runs twice: with the library as this machine builds it (AVX-512 where the CPU has it) and with the
portable build, so both code paths are checked wherever CI runs.
"""

import pytest
import torch

from topk_lightning.ops import cpu_kernels, dense_attention, topk_attention

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the compiled kernels are off")


@pytest.fixture(params=["native", "portable"], autouse=True)
def library(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setattr(cpu_kernels, "_library", cpu_kernels.build_library(portable=True))
    return request.param


def _assert_same_selection(scores, k):
    values, index = cpu_kernels.topk_rows(scores, k)
    expected = scores.topk(k, dim=-1).values
    # Same multiset of values (ties may pick different positions), the values are the scores at the indices, and
    # no index repeats within a row.
    torch.testing.assert_close(values.sort(-1, descending=True).values, expected, atol=0, rtol=0)
    torch.testing.assert_close(scores.gather(-1, index), values, atol=0, rtol=0)
    assert bool((index.sort(-1).values.diff(dim=-1) > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("length", "k"), [(2048, 64), (1000, 64), (320, 16), (17, 3), (65, 64), (40, 1), (4096, 8), (300, 200)]
)
def test_rows_match_torch_topk(dtype, length, k):
    gen = torch.Generator().manual_seed(length + k)
    scores = torch.randn(3, 5, 7, length, generator=gen, dtype=dtype)
    _assert_same_selection(scores, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_and_tied_rows(dtype):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 1024, generator=gen, dtype=dtype)
    scores[0, 100:] = float("-inf")  # fewer finite scores than groups: the bound is -inf, every score is searched
    scores[1, 3:] = float("-inf")  # fewer finite scores than k: the rest of the k are -inf
    scores[2] = float("-inf")  # nothing attendable
    scores[3] = torch.randint(0, 4, (1024,), generator=gen).to(dtype)  # ties across the k-th place
    scores[4, ::2] = float("-inf")  # alternate keys masked
    scores[5] = 1.0  # all tied
    _assert_same_selection(scores, 32)


def test_ties_at_the_kth_place_keep_the_lowest_indices():
    scores = torch.zeros(2, 600)
    scores[:, 500:] = 1.0  # 100 entries above the tie
    values, index = cpu_kernels.topk_rows(scores, 130)
    kept = index.sort(-1).values
    expected = torch.cat([torch.arange(30), torch.arange(500, 600)])
    assert torch.equal(kept, expected.expand(2, -1))


def test_strided_rows_and_leading_dims():
    scores = torch.randn(4, 9, 700).transpose(0, 1)  # not contiguous across rows
    values, index = cpu_kernels.topk_rows(scores, 20)
    assert values.shape == index.shape == (9, 4, 20) and index.dtype == torch.int64
    _assert_same_selection(scores, 20)


def test_declines_what_it_does_not_handle():
    assert cpu_kernels.topk_rows(torch.randn(4, 100, dtype=torch.bfloat16), 8) is None
    assert cpu_kernels.topk_rows(torch.randn(4, 100), 100) is None  # k must be below the row length
    with_nan = torch.randn(4, 100)
    with_nan[2, 50] = float("nan")  # torch.topk ranks NaN first: the caller must use it
    assert cpu_kernels.topk_rows(with_nan, 8) is None


def _inputs(batch=2, heads=4, kv_heads=2, q_len=37, k_len=300, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, length, dim, generator=gen, dtype=torch.float64)
               for h, length in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_attention_through_the_compiled_forward_matches_fp64_reference(causal):
    q, k, v = _inputs()
    mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[1, :] = False  # a sequence with nothing to attend: zeros
    ref = dense_attention(q, k, v, topk=24, key_padding_mask=mask, causal=causal)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = topk_attention(*leaves, topk=24, query_chunk_size=5, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    assert not out[1].any()

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*ref_leaves, topk=24, key_padding_mask=mask, causal=causal)
    expected = torch.autograd.grad(ref, ref_leaves, grad)
    got = torch.autograd.grad(out, leaves, grad.float())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_forward_runs_and_agrees_with_the_tiled_steps(monkeypatch, causal):
    q, k, v = (t.float() for t in _inputs(q_len=66, k_len=515))  # ragged against the 4-row and 32-key blocks
    mask = torch.rand(2, 515, generator=torch.Generator().manual_seed(1)) > 0.2
    calls = []
    original = cpu_kernels.attention_forward

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(cpu_kernels, "attention_forward", spy)
    compiled = topk_attention(q, k, v, topk=32, key_padding_mask=mask, causal=causal)
    assert len(calls) == 1 and calls[0] is not None
    monkeypatch.setattr(cpu_kernels, "attention_forward", lambda *args, **kwargs: None)
    tiled = topk_attention(q, k, v, topk=32, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(compiled, tiled, atol=1e-6, rtol=0)


def test_the_compiled_forward_leaves_an_additive_bias_to_the_tiled_steps(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "attention_forward", lambda *a, **kw: pytest.fail("compiled forward used"))
    q, k, v = (t.float() for t in _inputs())
    bias = torch.randn(1, 4, 37, 300)
    out = topk_attention(q, k, v, topk=8, bias=bias)
    ref = dense_attention(*_inputs(), topk=8, bias=bias.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_without_a_compiler_it_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_load_failed", False)
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    scores = torch.randn(3, 500)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert cpu_kernels.topk_rows(scores, 10) is None
    assert not cpu_kernels.available() and not list(tmp_path.iterdir())
    q, k, v = (t.float() for t in _inputs())
    out = topk_attention(q, k, v, topk=24)
    torch.testing.assert_close(out.double(), dense_attention(*_inputs(), topk=24), atol=2e-5, rtol=0)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_load_failed", False)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert not cpu_kernels.available()
    assert cpu_kernels.topk_rows(torch.randn(3, 500), 10) is None


def test_the_cached_library_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    cpu_kernels.build_library()
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no partial file left behind
    monkeypatch.setattr(cpu_kernels.subprocess, "run", lambda *a, **kw: pytest.fail("compiled again"))
    cpu_kernels.build_library()


def test_evaluation_saves_nothing_for_a_backward(monkeypatch):
    q, k, v = (t.float().requires_grad_() for t in _inputs())
    saved = []
    original = cpu_kernels.attention_forward

    def spy(*args, save_for_backward, **kwargs):
        result = original(*args, save_for_backward=save_for_backward, **kwargs)
        saved.append((save_for_backward, result[1]))
        return result

    monkeypatch.setattr(cpu_kernels, "attention_forward", spy)
    with torch.no_grad():
        evaluated = topk_attention(q, k, v, topk=24)
    trained = topk_attention(q, k, v, topk=24)
    assert [flag for flag, _ in saved] == [False, True]
    assert saved[0][1] is None and saved[1][1].shape == (2, 4, 37, 24)
    torch.testing.assert_close(evaluated, trained.detach(), atol=0, rtol=0)


def test_dropout_in_the_compiled_forward_matches_a_dense_reference_with_the_same_mask(monkeypatch):
    q, k, v = _inputs(q_len=21, k_len=90)
    captured = {}
    original = cpu_kernels.attention_forward

    def spy(*args, **kwargs):
        captured["result"] = original(*args, **kwargs)
        captured["dropped"] = kwargs["dropped"]
        return captured["result"]

    monkeypatch.setattr(cpu_kernels, "attention_forward", spy)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(0)
    out = topk_attention(*leaves, topk=10, dropout_p=0.3)
    _, kept_index, _ = captured["result"]
    dropped = captured["dropped"]
    assert dropped is not None and 0 < dropped.float().mean() < 0.6

    # The reference: dense fp64 top-10 probabilities, the dropped (query, key) entries zeroed, the rest / (1 - p).
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    qr, kr, vr = ref_leaves
    kr, vr = kr.repeat_interleave(2, 1), vr.repeat_interleave(2, 1)
    scores = qr @ kr.transpose(-1, -2) / 16**0.5
    kth = scores.topk(10, dim=-1).values[..., -1:]
    probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
    drop_dense = torch.zeros(probs.shape, dtype=torch.bool).scatter_(-1, kept_index.long(), dropped)
    ref = (probs * ~drop_dense / 0.7) @ vr
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = torch.autograd.grad(ref, ref_leaves, grad)
    got = torch.autograd.grad(out, leaves, grad.float())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=0)


def test_the_same_seed_drops_the_same_entries_with_and_without_the_compiled_forward(monkeypatch):
    q, k, v = (t.float() for t in _inputs(q_len=50, k_len=200))
    torch.manual_seed(5)
    compiled = topk_attention(q, k, v, topk=16, query_chunk_size=7, dropout_p=0.2)
    monkeypatch.setattr(cpu_kernels, "attention_forward", lambda *args, **kwargs: None)
    torch.manual_seed(5)
    tiled = topk_attention(q, k, v, topk=16, query_chunk_size=7, dropout_p=0.2)
    torch.testing.assert_close(compiled, tiled, atol=1e-6, rtol=0)
