"""The PyTorch backend of top-k attention: score tiles from a matmul, exact selection, a sparse backward.

Forward, per tile of query rows::

    scores = (q * scale) @ k.T + bias + masks      (B, H, rows, Lk)   the only dense block, one tile at a time
                                                    (a lazy T5 relative bias is computed per tile: `relative_bias`)
    vals, idx = top-k of every row                  (B, H, rows, k)
    p = softmax(vals)                                fp32
    out = sum_j p_j * v[idx_j]                       one embedding_bag call, no gathered copy of v

Saved for backward: q, k, v, idx (int32) and p (fp32): O(B * H * Lq * k), never Lq x Lk.

Backward, per group of heads::

    dp_j  = do . v[idx_j]                            sampled dense-dense matmul (SDDMM) on the kept pattern
    ds_j  = p_j * (dp_j - sum_l p_l dp_l)             softmax backward on k entries
    dq    = scale * sum_j ds_j k[idx_j]               embedding_bag
    dk, dv                                            embedding_bag over the transposed pattern (keys sorted)
    d(relative bias embedding)                        ds_j summed per distance, then per bucket

Runs on any device. On CUDA the Triton backend (`triton_backend`) is faster; this one is the reference for it and
the fallback for what it does not cover (an additive ``bias``, a relative ``position_bias``).
"""

from __future__ import annotations

import math
import os

import torch

from topk_lightning.ops import cpu_kernels
from topk_lightning.ops.relative_bias import bias_by_distance, embedding_grad, tile_bias
from topk_lightning.ops.sparse_rows import TransposedPattern, sampled_dot, weighted_row_sum

