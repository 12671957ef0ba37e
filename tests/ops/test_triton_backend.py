"""The Triton kernels (backend="triton") against the dense fp64 reference and the PyTorch backend.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py): slow, so shapes stay
small, but every index, mask and reduction is the one the GPU runs. With CUDA the same tests run compiled.
"""

import pytest
import torch

from topk_lightning.ops import dense_attention, topk_attention
from topk_lightning.ops.topk_attention import resolve_backend

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch=2, heads=4, kv_heads=2, q_len=37, k_len=45, dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, q_len, dim), (batch, kv_heads, k_len, dim), (batch, kv_heads, k_len, dim))
    return [torch.randn(s, generator=gen, dtype=dtype).to(DEVICE).requires_grad_() for s in shapes]


def _padding(batch, k_len, seed=3, p=0.3):
    return (torch.rand(batch, k_len, generator=torch.Generator().manual_seed(seed)) > p).to(DEVICE)


def _grads(out, tensors, seed=1):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return torch.autograd.grad(out, tensors, grad)


def _assert_close_to_reference(kwargs, atol, inputs=None, **shape):
    q, k, v = inputs if inputs is not None else _inputs(**shape)
    out = topk_attention(q, k, v, backend="triton", **kwargs)
    ref = dense_attention(*(t.double() for t in (q, k, v)), **kwargs)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref.to(out.dtype), (q, k, v))):
        torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=0)


@pytest.mark.parametrize("topk", [1, 5, 44, 300])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fp64_outputs_and_gradients_equal_dense_topk(topk, causal, padded):
    mask = _padding(2, 45) if padded else None
    _assert_close_to_reference(dict(topk=topk, causal=causal, key_padding_mask=mask), atol=1e-10)


@pytest.mark.parametrize("layout", ["stacks", "bound"])
@pytest.mark.parametrize("causal", [False, True])
def test_other_forward_layouts_equal_dense_topk(monkeypatch, causal, layout):
    # the default layout is "buffer" (measured on a GPU); the others are selectable and must select the same keys
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", f"32,32,4,2,{layout}")
    _assert_close_to_reference(dict(topk=5, causal=causal, key_padding_mask=_padding(2, 45)), atol=1e-10)


@pytest.mark.parametrize("layout", ["buffer", "stacks", "bound"])
def test_every_layout_ranks_unscaled_scores_and_scales_only_the_kept(monkeypatch, layout):
    # a scale far from D ** -0.5: it must reach the log-sum-exp of every layout, and not change which keys are kept
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", f"32,32,4,2,{layout}")
    _assert_close_to_reference(dict(topk=6, scale=2.5, key_padding_mask=_padding(2, 45)), atol=1e-10)


@pytest.mark.parametrize("topk", [1, 16, 17])
def test_bound_layout_with_ragged_tiles_and_topk_near_the_block(monkeypatch, topk):
    # 16-key blocks: topk 16 fills both bound groups per lane, 17 > BLOCK_N takes the "buffer" layout instead;
    # 70 queries and 200 keys leave partial tiles at both ends (rows past the queries get no candidates). Without
    # padding or a causal mask both passes run unmasked over whole blocks and masked over the last ones.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", "16,16,4,2,bound")
    for causal, padded in ((False, False), (False, True), (True, True)):
        mask = _padding(1, 200) if padded else None
        _assert_close_to_reference(dict(topk=topk, causal=causal, key_padding_mask=mask), atol=1e-10,
                                   batch=1, q_len=70, k_len=200)


def _right_padding(lengths, k_len):
    """Right padding, as tokenizers pad a batch: batch b sees its first lengths[b] keys."""
    return (torch.arange(k_len)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)


def test_key_padding_layout_reads_right_padding_as_lengths():
    from topk_lightning.ops.triton_backend import key_padding_layout

    assert key_padding_layout(None) == (None, "none")
    assert key_padding_layout(torch.ones(2, 7, dtype=torch.bool, device=DEVICE)) == (None, "none")
    lengths, layout = key_padding_layout(_right_padding([7, 3, 0], 7))
    assert layout == "lengths" and lengths.dtype == torch.int32 and lengths.tolist() == [7, 3, 0]
    for holes in (_right_padding([7, 3], 7).flip(-1), _padding(2, 7)):  # left padding; random holes
        mask, layout = key_padding_layout(holes)
        assert layout == "mask" and torch.equal(mask, holes.to(torch.uint8))


