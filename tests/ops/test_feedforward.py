"""Chunked and top-k feed-forward operators against plain dense FFs in float64."""

import pytest
import torch
import torch.nn.functional as F

from topk_lightning.ops import chunked_feed_forward, topk_feed_forward


def _weights(d_model=6, d_ff=10, seed=0, gated=False):
    gen = torch.Generator().manual_seed(seed)

    def param(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    weights = {"w_in": param(d_ff, d_model), "b_in": param(d_ff), "w_out": param(d_model, d_ff), "b_out": param(d_model)}
    if gated:
        weights.update(w_gate=param(d_ff, d_model), b_gate=param(d_ff))
    return weights


def _dense_topk_ff(x, w_in, b_in, w_out, b_out, topk, activation, w_gate=None, b_gate=None):
    """Reference: full hidden layer, zero every unit outside the per-token top-k of the selecting pre-activation."""
    pre = x @ w_in.t() + b_in
    select = pre if w_gate is None else x @ w_gate.t() + b_gate
    kth = select.topk(topk, dim=-1).values[..., -1:]
    keep = select >= kth
    hidden = activation(pre) if w_gate is None else activation(select) * pre
    return (hidden * keep) @ w_out.t() + b_out


def _grads(out, tensors):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, grad)


@pytest.mark.parametrize("activation", [F.relu, F.gelu])
@pytest.mark.parametrize("topk", [1, 4, 10])
def test_topk_feed_forward_matches_dense_reference(activation, topk):
    w = _weights()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    out = topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=topk, activation=activation)
    ref = _dense_topk_ff(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk, activation)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    inputs = (x, *w.values())
    for a, b in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_topk_at_least_d_ff_is_the_exact_ff():
    w = _weights()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    out = topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=99, activation=F.gelu)
    exact = F.linear(F.gelu(F.linear(x, w["w_in"], w["b_in"])), w["w_out"], w["b_out"])
    torch.testing.assert_close(out, exact, atol=1e-12, rtol=0)


def test_gated_feed_forward_selects_on_the_gate():
    w = _weights(gated=True)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    out = topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=3, activation=F.silu,
                            w_gate=w["w_gate"], b_gate=w["b_gate"])
    ref = _dense_topk_ff(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], 3, F.silu, w["w_gate"], w["b_gate"])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    inputs = (x, *w.values())
    for a, b in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_dropout_on_kept_units_is_replayed_in_backward(gated):
    """Reference: the dense top-k FF with the op's own saved mask applied to the hidden units, scaled by 1/(1-p)."""
    w = _weights(gated=gated)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    gate = {"w_gate": w["w_gate"], "b_gate": w["b_gate"]} if gated else {}
    out = topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=4, activation=F.relu,
                            dropout_p=0.5, **gate)
    saved = out.grad_fn.next_functions[0][0].saved_tensors  # under the final view
    index, kept_units = saved[6], saved[9]
    assert 0 < kept_units.sum() < kept_units.numel()  # some units dropped, some kept
    mask = torch.zeros(14, 10, dtype=torch.float64).scatter_(1, index, kept_units.double()).view(2, 7, 10) / 0.5

    pre = x @ w["w_in"].t() + w["b_in"]
    select = pre if not gated else x @ w["w_gate"].t() + w["b_gate"]
    hidden = F.relu(select) * (pre if gated else 1.0)
    ref = (hidden * mask) @ w["w_out"].t() + w["b_out"]  # mask is zero outside the kept top-4 units
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    inputs = (x, *w.values())
    for a, b in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=4, activation=F.relu, dropout_p=1.0)


def test_topk_feed_forward_gradcheck_without_biases():
    w = _weights(d_model=3, d_ff=5)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, w_in, w_out):
        return topk_feed_forward(x, w_in, None, w_out, None, topk=2, activation=torch.tanh)

    assert torch.autograd.gradcheck(fn, (x, w["w_in"], w["w_out"]))


def test_topk_feed_forward_saves_only_linear_state():
    w = {name: t.detach().float().requires_grad_() for name, t in _weights(d_model=8, d_ff=512).items()}
    x = torch.randn(1, 300, 8, requires_grad=True)
    out = topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=4, activation=F.relu)
    saved = [t for t in out.grad_fn.next_functions[0][0].saved_tensors if t is not None]  # under the final view
    per_token = [t for t in saved if t.shape[0] == 300]
    assert all(t.numel() <= 300 * 8 for t in per_token)  # x, the indices and the kept values: never 300 x 512


def test_topk_feed_forward_rejects_bad_arguments():
    w = _weights()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="topk must be a positive int, got 0"):
        topk_feed_forward(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], topk=0, activation=F.relu)
    with pytest.raises(ValueError, match="shapes do not chain"):
        topk_feed_forward(x, w["w_in"], w["b_in"], w["w_in"], w["b_out"], topk=2, activation=F.relu)


def _bert_like_ff(d_model=6, d_ff=12, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_model, d_ff), torch.nn.GELU(), torch.nn.Linear(d_ff, d_model), torch.nn.Dropout(0.3)
    ).double()


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_chunked_feed_forward_is_exact_including_dropout(chunk):
    ff = _bert_like_ff()
    x = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = chunked_feed_forward(ff, x, chunk)
    grads = _grads(out, (x, *ff.parameters()))
    # Reference: the same chunks run plainly with the same RNG stream, so dropout masks coincide.
    torch.manual_seed(11)
    ref = torch.cat([ff(piece) for piece in x.split(chunk, dim=1)], dim=1)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(grads, _grads(ref, (x, *ff.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    ff.eval()
    torch.testing.assert_close(chunked_feed_forward(ff, x, chunk), ff(x), atol=1e-12, rtol=0)


def test_chunked_feed_forward_recomputes_instead_of_saving():
    calls = []

    def ff(piece):
        calls.append(piece.shape[1])
        return piece * piece  # saves its input, so backward must recompute it

    x = torch.randn(1, 8, 4, requires_grad=True)
    chunked_feed_forward(ff, x, 3).sum().backward()
    assert calls[:3] == [3, 3, 2] and sorted(calls[3:]) == [2, 3, 3]  # forward, then each chunk again in backward
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        chunked_feed_forward(ff, x, 0)
