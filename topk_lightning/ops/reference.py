"""Dense reference attention: materialises every score, so use it only in tests and on small inputs."""

from __future__ import annotations

import torch


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    topk: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Plain softmax attention with an optional per-row top-k, written for clarity rather than speed.

    Same layout and masking rules as :func:`topk_lightning.ops.topk_attention`: query (B, H, Lq, D), key/value
    (B, Hkv, Lk, D). With ``topk`` set, every row keeps only its ``topk`` largest scores (after scaling, bias and
    masks) and the softmax runs over those. Rows with no attendable key return zeros.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scale = head_dim**-0.5 if scale is None else scale

    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if causal:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=query.device)[:, None]
        cols = torch.arange(k_len, device=query.device)[None, :]
        allowed = allowed & (cols <= rows + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if topk is not None and topk < k_len:
        kth = scores.topk(topk, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every key masked
    return torch.matmul(probs, value)