@pytest.mark.parametrize("layout", ["buffer", "stacks", "bound"])
@pytest.mark.parametrize("causal", [False, True])
def test_right_padded_batches_read_as_key_lengths_equal_dense_topk(monkeypatch, layout, causal):
    # Each batch's keys end at its own length: a whole number of 16-key blocks (128), mid-block (131, 5) and none
    # (0: rows give zeros); the loops stop there and run unmasked over whole blocks before it.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", f"16,16,4,2,{layout}")
    mask = _right_padding([200, 131, 128, 5, 0], 200)
    _assert_close_to_reference(dict(topk=16, causal=causal, key_padding_mask=mask), atol=1e-10, batch=5,
                               heads=2, kv_heads=1, q_len=70, k_len=200)


@pytest.mark.parametrize("padded", [False, True])
def test_bound_layout_in_fp32_the_dtype_of_its_gpu_append(monkeypatch, padded):
    # On CUDA, fp32 / bf16 / fp16 inputs take the inline-PTX append (fp64 and the interpreter take tl.store): this
    # is the test that runs it against the reference on a GPU.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", "16,16,4,2,bound")
    mask = _padding(1, 200) if padded else None
    _assert_close_to_reference(dict(topk=16, key_padding_mask=mask), atol=2e-5, batch=1, q_len=70, k_len=200,
                               dim=16, dtype=torch.float32)
    if padded:  # and right padding, read as key lengths
        _assert_close_to_reference(dict(topk=16, key_padding_mask=_right_padding([200, 77], 200)), atol=2e-5,
                                   batch=2, q_len=70, k_len=200, dim=16, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["buffer", "stacks", "bound"])
def test_every_layout_keeps_the_lowest_index_of_keys_tied_at_the_kth_score(monkeypatch, layout):
    # Keys 5 and 67 tie for the 7th place behind 208-213. The bound kernel packs candidates in (depth, lane) order,
    # where key 67 (lane 3 of 16) comes before key 5 (lane 5): key order must still decide.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", f"16,16,4,2,{layout}")
    gen = torch.Generator().manual_seed(0)
    level = torch.rand(300, generator=gen, dtype=torch.float64) * 2 - 1
    level[[5, 67]] = 5.0
    level[208:214] = torch.arange(10, 16, dtype=torch.float64)
    q = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 300, 8, dtype=torch.float64)
    k[0, 0, :, 0] = level
    v = torch.randn(1, 1, 300, 8, generator=gen, dtype=torch.float64)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out = topk_attention(q, k, v, topk=7, backend="triton")
    kept = out.grad_fn.saved_tensors[3].flatten().sort().values.tolist()  # the kernels' saved key indices
    assert kept == [5, 208, 209, 210, 211, 212, 213]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bound_layout_appends_again_from_a_tighter_bound_when_a_stack_overflows(monkeypatch, dtype):
    # 16-key blocks, k=7, stacks 4 deep. The 7 largest scores sit in 4 of the 32 (lane, block parity) groups and
    # lane 0 holds 19 middling ones, so the pass-1 bound (7th largest group maximum) falls among the small scores:
    # lane 0's stack overflows. The 7th largest score the stacks kept is the 7th largest overall, and pass 2 from
    # there appends exactly the 7, which must come out as the dense reference's.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", "16,16,4,2,bound")
    gen = torch.Generator().manual_seed(0)
    level = torch.rand(300, generator=gen, dtype=torch.float64) * 2 - 1  # small scores in [-1, 1)
    level[0::16] = 5 + torch.arange(19, dtype=torch.float64) / 100  # lane 0: above the bound, below the top 7
    level[[1, 33, 2, 34, 3, 35, 4]] = torch.arange(10, 17, dtype=torch.float64)  # lanes 1-4, even blocks
    q = torch.zeros(1, 1, 1, 8, dtype=dtype)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 300, 8, dtype=dtype)
    k[0, 0, :, 0] = level.to(dtype)
    v = torch.randn(1, 1, 300, 8, generator=gen, dtype=dtype)
    inputs = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    _assert_close_to_reference(dict(topk=7), atol=1e-10 if dtype == torch.float64 else 1e-5, inputs=inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bound_layout_redoes_a_tile_whose_stacks_overflow(monkeypatch, dtype):
    # Equal keys make every score tie with the bound, so every key is a candidate: the stacks (CAND // BLOCK_N = 4
    # deep here) overflow and the tile is redone through the candidate buffer, which keeps the lowest indices.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", "16,16,4,2,bound")
    q = torch.randn(1, 1, 5, 8, generator=torch.Generator().manual_seed(0), dtype=dtype, device=DEVICE)
    k = torch.ones(1, 1, 300, 8, dtype=dtype, device=DEVICE)
    v = torch.randn(1, 1, 300, 8, generator=torch.Generator().manual_seed(1), dtype=dtype, device=DEVICE)
    out = topk_attention(q, k, v, topk=7, backend="triton")
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, v[:, :, :7].mean(2, keepdim=True).expand_as(out), atol=atol, rtol=0)


