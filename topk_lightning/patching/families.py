"""The model families `apply_topk` supports, one entry each: where the layers, attention modules and FF blocks are.

Attention needs nothing per family: every family here calls transformers' `AttentionInterface`, so the "topk"
registration reaches it. The feed-forward block is not behind a registry, so each family names the method that
computes it (the one transformers itself hands to ``apply_chunking_to_forward``) and gives the top-k version of it:

    family      FF method replaced             first map, activation, second map      then, unchanged
    BERT-like   BertLayer.feed_forward_chunk   intermediate.dense, act, output.dense  output.dropout, residual,
                                                                                      output.LayerNorm
    DistilBERT  FFN.ff_chunk                   lin1, activation, lin2                 dropout (LayerNorm: outside)
    ALBERT      AlbertLayer.ff_chunk           ffn, activation, ffn_output            (residual, LayerNorm: outside)

BERT-like = BERT, RoBERTa, XLM-RoBERTa, ELECTRA (same layer code in transformers v5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from topk_lightning import ops
from topk_lightning.errors import InputError


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

    The callables are module-level functions, so that a patched model can be pickled.
    """

    name: str
    layers: Callable[[PreTrainedModel], list[nn.Module]]
    attention_modules: Callable[[nn.Module], list[nn.Module]]
    feed_forward_owner: Callable[[nn.Module], nn.Module]
    feed_forward_method: str
    topk_feed_forward: Callable[[nn.Module, torch.Tensor, int], torch.Tensor]
    intermediate_size: Callable[[nn.Module], int]


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


FAMILIES: dict[str, Family] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    "distilbert": DISTILBERT,
    "albert": ALBERT,
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
    if not type(model)._can_set_attn_implementation() or not getattr(model, "_supports_attention_backend", False):
        raise InputError(
            f"{cls} (model_type={model_type!r}) does not route attention through transformers' AttentionInterface "
            "(remote or legacy modeling code?), so top-k attention cannot be plugged in"
        )
    return FAMILIES[model_type]
