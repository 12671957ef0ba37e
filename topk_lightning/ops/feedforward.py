"""Feed-forward layers that stay linear in memory over long inputs.

Two independent tools (they compose):

- ``chunked_feed_forward``: exact. Runs the FF on slices of the sequence, each under a non-reentrant checkpoint,
  so the (L x d_ff) activations are never all saved for backward: each chunk recomputes its own.
- ``topk_feed_forward``: the paper's view of a FF as attention, keys = rows of the first weight matrix and
  values = columns of the second. Each token keeps only its ``topk`` largest hidden pre-activations (the gate's,
  for gated FFs); backward memory is O(tokens x topk).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from topk_lightning.ops.sparse_rows import TransposedPattern, sampled_dot, weighted_row_sum
from topk_lightning.ops.torch_backend import compute_dtype, select_topk

# Hidden pre-activations are produced this many elements at a time (a tile of tokens x d_ff).
_TILE_ELEMENTS = 1 << 22


def chunked_feed_forward(fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, chunk_size: int,
                         *, dim: int = 1) -> torch.Tensor:
    """Apply ``fn`` to slices of ``hidden`` of ``chunk_size`` along ``dim`` and concatenate; exact.

    ``fn`` must treat positions independently (a position-wise FF). While gradients are enabled each slice runs
    under a non-reentrant checkpoint, so only the slice inputs are saved and the hidden activations are
    recomputed in backward (RNG state, hence dropout, is replayed exactly).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    pieces = hidden.split(chunk_size, dim=dim)
    if torch.is_grad_enabled():
        outputs = [checkpoint(fn, piece, use_reentrant=False) for piece in pieces]
    else:
        outputs = [fn(piece) for piece in pieces]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=dim)


