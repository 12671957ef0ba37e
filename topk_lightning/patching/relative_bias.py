"""T5's relative position bias under ``attn_implementation="topk"``: handed over as a description, never as a table.

transformers' T5 builds the bias in the first layer of each stack, ``T5Attention.compute_bias`` -> (1, H, Lq, Lk),
and passes that tensor to every later layer and to the attention function as ``position_bias`` (12.9 GB in fp32 at
L=16,384 with 12 heads). Attention modules without a bias of their own (cross-attention) build zeros of shape
(1, H, Lq, Lk) instead. No registry reaches either, so the attention classes are patched here, once, when
``topk_lightning`` is imported; each patch acts only while the module's config says ``"topk"``, so every other
implementation runs transformers' code untouched:

    compute_bias(Lq, Lk, past_seen_tokens)  ->  ops.RelativePositionBias(weight, bidirectional=not is_decoder,
                                                num_buckets, max_distance, query_offset=past_seen_tokens)
    forward(position_bias=None) in a module
    without its own bias (T5/MT5 cross-attention)  ->  forward(position_bias=NO_POSITION_BIAS): no zeros built

The description flows through the layers exactly where the tensor did (T5Block returns it, T5Stack shares it), and
`topk_attention_forward` hands it to ``ops.topk_attention``, which computes the bias one score tile at a time.

Classes: T5Attention, MT5Attention (the same code) and UMT5Attention (a bias in every self-attention layer, computed
in its forward through ``compute_bias``, so the first patch covers it). UMT5's forward takes no ``position_bias``
and always builds the cross-attention zeros, (1, H, L_decoder, L_encoder): linear in the encoder length; the
attention function does not read them (`split_position_bias`).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers.models.mt5.modeling_mt5 import MT5Attention
from transformers.models.t5.modeling_t5 import T5Attention
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from topk_lightning.ops import RelativePositionBias

ATTENTION_CLASSES = (T5Attention, MT5Attention, UMT5Attention)


class _NoPositionBias:
    """Stands for "no bias" where T5 would build a tensor of zeros. One instance: `NO_POSITION_BIAS`."""

    def __repr__(self) -> str:
        return "NO_POSITION_BIAS"

    def __reduce__(self):  # pickling and deepcopy keep the singleton
        return "NO_POSITION_BIAS"


NO_POSITION_BIAS = _NoPositionBias()

_ORIGINALS: dict[type, dict[str, object]] = {}
_implementation: str | None = None  # the name the patches answer to, set by `install`


def _runs_topk(module: nn.Module) -> bool:
    return _implementation is not None and getattr(module.config, "_attn_implementation", None) == _implementation


def _lazy_compute_bias(original):
    @functools.wraps(original)
    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        if not _runs_topk(self):
            return original(self, query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        return RelativePositionBias(
            weight=self.relative_attention_bias.weight,
            bidirectional=not self.is_decoder,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
            query_offset=int(past_seen_tokens),
        )

    return compute_bias


def _forward_without_zero_bias(original):
    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        # position_bias is the fourth parameter; T5's layers always pass it by keyword.
        if (
            len(args) < 3
            and kwargs.get("position_bias") is None
            and not self.has_relative_attention_bias
            and _runs_topk(self)
        ):
            kwargs["position_bias"] = NO_POSITION_BIAS
        return original(self, hidden_states, *args, **kwargs)

    return forward


def install(implementation: str) -> None:
    """Patch `ATTENTION_CLASSES` to act under ``attn_implementation=implementation`` (idempotent). Called by
    `topk_lightning.patching.attention.register`."""
    global _implementation
    _implementation = implementation
    for cls in ATTENTION_CLASSES:
        if cls in _ORIGINALS:
            continue
        originals = {"compute_bias": cls.compute_bias, "forward": cls.forward}
        cls.compute_bias = _lazy_compute_bias(cls.compute_bias)
        if "position_bias" in inspect.signature(cls.forward).parameters:
            cls.forward = _forward_without_zero_bias(cls.forward)
        _ORIGINALS[cls] = originals


def split_position_bias(
    module: nn.Module, position_bias: object
) -> tuple[RelativePositionBias | None, torch.Tensor | None]:
    """What the attention function received as ``position_bias``, as (lazy description, additive tensor).

    A `RelativePositionBias` is lazy; `NO_POSITION_BIAS` and None are no bias; UMT5 cross-attention's zeros (see the
    module docstring) are dropped; any other tensor is an additive bias, used as it is (slower, quadratic).
    """
    if position_bias is None or position_bias is NO_POSITION_BIAS:
        return None, None
    if isinstance(position_bias, RelativePositionBias):
        return position_bias, None
    if isinstance(position_bias, torch.Tensor):
        if isinstance(module, UMT5Attention) and not module.has_relative_attention_bias:
            return None, None
        return None, position_bias
    raise TypeError(f"position_bias must be a tensor, a RelativePositionBias or None, got {type(position_bias).__name__}")


def is_bridged(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module whose bias this bridge hands over lazily."""
    return isinstance(module, tuple(_ORIGINALS))
