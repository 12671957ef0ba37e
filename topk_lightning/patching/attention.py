"""The "topk" attention implementation, plugged into transformers' `AttentionInterface` and `AttentionMaskInterface`.

transformers v5 models call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` inside their
attention modules, and build their masks with ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. Both
registries are keyed by name, so registering ``"topk"`` in both makes any model that uses them run top-k attention
once ``config._attn_implementation == "topk"``:

    create_bidirectional_mask / create_causal_mask      ->  key_padding_mask(...)       (B, Lk) bool or None
    BertSelfAttention.forward (and friends)             ->  topk_attention_forward(...)  ops.topk_attention

The mask builder matters: for a name missing from `AttentionMaskInterface`, transformers' `_preprocess_mask_arguments`
returns ``attention_mask=None``, so padded keys would silently be attended to. Ours hands over the 2D key-padding mask
itself, never an L x L mask, because top-k attention only needs to know which keys exist.

Settings per attention module (the keys kept, or exact attention for layers `apply_topk` left out) live in the
module attribute named by `LAYER_SETTINGS_ATTR`; a module without it (a model loaded with
``attn_implementation="topk"``) uses the `TopKConfig` defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
from transformers.utils import logging

from topk_lightning import ops
from topk_lightning.patching import relative_bias
from topk_lightning.patching.config import TopKConfig

logger = logging.get_logger(__name__)

ATTN_IMPLEMENTATION = "topk"
LAYER_SETTINGS_ATTR = "topk_lightning_attention"


@dataclass(frozen=True, kw_only=True)
class LayerAttention:
    """How one attention module runs under ``attn_implementation="topk"``.

    Args:
        topk: keys kept per query; ``None`` means exact attention (torch SDPA with the padding mask).
        query_chunk_size: queries whose scores are materialised at once (see `TopKConfig`).
        backend: the `topk_attention` backend (see `TopKConfig`).
    """

    topk: int | None
    query_chunk_size: int
    backend: str = "auto"


_DEFAULTS = TopKConfig()
DEFAULT_LAYER_ATTENTION = LayerAttention(
    topk=_DEFAULTS.topk, query_chunk_size=_DEFAULTS.query_chunk_size, backend=_DEFAULTS.backend
)


def key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=bidirectional_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder for `AttentionMaskInterface`: the (B, kv_length) bool key-padding mask (True = attend), or None.

    Called by transformers' ``create_bidirectional_mask`` / ``create_causal_mask`` with the user's 2D mask already
    cast to bool. Causality is not encoded here: `topk_attention_forward` reads it from the module. Returns None when
    nothing is padded, so unpadded batches skip the masking work.

    Raises:
        NotImplementedError: for mask patterns other than plain bidirectional or causal (sliding windows, packed
            sequences, custom ``or_mask_function`` / ``and_mask_function``), which a key-padding mask cannot express.
    """
    if mask_function is not bidirectional_mask_function and mask_function is not causal_mask_function:
        raise NotImplementedError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" supports plain bidirectional or causal masks with key '
            f"padding only; got the mask function {getattr(mask_function, '__qualname__', mask_function)!r} "
            "(sliding window, packed sequences or a custom mask overlay)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"attention_mask must cover all {kv_length} keys of the {batch_size} sequences, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    if bool(mask.all()):
        return None
    return mask


def _key_padding_from_4d(mask: torch.Tensor, *, causal: bool) -> torch.Tensor | None:
    """Reduce a user-supplied 4D mask (B or 1, 1, Lq, Lk) to a (B, Lk) key-padding mask, or raise.

    transformers passes a 4D mask through untouched, so this is where one arrives. Bool masks use True = attend;
    float masks are additive (0 = attend, a very negative value or -inf = masked). The mask is accepted only if it is
    exactly key padding (intersected with the causal pattern for causal modules) on every query row that attends to
    anything; rows that attend to nothing (padded queries) are ignored.
    """
    if mask.shape[1] != 1:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" accepts a 4D attention_mask only with one head '
            f"(shape (B, 1, Lq, Lk)), got shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    elif not mask.is_floating_point():
        allowed = mask[:, 0] != 0
    else:
        masked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | masked).all()):
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}" got a 4D float attention_mask with values other than 0 '
                "and a large negative number: that is an additive bias, not a padding mask; top-k attention supports "
                "key padding only"
            )
        allowed = ~masked[:, 0]
    q_len, kv_len = allowed.shape[-2:]
    keys = allowed.any(dim=-2)
    expected = keys[:, None, :].expand_as(allowed)
    if causal:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
        expected = expected & visible
    rows = allowed.any(dim=-1, keepdim=True)
    if not bool(((allowed == expected) | ~rows).all()):
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" accepts a 4D attention_mask only if it is a key-padding mask '
            f"{'combined with the causal pattern ' if causal else ''}(the same keys for every query); got a mask "
            "that differs between queries. Pass the 2D (B, L) padding mask instead."
        )
    return None if bool(keys.all()) else keys


