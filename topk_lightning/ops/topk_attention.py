"""Top-k attention (Gupta et al. 2021): the public function and the choice of backend.

Every query keeps only its ``topk`` highest-scoring keys and takes the softmax over those; backward touches only
the kept entries, so memory is O(L * k) rather than O(L^2). Two implementations compute the same function:

- ``"triton"`` (`triton_backend`): fused kernels for CUDA GPUs. One pass over QK^T selects each row's top k while
  the scores stay on chip; backward recomputes the kept probabilities and scatters dK/dV.
- ``"torch"`` (`torch_backend`): plain PyTorch on any device, score tiles sized to the device (cache-sized on a CPU,
  large on a GPU). The reference for the kernels, and the only backend that takes an additive ``bias`` or a T5
  relative ``position_bias``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from topk_lightning.ops.relative_bias import RelativePositionBias, check_position_bias
from topk_lightning.ops.torch_backend import TorchTopKAttention

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    topk: int,
    query_chunk_size: int = 1024,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    backend: Backend = "auto",
    position_bias: RelativePositionBias | None = None,
) -> torch.Tensor:
    """Softmax attention over the ``topk`` highest-scoring keys of every query, in memory linear in length.

    Args:
        query: (B, H, Lq, D).
        key, value: (B, Hkv, Lk, D), with Hkv dividing H (grouped-query heads: query head h reads kv head
            h // (H // Hkv)). Same dtype and device as ``query``.
        topk: keys kept per query, >= 1. With ``topk >= Lk`` this is exact softmax attention.
        query_chunk_size: PyTorch backend: at most this many query rows have their (B, H, rows, Lk) scores
            materialised at once (fewer when the device's score budget says so; see `torch_backend`). >= 1. The
            Triton backend never materialises scores and ignores it.
        key_padding_mask: optional bool (B, Lk), True = attend.
        bias: optional additive float tensor broadcastable to (B, H, Lq, Lk); sliced per query tile, never
            expanded. Gets a gradient (at the kept entries) when it requires one. PyTorch backend only: with a
            bias, ``"auto"`` runs the PyTorch backend.
        position_bias: optional T5 relative position bias, described by its bucket embedding and bucketing
            parameters (`relative_bias.RelativePositionBias`) and computed one score tile at a time, never as
            (Lq, Lk); added to ``bias`` if both are given. Its embedding gets a gradient through the kept entries.
            PyTorch backend only: with it, ``"auto"`` runs the PyTorch backend.
        scale: score multiplier, default D ** -0.5.
        dropout_p: dropout on the kept probabilities (training only: pass 0.0 at evaluation).
        causal: query i sees keys j <= i + (Lk - Lq).
        backend: ``"auto"`` (default) runs the Triton kernels for CUDA tensors when Triton is installed and the
            arguments are supported (`triton_backend.unsupported_reason`), and the PyTorch backend otherwise.
            ``"triton"`` insists on the kernels: it raises for arguments they do not support, and on CPU tensors
            it needs ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests). ``"torch"`` always runs
            PyTorch.

    Returns:
        (B, H, Lq, D) in the input dtype (the autocast dtype under ``torch.autocast``). Selection and softmax run
        in at least fp32. A query with no attendable key gets zeros, in forward and backward. Of tied scores at
        the k-th place, the Triton backend keeps the lowest key indices; PyTorch's choice among ties is unspecified.
    """
    _check_arguments(query, key, value, topk, query_chunk_size, key_padding_mask, bias, dropout_p)
    if position_bias is not None:
        check_position_bias(position_bias, query)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if bias is not None and bias.is_floating_point():
            bias = bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _dispatch(query, key, value, bias, key_padding_mask, topk, query_chunk_size, scale, dropout_p,
                             causal, backend, position_bias)
    return _dispatch(query, key, value, bias, key_padding_mask, topk, query_chunk_size, scale, dropout_p, causal,
                     backend, position_bias)


def _dispatch(query, key, value, bias, key_padding_mask, topk, query_chunk_size, scale, dropout_p, causal, backend,
              position_bias):
    if resolve_backend(backend, query, key, topk=topk, bias=bias, position_bias=position_bias,
                       scale=scale) == "triton":
        from topk_lightning.ops.triton_backend import TritonTopKAttention

        return TritonTopKAttention.apply(query, key, value, key_padding_mask, topk, scale, dropout_p, causal)
    relative_weight = None if position_bias is None else position_bias.weight
    backward_follows = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, bias, relative_weight)
    )
    return TorchTopKAttention.apply(
        query, key, value, bias, key_padding_mask, topk, query_chunk_size, scale, dropout_p, causal, relative_weight,
        position_bias, backward_follows,
    )


def resolve_backend(
    backend: str,
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    topk: int,
    bias: torch.Tensor | None = None,
    position_bias: RelativePositionBias | None = None,
    scale: float | None = None,
) -> str:
    """The backend that ``topk_attention(..., backend=backend)`` runs for these arguments: "torch" or "triton".

    Raises:
        ValueError: for an unknown backend name, or ``"triton"`` where the kernels cannot run (naming why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and query.device.type != "cuda"):
        return "torch"
    reason = _triton_unavailable_reason(query)
    if reason is None:
        from topk_lightning.ops.triton_backend import unsupported_reason

        reason = unsupported_reason(query, key, topk=topk, bias=bias, position_bias=position_bias, scale=scale)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run here: {reason}; use backend='auto' or 'torch'")
    return "torch"


def _triton_unavailable_reason(query: torch.Tensor) -> str | None:
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the tensors are on {query.device.type!r}; the kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "(set before the first call) to run in Triton's interpreter on the CPU"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    return None


def _check_arguments(query, key, value, topk, query_chunk_size, key_padding_mask, bias, dropout_p) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got {shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype} and {value.dtype}"
        )
    batch, heads, _, head_dim = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(
            f"key must be (B={batch}, Hkv, Lk, D={head_dim}) to match query {tuple(query.shape)}, "
            f"got {tuple(key.shape)}"
        )
    if key.shape[1] == 0 or heads % key.shape[1] != 0:
        raise ValueError(f"the number of key/value heads ({key.shape[1]}) must divide the query heads ({heads})")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if isinstance(query_chunk_size, bool) or not isinstance(query_chunk_size, int) or query_chunk_size <= 0:
        raise ValueError(f"query_chunk_size must be a positive int, got {query_chunk_size!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    k_len = key.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (B, Lk) = ({batch}, {k_len}), got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
    if bias is not None:
        target = (batch, heads, query.shape[2], k_len)
        if (
            not bias.is_floating_point()
            or bias.dim() > 4
            or any(b not in (1, t) for b, t in zip(bias.shape[::-1], target[::-1]))
        ):
            raise ValueError(
                f"bias must be a float tensor broadcastable to (B, H, Lq, Lk) = {target}, got "
                f"{bias.dtype} {tuple(bias.shape)}"
            )