def topk_feed_forward(
    hidden: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    *,
    topk: int,
    activation: Callable[[torch.Tensor], torch.Tensor],
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``w_out @ act(w_in @ x + b_in) + b_out`` keeping only the ``topk`` largest hidden units of every token.

    Args:
        hidden: (..., d_model).
        w_in, b_in: (d_ff, d_model) and (d_ff,) as stored by ``nn.Linear``; for a gated FF the "up" projection.
        w_out, b_out: (d_model, d_ff) and (d_model,).
        topk: hidden units kept per token, >= 1; ``topk >= d_ff`` is the exact FF.
        activation: elementwise, applied to the kept pre-activations only.
        w_gate, b_gate: for gated FFs (``act(gate(x)) * up(x)``): the units are chosen on the gate's
            pre-activation and ``w_in`` becomes the up projection.
        dropout_p: dropout on the kept hidden units, in [0, 1) (T5 drops hidden units between its two maps; pass
            0.0 at evaluation). The mask is saved and replayed in backward.

    Returns (..., d_model). Residual, dropout after the FF and LayerNorm are the caller's.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    d_ff, d_model = w_in.shape
    if hidden.shape[-1] != d_model or tuple(w_out.shape) != (d_model, d_ff):
        raise ValueError(
            f"shapes do not chain: hidden (..., {hidden.shape[-1]}), w_in {tuple(w_in.shape)}, w_out "
            f"{tuple(w_out.shape)}; expected hidden (..., d_model), w_in (d_ff, d_model), w_out (d_model, d_ff)"
        )
    if w_gate is not None and tuple(w_gate.shape) != (d_ff, d_model):
        raise ValueError(f"w_gate must have the shape of w_in {tuple(w_in.shape)}, got {tuple(w_gate.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    flat = hidden.reshape(-1, d_model)
    out = _TopKFeedForward.apply(
        flat, w_in, b_in, w_out, b_out, w_gate, b_gate, min(topk, d_ff), activation, dropout_p
    )
    return out.view(*hidden.shape[:-1], d_model)


def _activation_and_slope(activation, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        pre = pre.detach().requires_grad_(True)
        act = activation(pre)
        (slope,) = torch.autograd.grad(act.sum(), pre)
    return act.detach(), slope


class _TopKFeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, w_gate, b_gate, k, activation, dropout_p):
        work = compute_dtype(x.dtype)
        gated = w_gate is not None
        w_select, b_select = (w_gate, b_gate) if gated else (w_in, b_in)
        tokens, d_model = x.shape
        d_ff = w_in.shape[0]
        index = torch.empty(tokens, k, dtype=torch.int64, device=x.device)
        kept_pre = torch.empty(tokens, k, dtype=work, device=x.device)
        kept_up = torch.empty(tokens, k, dtype=work, device=x.device) if gated else None
        kept_units = torch.empty(tokens, k, dtype=torch.bool, device=x.device) if dropout_p > 0 else None
        out = torch.empty(tokens, d_model, dtype=x.dtype, device=x.device)
        out_table = w_out.t().to(work).contiguous()  # hidden unit j -> its output column, as a row
        up_table = w_in.to(work) if gated else None

        step = max(1, _TILE_ELEMENTS // d_ff)
        for start in range(0, tokens, step):
            stop = min(start + step, tokens)
            pre = x[start:stop] @ w_select.t()
            if b_select is not None:
                pre += b_select
            values, picked = select_topk(pre, k)
            del pre
            values = values.to(work)
            coeff = activation(values)
            if gated:
                up = sampled_dot(picked, x[start:stop].to(work), up_table)
                if b_in is not None:
                    up += b_in.to(work)[picked]
                kept_up[start:stop] = up
                coeff = coeff * up
            if kept_units is not None:
                keep = torch.rand_like(coeff) >= dropout_p
                kept_units[start:stop] = keep
                coeff = coeff * keep / (1.0 - dropout_p)
            index[start:stop], kept_pre[start:stop] = picked, values
            out[start:stop] = weighted_row_sum(picked, out_table, coeff)
        if b_out is not None:
            out += b_out

        ctx.save_for_backward(x, w_in, b_in, w_out, w_gate, b_gate, index, kept_pre, kept_up, kept_units)
        ctx.activation = activation
        ctx.dropout_p = dropout_p
        ctx.has_b_out = b_out is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_in, b_in, w_out, w_gate, b_gate, index, kept_pre, kept_up, kept_units = ctx.saved_tensors
        work = kept_pre.dtype
        gated = w_gate is not None
        d_ff = w_in.shape[0]
        grad_y = grad_out.to(work)
        x_w = x.to(work)

        act, slope = _activation_and_slope(ctx.activation, kept_pre)
        grad_coeff = sampled_dot(index, grad_y, w_out.t().to(work).contiguous())
        dropout_scale = None if kept_units is None else kept_units.to(work) / (1.0 - ctx.dropout_p)
        if dropout_scale is not None:
            grad_coeff = grad_coeff * dropout_scale  # now the gradient of the coefficient before dropout
        if gated:
            grad_pre = grad_coeff * kept_up * slope
            grad_up = grad_coeff * act
            coeff = act * kept_up
        else:
            grad_pre = grad_coeff * slope
            coeff = act
        if dropout_scale is not None:
            coeff = coeff * dropout_scale  # what the forward multiplied w_out's columns by
        w_select = w_gate if gated else w_in
        grad_x = weighted_row_sum(index, w_select.to(work), grad_pre)
        if gated:
            grad_x += weighted_row_sum(index, w_in.to(work), grad_up)

        by_unit = TransposedPattern(index, d_ff)
        grad_w_select = by_unit.weighted_row_sum(x_w, grad_pre)
        grad_w_out = by_unit.weighted_row_sum(grad_y, coeff).t()
        flat_index = index.reshape(-1)
        grad_b_select = torch.zeros(d_ff, dtype=work, device=x.device).index_add_(0, flat_index, grad_pre.reshape(-1))
        grad_b_out = grad_y.sum(0) if ctx.has_b_out else None

        grad_w_in = grad_b_in = grad_w_gate = grad_b_gate = None
        if gated:
            grad_w_gate, grad_b_gate = grad_w_select, grad_b_select
            grad_w_in = by_unit.weighted_row_sum(x_w, grad_up)
            grad_b_in = torch.zeros(d_ff, dtype=work, device=x.device).index_add_(0, flat_index, grad_up.reshape(-1))
        else:
            grad_w_in, grad_b_in = grad_w_select, grad_b_select

        def cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (
            grad_x.to(x.dtype), cast(grad_w_in, w_in), cast(grad_b_in, b_in), grad_w_out.to(w_out.dtype),
            None if grad_b_out is None else grad_b_out.to(w_out.dtype), cast(grad_w_gate, w_gate),
            cast(grad_b_gate, b_gate), None, None, None,
        )