def _to_key_padding(
    attention_mask: torch.Tensor | None, *, batch: int, kv_length: int, causal: bool
) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.ndim == 4:
        keys = _key_padding_from_4d(attention_mask, causal=causal)
        if keys is not None and keys.shape[0] == 1 and batch > 1:
            keys = keys.expand(batch, -1).contiguous()
        return keys
    if attention_mask.ndim == 2:
        if attention_mask.shape != (batch, kv_length):
            raise ValueError(
                f"attention_mask must be a (batch, keys) = ({batch}, {kv_length}) padding mask, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        return attention_mask.to(torch.bool)
    raise ValueError(
        f'attn_implementation="{ATTN_IMPLEMENTATION}" expects a 2D (B, Lk) key-padding mask or a 4D (B, 1, Lq, Lk) '
        f"mask, got shape {tuple(attention_mask.shape)}"
    )


def topk_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for `AttentionInterface`, with the signature of transformers' ``sdpa_attention_forward``.

    Args:
        module: the calling attention module; its `LAYER_SETTINGS_ATTR` attribute (set by `apply_topk`) gives the
            keys kept, and its ``is_causal`` attribute the causality unless ``is_causal`` is passed.
        query: (B, H, Lq, D). key, value: (B, Hkv, Lk, D) with Hkv dividing H.
        attention_mask: what `key_padding_mask` built, (B, Lk) bool or None; a user's 4D mask is reduced to key
            padding when it is one (see `_key_padding_from_4d`) and rejected otherwise.
        dropout: attention dropout probability (transformers passes 0.0 in eval mode).
        scaling: score multiplier, default D ** -0.5.
        position_bias (in kwargs, from T5-family models): the relative bias, as the lazy description that
            `relative_bias` makes T5 hand over (computed per score tile), or a tensor (added as it is).

    Returns:
        ``(attn_output, None)`` with attn_output (B, Lq, H, D); attention weights are never materialised.
    """
    if kwargs.get("output_attentions", False):
        logger.warning_once(f'attn_implementation="{ATTN_IMPLEMENTATION}" does not return attention weights')
    if kwargs.get("softcap") is not None:
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" does not support softcap')
    lazy_bias, dense_bias = relative_bias.split_position_bias(module, kwargs.get("position_bias"))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    batch, heads, _, _ = query.shape
    padding = _to_key_padding(attention_mask, batch=batch, kv_length=key.shape[2], causal=causal)
    settings: LayerAttention = getattr(module, LAYER_SETTINGS_ATTR, DEFAULT_LAYER_ATTENTION)

    if settings.topk is None and not causal and lazy_bias is None and dense_bias is None:
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=None if padding is None else padding[:, None, None, :],
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=key.shape[1] != heads,
        )
    else:
        # Exact causal attention also goes through topk_attention (topk = Lk): its causal pattern is aligned to the
        # last key, as a KV cache needs, whereas SDPA's is_causal aligns to the first. So does exact attention with
        # a relative bias, which SDPA could only take as a materialised (Lq, Lk) table.
        output = ops.topk_attention(
            query,
            key,
            value,
            topk=key.shape[2] if settings.topk is None else settings.topk,
            query_chunk_size=settings.query_chunk_size,
            key_padding_mask=padding,
            scale=scaling,
            dropout_p=dropout,
            causal=causal,
            backend=settings.backend,
            bias=dense_bias,
            position_bias=lazy_bias,
        )
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"topk"`` with `AttentionInterface` and `AttentionMaskInterface` (idempotent).

    Registration is global (class-level mappings in transformers), so every model created afterwards accepts
    ``attn_implementation="topk"`` in ``from_pretrained``, its config, or ``set_attn_implementation``. It also patches
    the T5-family attention classes so that, under "topk" only, they hand over their relative position bias as a
    description instead of a (1, H, L, L) tensor (`relative_bias`).
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, topk_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, key_padding_mask)
    relative_bias.install(ATTN_IMPLEMENTATION)  # T5's position bias: no registry reaches it
