"""Top-k attention and chunked feed-forward layers for Hugging Face encoders, fine-tuned with PyTorch Lightning.

Importing the package registers ``attn_implementation="topk"`` with transformers (see `topk_lightning.patching`).
"""

from topk_lightning.ops import topk_attention
from topk_lightning.patching import TopKConfig, apply_topk, extend_position_embeddings, remove_topk

__all__ = ["TopKConfig", "apply_topk", "extend_position_embeddings", "remove_topk", "topk_attention"]