@pytest.mark.parametrize(("q_len", "k_len"), [(1, 1), (3, 70), (70, 3), (65, 129)])
def test_ragged_lengths_across_tile_edges(q_len, k_len):
    _assert_close_to_reference(dict(topk=4, causal=False), atol=1e-10, batch=1, q_len=q_len, k_len=k_len)
    _assert_close_to_reference(dict(topk=4, causal=True), atol=1e-10, batch=1, q_len=q_len, k_len=k_len)


def test_grouped_heads_and_non_contiguous_inputs_fp32():
    q, k, v = _inputs(heads=6, kv_heads=2, dim=16, dtype=torch.float32)
    # transformers hands over (B, L, H, D) projections transposed to (B, H, L, D): strided, not contiguous.
    q_t, k_t, v_t = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not q_t.is_contiguous()
    _assert_close_to_reference(dict(topk=6, key_padding_mask=_padding(2, 45)), atol=2e-5, inputs=(q_t, k_t, v_t))


def test_half_precision_key_gradients_are_the_same_one_kv_head_at_a_time(monkeypatch):
    # fp32 dK/dV accumulators are filled a group of kv heads per launch (ACCUMULATOR_BUDGET_BYTES); with a budget
    # of one byte every kv head gets its own launch, and each head's sums must not change.
    from topk_lightning.ops import triton_backend

    q, k, v = _inputs(heads=6, kv_heads=3, dim=16, dtype=torch.float16)
    out = topk_attention(q, k, v, topk=6, backend="triton")
    together = _grads(out, (q, k, v))
    monkeypatch.setattr(triton_backend, "ACCUMULATOR_BUDGET_BYTES", 1)
    out = topk_attention(q, k, v, topk=6, backend="triton")
    for got, want in zip(_grads(out, (q, k, v)), together):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert together[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_rounding_of_fp64(dtype):
    q, k, v = _inputs(dim=16, dtype=dtype)
    out = topk_attention(q, k, v, topk=45, backend="triton")  # k >= Lk: no selection ties from rounding
    ref = dense_attention(*(t.double() for t in (q, k, v)))
    assert out.dtype == dtype
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    grads = _grads(out, (q, k, v))
    ref_grads = _grads(ref.to(dtype), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 2e-2


@pytest.mark.parametrize("layout", ["stacks", "buffer", "bound"])
def test_many_compactions_with_rising_scores_and_small_tiles(monkeypatch, layout):
    # Scores that rise along the keys make every key block beat the running threshold, so the candidate buffer
    # fills and is cut down again and again; 16-key blocks make that happen every few blocks. Both buffer
    # layouts of the forward kernel (triton_backend.forward_config) are checked.
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", f"16,16,4,2,{layout}")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 20, 8, generator=gen, dtype=torch.float64)
    ramp = torch.linspace(-3, 3, 400, dtype=torch.float64)[None, None, :, None]
    k = q.mean(2, keepdim=True) * ramp + 0.05 * torch.randn(1, 2, 400, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 400, 8, generator=gen, dtype=torch.float64)
    inputs = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    _assert_close_to_reference(dict(topk=7), atol=1e-10, inputs=inputs)
    _assert_close_to_reference(dict(topk=7, causal=True), atol=1e-10, inputs=inputs)


@pytest.mark.parametrize("layout", ["stacks", "buffer", "bound"])
def test_ties_keep_the_lowest_key_indices(monkeypatch, layout):
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", f"16,16,4,2,{layout}")
    # Integer scores with many ties at the k-th place: the kernels keep the earliest keys among equals.
    q = torch.ones(1, 1, 3, 96, dtype=torch.float64, device=DEVICE)
    levels = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 1.0, 3.0, 2.0] * 12, dtype=torch.float64)
    k = (levels[None, None, :, None] / 96).expand(1, 1, 96, 96).contiguous().to(DEVICE)
    v = torch.eye(96, dtype=torch.float64)[None, None].to(DEVICE)  # out[i] = the attention weights themselves
    out = topk_attention(q, k, v, topk=10, scale=1.0, backend="triton")
    order = torch.sort(levels, descending=True, stable=True).indices[:10]
    expected = torch.zeros(96, dtype=torch.float64)
    expected[order] = torch.softmax(levels[order], 0)
    torch.testing.assert_close(out[0, 0].cpu(), expected.expand(3, 96), atol=1e-12, rtol=0)


