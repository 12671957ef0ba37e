"""The bridge to Hugging Face transformers v5: "topk" attention registration, `apply_topk`, position tables.

Importing this package (which ``import topk_lightning`` does) registers ``"topk"`` with transformers'
`AttentionInterface` and `AttentionMaskInterface`.
"""

from topk_lightning.patching.apply import apply_topk, plain_config, remove_topk
from topk_lightning.patching.attention import ATTN_IMPLEMENTATION, register
from topk_lightning.patching.config import TopKConfig
from topk_lightning.patching.families import FAMILIES
from topk_lightning.patching.positions import extend_position_embeddings, max_input_tokens

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FAMILIES",
    "TopKConfig",
    "apply_topk",
    "extend_position_embeddings",
    "max_input_tokens",
    "plain_config",
    "remove_topk",
]
