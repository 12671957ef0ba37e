"""`extend_position_embeddings`: let a model with a learned absolute position table read longer inputs.

New rows are copies of the pretrained table, repeated (as Longformer initialised its 4,096 positions from RoBERTa's
512): each copy keeps the local structure the model learned (neighbouring positions look alike), which fine-tuning
adapts much faster than random rows.

RoBERTa-style tables (RoBERTa, XLM-R) reserve their first ``padding_idx + 1`` rows (real positions start at
``padding_idx + 1``); those rows are kept as they are and only the rows after them are tiled:

    old:  [r0 r1 | p0 p1 ... p511]                  (padding_idx = 1)
    new:  [r0 r1 | p0 ... p511 p0 ... p511 p0 ...]  cut at padding_idx + 1 + max_positions rows
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from topk_lightning.errors import InputError


def _position_table(model: PreTrainedModel) -> tuple[nn.Module, nn.Embedding]:
    config = model.config
    cls = type(model).__name__
    embedding_type = getattr(config, "position_embedding_type", "absolute")
    if embedding_type != "absolute":
        raise ValueError(
            f"{cls} uses position_embedding_type={embedding_type!r}; extend_position_embeddings needs a learned "
            "absolute position table"
        )
    if getattr(config, "sinusoidal_pos_embds", False):
        raise ValueError(f"{cls} uses sinusoidal position embeddings, not a learned table that could be extended")
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError(
            f"{cls} has no learned absolute position table (expected base_model.embeddings.position_embeddings to be "
            "an nn.Embedding); extend_position_embeddings cannot extend it"
        )
    return embeddings, table


def extend_position_embeddings(model: PreTrainedModel, max_positions: int) -> PreTrainedModel:
    """Extend ``model``'s learned absolute position table to ``max_positions`` tokens, in place, and return it.

    Args:
        model: a transformers model whose ``base_model.embeddings.position_embeddings`` is an ``nn.Embedding``
            (BERT, RoBERTa, XLM-R, ELECTRA, ALBERT, DistilBERT without sinusoidal positions).
        max_positions: the number of tokens the model must accept (>= 1). For RoBERTa-style tables the table gets
            ``padding_idx + 1`` more rows, so ``config.max_position_embeddings`` becomes
            ``max_positions + padding_idx + 1`` (514 for 512 tokens, as in the pretrained config).

    Replaces the ``nn.Embedding`` (create optimizers afterwards), sets ``config.max_position_embeddings``, and
    extends the embeddings module's ``position_ids`` / ``token_type_ids`` buffers. A no-op if the table is already
    long enough. The tokenizer's ``model_max_length`` is not the model's business and is left alone.

    Raises:
        ValueError: ``max_positions`` is not an int >= 1, or the model has no learned absolute table (the message
            names the class).
    """
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise InputError(f"max_positions must be an int >= 1 (number of tokens), got {max_positions!r}")
    embeddings, table = _position_table(model)
    offset = 0 if table.padding_idx is None else table.padding_idx + 1
    old_rows = table.num_embeddings
    new_rows = offset + max_positions
    if new_rows <= old_rows:
        return model
    if old_rows <= offset:
        raise ValueError(
            f"{type(model).__name__}'s position table has no learned rows after its {offset} reserved ones"
        )

    weight = table.weight
    learned = weight.detach()[offset:]
    repeats = -(-max_positions // learned.shape[0])
    new_table = nn.Embedding(
        new_rows, table.embedding_dim, padding_idx=table.padding_idx, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new_table.weight[:offset] = weight[:offset]
        new_table.weight[offset:] = learned.repeat(repeats, 1)[:max_positions]
    new_table.weight.requires_grad_(weight.requires_grad)
    embeddings.position_embeddings = new_table
    model.config.max_position_embeddings = new_rows

    for name in ("position_ids", "token_type_ids"):
        buffer = embeddings._buffers.get(name)
        if buffer is None:
            continue
        if name == "position_ids":
            extended = torch.arange(new_rows, dtype=buffer.dtype, device=buffer.device).expand(1, -1)
        else:
            extended = torch.zeros(1, new_rows, dtype=buffer.dtype, device=buffer.device)
        embeddings.register_buffer(name, extended, persistent=name not in embeddings._non_persistent_buffers_set)
    return model


def max_input_tokens(model: PreTrainedModel) -> int | None:
    """How many tokens ``model``'s learned absolute position table admits (reserved RoBERTa rows left out), or
    ``None`` when it has no such table (relative or rotary positions)."""
    try:
        _, table = _position_table(model)
    except ValueError:
        return None
    offset = 0 if table.padding_idx is None else table.padding_idx + 1
    return table.num_embeddings - offset