def test_rows_with_nothing_to_attend_give_zeros_and_zero_gradients():
    q, k, v = _inputs(batch=2, heads=2, kv_heads=2, q_len=6, k_len=5)
    mask = torch.tensor([[True] * 5, [False] * 5], device=DEVICE)
    out = topk_attention(q, k, v, topk=3, key_padding_mask=mask, backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    gq, gk, gv = _grads(out, (q, k, v))
    for grad in (gq[1], gk[1], gv[1]):
        assert torch.equal(grad, torch.zeros_like(grad))
    # Causal with more queries than keys: the first Lq - Lk queries see no key.
    q2, k2, v2 = _inputs(batch=1, heads=2, kv_heads=2, q_len=9, k_len=4)
    out2 = topk_attention(q2, k2, v2, topk=2, causal=True, backend="triton")
    assert torch.equal(out2[:, :, :5], torch.zeros_like(out2[:, :, :5]))
    assert torch.isfinite(torch.cat([g.flatten() for g in _grads(out2, (q2, k2, v2))])).all()


def _dropout_run(q, k, v, seed, **kwargs):
    torch.manual_seed(seed)
    return topk_attention(q, k, v, topk=4, dropout_p=0.5, backend="triton", **kwargs)


def test_dropout_weights_are_the_kept_probabilities_scaled_or_zero():
    q = torch.randn(1, 2, 40, 64, dtype=torch.float64, device=DEVICE)
    k = torch.randn(1, 2, 64, 64, dtype=torch.float64, device=DEVICE)
    v = torch.eye(64, dtype=torch.float64, device=DEVICE).expand(1, 2, 64, 64)  # output = attention weights
    weights = _dropout_run(q, k, v, seed=0)
    plain = topk_attention(q, k, v, topk=4, backend="triton")
    kept = plain > 0
    assert torch.equal(weights > 0, kept & (weights > 0))  # only kept entries can be non-zero
    survivors = weights[kept]
    assert torch.allclose(survivors[survivors > 0], 2 * plain[kept][survivors > 0], atol=1e-12, rtol=0)
    assert 0.35 < (survivors == 0).double().mean().item() < 0.65  # about half dropped (320 draws)
    assert torch.equal(_dropout_run(q, k, v, seed=0), weights)  # torch.manual_seed replays the mask
    assert not torch.equal(_dropout_run(q, k, v, seed=1), weights)


def test_dropout_backward_replays_the_forward_mask():
    # With v = I the output is the dropped-out attention weights, which reveals the mask the kernel drew. The
    # backward (which redraws it in the kernel) must be that of dense top-k attention with this mask held fixed.
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    k = torch.randn(1, 1, 8, 8, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    v = torch.eye(8, dtype=torch.float64, device=DEVICE)[None, None].requires_grad_()
    out = _dropout_run(q, k, v, seed=5, causal=True)
    probs = dense_attention(q, k, torch.eye(8, dtype=torch.float64, device=DEVICE)[None, None], topk=4, causal=True)
    survived = out.detach() != 0
    assert 0 < survived.sum() < (probs > 0).sum()  # some kept entries dropped, some not
    reference = (probs * survived / 0.5) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)
    for got, want in zip(_grads(out, (q, k, v)), _grads(reference, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_deterministic_mode_reduces_key_gradients_without_atomics():
    q, k, v = _inputs(heads=4, kv_heads=2)
    mask = _padding(2, 45)
    out = topk_attention(q, k, v, topk=5, key_padding_mask=mask, backend="triton")
    atomic = _grads(out, (q, k, v))
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = topk_attention(q, k, v, topk=5, key_padding_mask=mask, backend="triton")
            runs.append(_grads(out, (q, k, v)))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(atomic, *runs):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
        assert torch.equal(b, c)


def test_torch_and_triton_backends_agree_on_gradient_of_a_small_model_step():
    q, k, v = _inputs(dtype=torch.float32, dim=16)
    mask = _padding(2, 45)
    outs = {b: topk_attention(q, k, v, topk=8, key_padding_mask=mask, backend=b) for b in ("torch", "triton")}
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=2e-5, rtol=0)
    for a, b in zip(_grads(outs["triton"], (q, k, v)), _grads(outs["torch"], (q, k, v))):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_backend_resolution_and_errors(monkeypatch):
    q, k, _ = _inputs(q_len=4, k_len=4)
    assert resolve_backend("torch", q, k, topk=2) == "torch"
    bias = torch.zeros(4, 4, dtype=q.dtype, device=DEVICE)
    assert resolve_backend("auto", q, k, topk=2, bias=bias) == "torch"
    with pytest.raises(ValueError, match="bias is supported by the PyTorch backend only"):
        resolve_backend("triton", q, k, topk=2, bias=bias)
    with pytest.raises(ValueError, match="topk 300 .* is above 256"):
        resolve_backend("triton", q, torch.zeros(2, 2, 300, 8, dtype=q.dtype, device=DEVICE), topk=300)
    with pytest.raises(ValueError, match="scale -0.5 is not positive"):
        topk_attention(q, k, k, topk=2, scale=-0.5, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', got 'cuda'"):
        resolve_backend("cuda", q, k, topk=2)
    cpu_q, cpu_k = q.detach().cpu(), k.detach().cpu()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", cpu_q, cpu_k, topk=2) == "torch"
    with pytest.raises(ValueError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
        topk_attention(cpu_q, cpu_k, cpu_k, topk=2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu_q, cpu_k, topk=2) == "torch"  # auto never interprets
    assert resolve_backend("triton", cpu_q, cpu_k, topk=2) == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_takes_triton_on_cuda():
    q, k, _ = _inputs(q_len=4, k_len=4)
    assert resolve_backend("auto", q, k, topk=2) == "triton"


def test_forward_config_names_a_bad_layout_and_keeps_bound_to_small_topk(monkeypatch):
    from topk_lightning.ops.triton_backend import forward_config

    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", "64,64,4,2,fastest")
    with pytest.raises(ValueError, match="TOPK_LIGHTNING_TRITON_FWD.*'fastest'.*buffer, stacks, bound"):
        forward_config(64, 64, torch.bfloat16)
    monkeypatch.setenv("TOPK_LIGHTNING_TRITON_FWD", "64,64,8,2,bound")
    assert forward_config(64, 64, torch.bfloat16)["layout"] == "bound"
    assert forward_config(128, 64, torch.bfloat16)["layout"] == "buffer"  # the bound needs topk <= BLOCK_N
