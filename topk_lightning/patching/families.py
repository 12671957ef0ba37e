"""The model families `apply_topk` supports, one entry each: where the layers, attention modules and FF blocks are.

Attention needs nothing per family: every family here calls transformers' `AttentionInterface`, so the "topk"
registration reaches it. The feed-forward block is not behind a registry, so each family names the method that
computes it (the one transformers itself hands to ``apply_chunking_to_forward``) and gives the top-k version of it:

    family      FF method replaced             first map, activation, second map      then, unchanged
    BERT-like   BertLayer.feed_forward_chunk   intermediate.dense, act, output.dense  output.dropout, residual,
                                                                                      output.LayerNorm
    DistilBERT  FFN.ff_chunk                   lin1, activation, lin2                 dropout (LayerNorm: outside)
    ALBERT      AlbertLayer.ff_chunk           ffn, activation, ffn_output            (residual, LayerNorm: outside)
    T5          T5LayerFF.forward              (RMS norm first) wi, act, dropout, wo  dropout, residual
                  gated (v1.1, flan):          act(wi_0) * wi_1, dropout, wo

BERT-like = BERT, RoBERTa, XLM-RoBERTa, ELECTRA (same layer code in transformers v5). T5 = T5, MT5, UMT5 (the same
layer code; T5's relative position bias is handed over lazily by `relative_bias`).

Top-k FF in T5's gated layers (``T5DenseGatedActDense``: ``wo(act(wi_0 x) * wi_1 x)``) ranks the units by the gate's
pre-activation ``wi_0 x``, computes ``wi_1 x`` for the kept units only, and keeps ``act(wi_0 x) * wi_1 x`` of those.
Why the gate: it is the map the activation reads, so it plays the role the paper gives the first map (FF as
attention: its rows are the keys, the activation replaces the softmax); GELU is increasing above -0.75 and near zero
below, so a high gate pre-activation means an open unit, and a closed gate silences a unit whatever ``wi_1 x`` is;
and only one (tokens x d_ff) product is needed to select instead of two. What it ignores: the size of ``wi_1 x``,
so a unit with an open gate and a small up-projection can displace one with a half-open gate and a large one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from topk_lightning import ops
from topk_lightning.errors import InputError
from topk_lightning.patching import relative_bias


def _declares_attention_backend(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "_supports_attention_backend", False))


@dataclass(frozen=True, kw_only=True)
class Family:
    """How to reach the patchable parts of one architecture family.

    Args:
        name: for messages.
        layers: model -> the layer modules that `TopKConfig.layers` indexes, in order.
        attention_modules: layer -> the modules that call the attention interface (self- and cross-attention).
        feed_forward_owner: layer -> the module whose `feed_forward_method` computes the FF block of one chunk.
        feed_forward_method: name of that method; it takes the (B, L, hidden) input and returns the block's output.
        topk_feed_forward: (owner, hidden, topk) -> what `feed_forward_method` returns, with the two linear maps
            replaced by ``ops.topk_feed_forward`` keeping ``topk`` units per token.
        intermediate_size: owner -> number of FF units (``topk`` is clamped to it).
        routes_attention: model -> whether its attention modules call transformers' `AttentionInterface` (so the
            "topk" registration reaches them); default: the class declares ``_supports_attention_backend``.

    The callables are module-level functions, so that a patched model can be pickled.
    """

    name: str
    layers: Callable[[PreTrainedModel], list[nn.Module]]
    attention_modules: Callable[[nn.Module], list[nn.Module]]
    feed_forward_owner: Callable[[nn.Module], nn.Module]
    feed_forward_method: str
    topk_feed_forward: Callable[[nn.Module, torch.Tensor, int], torch.Tensor]
    intermediate_size: Callable[[nn.Module], int]
    routes_attention: Callable[[PreTrainedModel], bool] = _declares_attention_backend


def _same(module: nn.Module) -> nn.Module:
    return module


def _own_attention(layer: nn.Module) -> list[nn.Module]:
    return [layer.attention]


# BERT, RoBERTa, XLM-RoBERTa, ELECTRA: BertLayer-style layers in base_model.encoder.layer.
def _bert_layers(model: PreTrainedModel) -> list[nn.Module]:
    return list(model.base_model.encoder.layer)


def _bert_attention_modules(layer: nn.Module) -> list[nn.Module]:
    modules = [layer.attention.self]
    if hasattr(layer, "crossattention"):
        modules.append(layer.crossattention.self)
    return modules


def _bert_topk_feed_forward(layer: nn.Module, hidden: torch.Tensor, topk: int) -> torch.Tensor:
    intermediate, output = layer.intermediate, layer.output
    projected = ops.topk_feed_forward(
        hidden,
        intermediate.dense.weight,
        intermediate.dense.bias,
        output.dense.weight,
        output.dense.bias,
        topk=topk,
        activation=intermediate.intermediate_act_fn,
    )
    return output.LayerNorm(output.dropout(projected) + hidden)


def _bert_intermediate_size(layer: nn.Module) -> int:
    return layer.intermediate.dense.out_features


BERT_LIKE = Family(
    name="BERT-like",
    layers=_bert_layers,
    attention_modules=_bert_attention_modules,
    feed_forward_owner=_same,
    feed_forward_method="feed_forward_chunk",
    topk_feed_forward=_bert_topk_feed_forward,
    intermediate_size=_bert_intermediate_size,
)


# DistilBERT: TransformerBlock layers in base_model.transformer.layer; the FF block is the FFN submodule.
def _distilbert_layers(model: PreTrainedModel) -> list[nn.Module]:
    return list(model.base_model.transformer.layer)


def _distilbert_topk_feed_forward(ffn: nn.Module, hidden: torch.Tensor, topk: int) -> torch.Tensor:
    projected = ops.topk_feed_forward(
        hidden, ffn.lin1.weight, ffn.lin1.bias, ffn.lin2.weight, ffn.lin2.bias, topk=topk, activation=ffn.activation
    )
    return ffn.dropout(projected)


def _distilbert_ffn(layer: nn.Module) -> nn.Module:
    return layer.ffn


def _distilbert_intermediate_size(ffn: nn.Module) -> int:
    return ffn.lin1.out_features


DISTILBERT = Family(
    name="DistilBERT",
    layers=_distilbert_layers,
    attention_modules=_own_attention,
    feed_forward_owner=_distilbert_ffn,
    feed_forward_method="ff_chunk",
    topk_feed_forward=_distilbert_topk_feed_forward,
    intermediate_size=_distilbert_intermediate_size,
)


# ALBERT: num_hidden_groups groups of inner_group_num AlbertLayer modules, reused across depth (with the default
# num_hidden_groups=1 every depth runs the same group). "Layers" are these weight-owning modules, group by group.
def _albert_layers(model: PreTrainedModel) -> list[nn.Module]:
    return [layer for group in model.base_model.encoder.albert_layer_groups for layer in group.albert_layers]


def _albert_topk_feed_forward(layer: nn.Module, hidden: torch.Tensor, topk: int) -> torch.Tensor:
    return ops.topk_feed_forward(
        hidden,
        layer.ffn.weight,
        layer.ffn.bias,
        layer.ffn_output.weight,
        layer.ffn_output.bias,
        topk=topk,
        activation=layer.activation,
    )


def _albert_intermediate_size(layer: nn.Module) -> int:
    return layer.ffn.out_features


ALBERT = Family(
    name="ALBERT",
    layers=_albert_layers,
    attention_modules=_own_attention,
    feed_forward_owner=_same,
    feed_forward_method="ff_chunk",
    topk_feed_forward=_albert_topk_feed_forward,
    intermediate_size=_albert_intermediate_size,
)


# T5, MT5, UMT5: blocks of base_model.encoder (and .decoder, after the encoder's); block.layer holds the
# self-attention, the cross-attention (decoder blocks) and last the FF (T5LayerFF), all position-wise after the norm.
def _t5_layers(model: PreTrainedModel) -> list[nn.Module]:
    base = model.base_model
    stacks = [getattr(base, name, None) for name in ("encoder", "decoder")]
    return [block for stack in stacks if stack is not None for block in stack.block]


def _t5_attention_modules(block: nn.Module) -> list[nn.Module]:
    modules = [getattr(sublayer, name, None) for sublayer in block.layer for name in ("SelfAttention", "EncDecAttention")]
    return [module for module in modules if module is not None]


def _t5_feed_forward_layer(block: nn.Module) -> nn.Module:
    return block.layer[-1]


def _t5_topk_feed_forward(layer: nn.Module, hidden: torch.Tensor, topk: int) -> torch.Tensor:
    dense = layer.DenseReluDense
    common = dict(
        topk=topk, activation=dense.act, dropout_p=dense.dropout.p if dense.training else 0.0,
        w_out=dense.wo.weight, b_out=dense.wo.bias,
    )
    normed = layer.layer_norm(hidden)
    if hasattr(dense, "wi_0"):  # gated: act(wi_0 x) * wi_1 x, ranked on the gate wi_0 (see the module docstring)
        projected = ops.topk_feed_forward(
            normed, dense.wi_1.weight, dense.wi_1.bias, w_gate=dense.wi_0.weight, b_gate=dense.wi_0.bias, **common
        )
    else:
        projected = ops.topk_feed_forward(normed, dense.wi.weight, dense.wi.bias, **common)
    return hidden + layer.dropout(projected.to(hidden.dtype))


def _t5_intermediate_size(layer: nn.Module) -> int:
    return layer.DenseReluDense.wo.in_features


def _t5_routes_attention(model: PreTrainedModel) -> bool:
    # T5 calls AttentionInterface but leaves _supports_attention_backend False, because its attention functions
    # receive a position_bias; transformers' own attention classes are the ones `relative_bias` patches.
    return all(
        relative_bias.is_bridged(module) for layer in _t5_layers(model) for module in _t5_attention_modules(layer)
    )


T5 = Family(
    name="T5",
    layers=_t5_layers,
    attention_modules=_t5_attention_modules,
    feed_forward_owner=_t5_feed_forward_layer,
    feed_forward_method="forward",
    topk_feed_forward=_t5_topk_feed_forward,
    intermediate_size=_t5_intermediate_size,
    routes_attention=_t5_routes_attention,
)


FAMILIES: dict[str, Family] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    "distilbert": DISTILBERT,
    "albert": ALBERT,
    "t5": T5,
    "mt5": T5,
    "umt5": T5,
}


def family_of(model: nn.Module) -> Family:
    """The `Family` of ``model``, or a clear error if `apply_topk` cannot patch it.

    A model is supported when its ``config.model_type`` is in `FAMILIES` and its class routes attention through
    transformers' `AttentionInterface` (checked the way ``set_attn_implementation`` checks it). Otherwise setting
    ``attn_implementation="topk"`` would change nothing, so we raise instead of patching silently nothing.

    Raises:
        TypeError: ``model`` is not a transformers `PreTrainedModel`.
        InputError: the architecture is not supported; the message names the class (a ``ValueError``).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"apply_topk expects a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    cls = type(model).__name__
    if model_type not in FAMILIES:
        raise InputError(
            f"{cls} (model_type={model_type!r}) is not supported by top-k patching: its attention does not go through "
            "transformers' AttentionInterface or its layers are not in topk_lightning's family table. Supported "
            f"model types: {', '.join(sorted(FAMILIES))}"
        )
    if not type(model)._can_set_attn_implementation() or not FAMILIES[model_type].routes_attention(model):
        raise InputError(
            f"{cls} (model_type={model_type!r}) does not route attention through transformers' AttentionInterface "
            "(remote or legacy modeling code?), so top-k attention cannot be plugged in"
        )
    return FAMILIES[model_type]
