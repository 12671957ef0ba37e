"""`apply_topk` / `remove_topk`: switch an existing transformers model to top-k attention and FF in place, and back."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from topk_lightning import ops
from topk_lightning.patching.attention import ATTN_IMPLEMENTATION, LAYER_SETTINGS_ATTR, LayerAttention
from topk_lightning.patching.config import TopKConfig
from topk_lightning.patching.families import Family, family_of

_STATE_ATTR = "_topk_lightning_state"


class PatchedFeedForward:
    """Stands in for a family's FF method (e.g. ``BertLayer.feed_forward_chunk``) on one module instance.

    Runs the class's method, or the family's top-k version when ``ff_topk`` is set, on the whole (B, L, hidden)
    input or, when ``ff_chunk_size`` is set, on chunks of that many tokens via ``ops.chunked_feed_forward``.
    A plain object rather than a closure, so that ``copy.deepcopy(model)`` and pickling copy it along with its
    module.
    """

    def __init__(self, *, owner: nn.Module, family: Family, ff_topk: int | None, ff_chunk_size: int | None) -> None:
        self.owner = owner
        self.family = family
        self.ff_topk = None if ff_topk is None else min(ff_topk, family.intermediate_size(owner))
        self.ff_chunk_size = ff_chunk_size

    def _block(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.ff_topk is None:
            # The class's method, looked up at call time: no bound method is stored, so deepcopy and pickle
            # cannot end up calling this object again.
            return getattr(type(self.owner), self.family.feed_forward_method)(self.owner, hidden)
        return self.family.topk_feed_forward(self.owner, hidden, self.ff_topk)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.ff_chunk_size is None:
            return self._block(hidden)
        return ops.chunked_feed_forward(self._block, hidden, self.ff_chunk_size)


@dataclass
class _PatchState:
    attn_implementation: str | None
    attention_modules: list[nn.Module] = field(default_factory=list)
    # (module, method name, the instance attribute it had before, or None)
    feed_forwards: list[tuple[nn.Module, str, object]] = field(default_factory=list)


def apply_topk(model: PreTrainedModel, config: TopKConfig | None = None) -> PreTrainedModel:
    """Make ``model`` run top-k attention (and optionally chunked / top-k FF) in place, and return it.

    Sets ``attn_implementation="topk"`` (see `topk_lightning.patching.attention`), gives each attention module its
    settings (``config.topk`` in the chosen layers, exact attention elsewhere), and replaces the FF method of the
    chosen layers when ``ff_chunk_size`` or ``ff_topk`` is set. With ``config.topk=None`` the attention is left as it
    is (the model keeps its ``attn_implementation``) and only the FF layers are patched. Parameters, buffers and ``state_dict`` are untouched,
    so checkpoints stay plain Hugging Face checkpoints. Calling it again replaces the previous patch.

    ``config.layers`` indexes the model's layer modules: ``encoder.layer`` for BERT / RoBERTa / XLM-R / ELECTRA,
    ``transformer.layer`` for DistilBERT. ALBERT shares weights across depth: it indexes the distinct weight-owning
    ``AlbertLayer`` modules (``num_hidden_groups * inner_group_num`` of them, group by group; just one, index 0,
    with the default config), and a chosen module runs top-k at every depth that reuses it. T5 / MT5 / UMT5: the
    blocks of the encoder, then those of the decoder (``encoder.block + decoder.block``); a chosen decoder block runs
    top-k in its causal self-attention and its cross-attention. Their relative position bias reaches top-k attention
    as a description, computed per score tile (`topk_lightning.patching.relative_bias`).

    Raises:
        TypeError / ValueError: the model is not a supported architecture (the message names its class), or a
            layer index is out of range.
    """
    config = TopKConfig() if config is None else config
    if not isinstance(config, TopKConfig):
        raise TypeError(f"apply_topk expects config to be a TopKConfig or None, got {type(config).__name__}")
    family = family_of(model)
    layers = family.layers(model)
    chosen = set(range(len(layers))) if config.layers is None else set(config.layers)
    out_of_range = sorted(index for index in chosen if index >= len(layers))
    if out_of_range:
        raise ValueError(
            f"TopKConfig.layers has indices {out_of_range} out of range for {type(model).__name__}, which has "
            f"{len(layers)} {family.name} layer modules (valid indices 0..{len(layers) - 1})"
        )

    remove_topk(model)
    state = _PatchState(attn_implementation=model.config._attn_implementation)
    for index, layer in enumerate(layers):
        if config.topk is not None:
            settings = LayerAttention(
                topk=config.topk if index in chosen else None, query_chunk_size=config.query_chunk_size,
                backend=config.backend,
            )
            for module in family.attention_modules(layer):
                setattr(module, LAYER_SETTINGS_ATTR, settings)
                state.attention_modules.append(module)
        if index in chosen and (config.ff_chunk_size is not None or config.ff_topk is not None):
            owner = family.feed_forward_owner(layer)
            name = family.feed_forward_method
            state.feed_forwards.append((owner, name, owner.__dict__.get(name)))
            patched = PatchedFeedForward(
                owner=owner, family=family, ff_topk=config.ff_topk, ff_chunk_size=config.ff_chunk_size
            )
            setattr(owner, name, patched)
    setattr(model, _STATE_ATTR, state)
    if config.topk is not None:
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    return model


def remove_topk(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `apply_topk` in place and return ``model``: original FF methods and the previous attn_implementation.

    A model that runs "topk" without `apply_topk` (loaded with ``attn_implementation="topk"``), or whose
    implementation before `apply_topk` was "topk", goes back to transformers' default "sdpa". A model that was
    never patched is returned unchanged otherwise.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"remove_topk expects a transformers PreTrainedModel, got {type(model).__name__}")
    state: _PatchState | None = model.__dict__.get(_STATE_ATTR)
    previous = model.config._attn_implementation if state is None else state.attn_implementation
    if state is not None:
        for owner, name, before in reversed(state.feed_forwards):
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
        for module in state.attention_modules:
            module.__dict__.pop(LAYER_SETTINGS_ATTR, None)
        del model.__dict__[_STATE_ATTR]
    if previous == ATTN_IMPLEMENTATION:
        previous = "sdpa"
    if model.config._attn_implementation != previous:
        _set_attn_implementation(model, previous)
    return model


def _set_attn_implementation(model: PreTrainedModel, name: str) -> None:
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} did not accept attn_implementation={name!r} "
            f"(it kept {model.config._attn_implementation!r})"
        )


def plain_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of a model's ``config`` that names ``"sdpa"`` where it names ``"topk"`` (or nothing), for saving.

    A model saved with it (``save_pretrained``) loads with plain transformers, without ``import topk_lightning``.
    """
    config = copy.deepcopy(config)
    if getattr(config, "_attn_implementation", None) in (ATTN_IMPLEMENTATION, None):
        config._attn_implementation = "sdpa"
    return config