# Bytes of scores materialised per tile, by device type. On a CPU the block written by the matmul should still be
# in the last-level cache when the selection reads it (measured: 32-row tiles of 12 x 8192 fp32 scores are ~1.8x
# faster to produce than 128-row ones). On a GPU small tiles make the forward launch-bound (measured on an H200,
# L=32k, fwd+bwd: 2^22 fp32 elements per tile 876 ms, 2^27 83 ms), so tiles are as large as memory allows.
# TOPK_LIGHTNING_SCORE_BUDGET_MB overrides the budget for every device. The caller's query_chunk_size stays the
# upper bound on rows per tile.
SCORE_BUDGET_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}
SCORE_BUDGET_ENV = "TOPK_LIGHTNING_SCORE_BUDGET_MB"
# Backward works on groups of heads holding about this many kept entries, bounding its temporaries.
_BACKWARD_ENTRIES = 1 << 19


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-row top-k of ``scores`` (..., L), unsorted, returning (values, int64 indices).

    For long rows a two-stage search is cheaper than ``torch.topk`` over the whole row: split the row into G
    strided groups, keep the k groups with the largest maxima, and search only their members. It is exact
    because a row's top-k entries always lie in the k groups with the largest maxima (a group holding a top-k
    entry e whose maximum ranks below k others would leave k + 1 entries >= e). On a CPU the compiled selection
    (`cpu_kernels.topk_rows`) bounds the k-th score from group maxima the same way and filters each row once, in
    cache, several times faster.
    """
    if scores.device.type == "cpu":
        selected = cpu_kernels.topk_rows(scores, k)
        if selected is not None:
            return selected
    length = scores.shape[-1]
    group_size = 1 << max(0, round(math.log2(math.sqrt(length / k))))
    if length < 32 * k or length % group_size != 0:
        return scores.topk(k, dim=-1, sorted=False)
    groups = length // group_size
    maxima = scores.unflatten(-1, (group_size, groups)).amax(dim=-2)
    best_groups = maxima.topk(k, dim=-1, sorted=False).indices
    offsets = torch.arange(0, length, groups, device=scores.device)
    candidates = (best_groups.unsqueeze(-1) + offsets).flatten(-2)
    values, picked = scores.gather(-1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(-1, picked)


def softmax_rows(values: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 (at least) over the last dim; rows that are all -inf give zeros instead of NaN."""
    values = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    return torch.softmax(values, dim=-1).nan_to_num_(0.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def score_budget_bytes(device: torch.device) -> int:
    """Bytes of scores one tile may hold on ``device``: `SCORE_BUDGET_BYTES`, or the environment override."""
    override = os.environ.get(SCORE_BUDGET_ENV)
    if override:
        try:
            megabytes = float(override)
        except ValueError:
            megabytes = -1.0
        if not megabytes > 0:
            raise ValueError(f"{SCORE_BUDGET_ENV} must be a positive number of MiB, got {override!r}")
        return int(megabytes * (1 << 20))
    return SCORE_BUDGET_BYTES.get(device.type, SCORE_BUDGET_BYTES["cuda"])


def rows_per_tile(batch: int, heads: int, k_len: int, query_chunk_size: int, scores: torch.Tensor) -> int:
    """Query rows per score tile: within the device's score budget, never more than ``query_chunk_size``."""
    elements = score_budget_bytes(scores.device) // scores.element_size()
    return max(1, min(query_chunk_size, elements // max(1, batch * heads * k_len)))


class TorchTopKAttention(torch.autograd.Function):
    """Autograd function of the PyTorch backend; arguments as `topk_attention`, already checked.

    A relative ``position_bias`` comes as its `RelativePositionBias` plus, as ``relative_weight``, its embedding
    (so that autograd sees the tensor it differentiates). ``backward_follows=False`` (evaluation: no gradient will be
    asked for) lets the forward skip what only the backward reads, where it can.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, key_padding_mask, topk, query_chunk_size, scale, dropout_p, causal,
                relative_weight=None, position_bias=None, backward_follows=True):
        batch, heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        group = heads // kv_heads
        k = min(topk, k_len)
        work_dtype = compute_dtype(query.dtype)
        ctx.config = (scale, dropout_p)
        ctx.position_bias = position_bias

        tile = rows_per_tile(batch, heads, k_len, query_chunk_size, query)
        dropped = None
        if dropout_p > 0:
            # Which kept entries dropout removes, drawn tile by tile (the draws of earlier versions, which drew
            # inside the tile loop): a seed drops the same entries on either path below.
            dropped = torch.empty(batch, heads, q_len, k, dtype=torch.bool, device=query.device)
            for start in range(0, q_len, tile):
                stop = min(start + tile, q_len)
                shape = (batch, heads, stop - start, k)
                dropped[:, :, start:stop] = torch.rand(shape, dtype=work_dtype, device=query.device) < dropout_p

        # On a CPU, the whole forward in compiled code where it applies (fp32, no additive bias; it returns None
        # otherwise): scores never leave the cache (`cpu_kernels.attention_forward`).
        if bias is None and position_bias is None and query.device.type == "cpu":
            compiled = cpu_kernels.attention_forward(
                query, key, value, k, scale, causal, key_padding_mask, save_for_backward=backward_follows,
                dropped=dropped, dropout_p=dropout_p,
            )
            if compiled is not None:
                out, kept_index, kept_prob = compiled
                ctx.save_for_backward(query, key, value, kept_index, kept_prob, dropped, bias)
                return out

        out = torch.empty_like(query)
        kept_index = torch.empty(
            batch, heads, q_len, k, dtype=torch.int32 if k_len < 2**31 else torch.int64, device=query.device
        )
        kept_prob = torch.empty(batch, heads, q_len, k, dtype=work_dtype, device=query.device)

        key_t = key.contiguous().transpose(-1, -2)  # one copy now rather than one per tile inside matmul
        # Values as the rows of one table: the kv slab of (b, h) starts at ((b * Hkv) + h // group) * Lk.
        value_rows = value.reshape(-1, head_dim).to(work_dtype)
        slab = torch.arange(batch, device=query.device)[:, None] * kv_heads + (
            torch.arange(heads, device=query.device)[None, :] // group
        )
        row_base = (slab * k_len)[:, :, None, None]
        padding_bias = None
        if key_padding_mask is not None and not bool(key_padding_mask.all()):
            padding_bias = torch.zeros(batch, 1, 1, k_len, dtype=query.dtype, device=query.device)
            padding_bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))

        relative_table = None
        if position_bias is not None:
            relative_table = bias_by_distance(position_bias, position_bias.distance_buckets(q_len, k_len), query.dtype)

        for start in range(0, q_len, tile):
            stop = min(start + tile, q_len)
            rows = stop - start
            # Scaling per tile also makes the tile contiguous, so the grouped-head reshape below is a view.
            q_tile = (query[:, :, start:stop] * scale).reshape(batch, kv_heads, group * rows, head_dim)
            scores = torch.matmul(q_tile, key_t).view(batch, heads, rows, k_len)
            if bias is not None:
                scores += bias[..., start:stop, :] if bias.dim() >= 2 and bias.shape[-2] != 1 else bias
            if relative_table is not None:
                scores += tile_bias(relative_table, start, stop, q_len, k_len)
            if padding_bias is not None:
                scores += padding_bias
            if causal:
                query_pos = torch.arange(start, stop, device=query.device)[:, None] + (k_len - q_len)
                scores.masked_fill_(torch.arange(k_len, device=query.device)[None, :] > query_pos, float("-inf"))
            values, index = select_topk(scores, k)
            del scores
            prob = softmax_rows(values)
            kept_index[:, :, start:stop] = index
            kept_prob[:, :, start:stop] = prob
            if dropped is not None:
                prob = prob * ~dropped[:, :, start:stop] / (1.0 - dropout_p)
            tile_out = weighted_row_sum((index + row_base).view(-1, k), value_rows, prob.reshape(-1, k))
            out[:, :, start:stop] = tile_out.view(batch, heads, rows, head_dim)

        ctx.save_for_backward(query, key, value, kept_index, kept_prob, dropped, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, kept_index, kept_prob, dropped, bias = ctx.saved_tensors
        scale, dropout_p = ctx.config
        batch, heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        group = heads // kv_heads
        k = kept_index.shape[-1]
        work_dtype = kept_prob.dtype
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        need_relative = ctx.position_bias is not None and ctx.needs_input_grad[10]

        # Contiguous buffers (inputs are often transposed views), filled slab by slab through .view().
        grad_q = query.new_zeros(query.shape) if need_q else None
        grad_k = key.new_zeros(key.shape) if need_k else None
        grad_v = value.new_zeros(value.shape) if need_v else None
        grad_bias_full = None
        if need_bias:
            grad_bias_full = torch.zeros(
                torch.broadcast_shapes(bias.shape, (batch, heads, q_len, k_len)), dtype=work_dtype, device=bias.device
            )
        if need_relative:
            # Kept entry (query i, key j) of head h adds its score gradient to distance j - i (index j - i + Lq - 1).
            distances = q_len + k_len - 1
            grad_by_distance = torch.zeros(heads * distances, dtype=work_dtype, device=query.device)
            distance_of_row = (q_len - 1) - torch.arange(q_len, device=query.device)[:, None]
            head_in_group = torch.arange(group, device=query.device)[:, None, None]

        # One slab = one (batch, kv head) with its `group` query heads: (B*Hkv, group*Lq, ...) views.
        slabs = batch * kv_heads
        rows_per_slab = group * q_len
        q_s = query.reshape(slabs, rows_per_slab, head_dim)
        go_s = grad_out.reshape(slabs, rows_per_slab, head_dim)
        k_s = key.reshape(slabs, k_len, head_dim)
        v_s = value.reshape(slabs, k_len, head_dim)
        index_s = kept_index.reshape(slabs, rows_per_slab, k)
        prob_s = kept_prob.reshape(slabs, rows_per_slab, k)
        drop_s = dropped.reshape(slabs, rows_per_slab, k) if dropped is not None else None

        per_step = max(1, _BACKWARD_ENTRIES // max(1, rows_per_slab * k))
        for first in range(0, slabs, per_step):
            last = min(first + per_step, slabs)
            n = last - first
            index = index_s[first:last].long()
            prob = prob_s[first:last]
            grad_o = go_s[first:last].to(work_dtype)
            v_g = v_s[first:last].to(work_dtype)
            k_g = k_s[first:last].to(work_dtype)
            q_g = q_s[first:last].to(work_dtype)

            # Slab s's keys are rows s * Lk ... of the stacked key/value tables.
            flat_index = (index + (torch.arange(n, device=index.device) * k_len)[:, None, None]).view(-1, k)
            grad_p = sampled_dot(flat_index, grad_o.reshape(-1, head_dim), v_g.reshape(-1, head_dim))
            grad_p = grad_p.view(n, rows_per_slab, k)
            used_prob = prob
            if drop_s is not None:
                keep = ~drop_s[first:last]
                grad_p = grad_p * keep / (1.0 - dropout_p)
                used_prob = prob * keep / (1.0 - dropout_p)
            grad_s = prob * (grad_p - (prob * grad_p).sum(-1, keepdim=True))

            if need_q:
                dq = weighted_row_sum(flat_index, k_g.reshape(-1, head_dim), grad_s.reshape(-1, k))
                grad_q.view(slabs, rows_per_slab, head_dim)[first:last] = (dq * scale).view(n, rows_per_slab, -1)
            if need_k or need_v:
                by_key = TransposedPattern(flat_index, n * k_len)
                if need_v:
                    dv = by_key.weighted_row_sum(grad_o.reshape(-1, head_dim), used_prob)
                    grad_v.view(slabs, k_len, head_dim)[first:last] = dv.view(n, k_len, head_dim)
                if need_k:
                    dk = by_key.weighted_row_sum(q_g.reshape(-1, head_dim), grad_s)
                    grad_k.view(slabs, k_len, head_dim)[first:last] = (dk * scale).view(n, k_len, head_dim)
            if need_bias:
                # Slabs are (b, kv head) and their rows (group head, query): the same order as (B, H, Lq).
                grad_bias_full.view(slabs, rows_per_slab, k_len)[first:last].scatter_add_(-1, index, grad_s)
            if need_relative:
                # Slab s holds query heads (s % Hkv) * group + g, g < group, each over all Lq rows.
                first_head = (torch.arange(first, last, device=index.device) % kv_heads) * group
                head = first_head[:, None, None, None] + head_in_group
                target = head * distances + (index.view(n, group, q_len, k) + distance_of_row)
                grad_by_distance.index_add_(0, target.view(-1), grad_s.reshape(-1))

        grad_bias = None
        if need_bias:
            grad_bias = _reduce_to_shape(grad_bias_full, bias.shape).to(bias.dtype)
        grad_relative = None
        if need_relative:
            buckets = ctx.position_bias.distance_buckets(q_len, k_len)  # O(L): recomputed rather than saved
            grad_relative = embedding_grad(ctx.position_bias, buckets, grad_by_distance.view(heads, -1))
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None, None, grad_relative, None, None


def _reduce_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a (B, H, Lq, Lk) gradient over the dimensions along which a bias of ``shape`` was broadcast."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad
