"""Tiny random models (hidden 32, 2 layers, 4 heads, FF 64, vocab 100) of every supported family, and padded batches.

"t5" is the encoder alone (``T5EncoderModel``: ReLU FF, relative position bias with 8 buckets up to distance 12, so
that a 16-token batch reaches the log-spaced buckets); tests/patching/test_t5.py covers the rest of the T5 family.
"""

from __future__ import annotations

import torch
import transformers

import topk_lightning  # noqa: F401  (registers "topk")

FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "t5"]
SEQ_LEN = 16
PAD_FROM = 11  # the second sequence of the batch is padded from this position on

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def tiny_config(family: str, **overrides) -> transformers.PreTrainedConfig:
    if family == "bert":
        config = transformers.BertConfig(**_COMMON, max_position_embeddings=64)
    elif family == "roberta":
        config = transformers.RobertaConfig(**_COMMON, max_position_embeddings=66, pad_token_id=1)
    elif family == "xlm-roberta":
        config = transformers.XLMRobertaConfig(**_COMMON, max_position_embeddings=66, pad_token_id=1)
    elif family == "electra":
        config = transformers.ElectraConfig(**_COMMON, embedding_size=16, max_position_embeddings=64)
    elif family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=64
        )
    elif family == "albert":
        # Two weight-owning layer groups so that "layers" has two entries, like the other families.
        config = transformers.AlbertConfig(
            **_COMMON, embedding_size=16, num_hidden_groups=2, max_position_embeddings=64, pad_token_id=0
        )
    elif family == "t5":
        config = transformers.T5Config(
            d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, vocab_size=100, relative_attention_num_buckets=8,
            relative_attention_max_distance=12, pad_token_id=0,
        )
    else:
        raise ValueError(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def tiny_model(family: str, *, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny random ``<Family>Model`` in eval mode (dropout off), fp32."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    if family == "t5":  # AutoModel would give the encoder-decoder T5Model
        model = transformers.T5EncoderModel._from_config(config, attn_implementation=attn_implementation)
    else:
        model = transformers.AutoModel.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def padded_batch(family: str, *, seed: int = 1, length: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    """Two sequences; the second is right-padded with the pad token from PAD_FROM on."""
    pad_id = tiny_config(family).pad_token_id
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 100, (2, length), generator=generator)
    if family == "t5":
        # No token twice in a row: with a relative bias, equal tokens at distances that share a bucket tie exactly,
        # and which of tied keys top-k keeps is unspecified.
        input_ids = torch.stack([torch.randperm(98, generator=generator)[:length] + 2 for _ in range(2)])
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, PAD_FROM:] = 0
    input_ids[1, PAD_FROM:] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def hidden(model, batch) -> torch.Tensor:
    return model(**batch).last_hidden_state


def max_diff_unpadded(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    keep = attention_mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def weighted_loss(output: torch.Tensor, attention_mask: torch.Tensor, *, seed: int = 7) -> torch.Tensor:
    """A loss whose gradient reaches every unpadded output with its own random weight.

    ``output.sum()`` would not do: the encoders end with a LayerNorm, whose outputs sum to a constant per token, so
    its gradients are rounding noise.
    """
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    return (output * weights)[attention_mask.bool()].sum()


def register_dense_topk_reference(topk: int) -> str:
    """Register (idempotent) and return an attention implementation name that computes top-k attention the plain way,
    with `ops.dense_attention` (every score materialised, masked to the ``topk`` largest per query): a reference that
    shares no code with `ops.topk_attention` or the bridge's attention function."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from topk_lightning.ops import dense_attention
    from topk_lightning.patching.attention import key_padding_mask

    name = f"dense-top{topk}-reference"

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        # T5 hands its relative bias over as position_bias (transformers' own (1, H, Lq, Lk) table here)
        out = dense_attention(query, key, value, topk=topk, key_padding_mask=attention_mask, scale=scaling,
                              bias=kwargs.get("position_bias"))
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, key_padding_mask)
    return name
