"""The math: top-k attention and feed-forward operators in plain PyTorch (no Lightning, no transformers)."""

from topk_lightning.ops.feedforward import chunked_feed_forward, topk_feed_forward
from topk_lightning.ops.reference import dense_attention
from topk_lightning.ops.topk_attention import topk_attention

__all__ = ["chunked_feed_forward", "dense_attention", "topk_attention", "topk_feed_forward"]
