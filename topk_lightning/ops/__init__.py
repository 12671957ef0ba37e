"""The math: top-k attention and feed-forward operators (PyTorch, plus Triton kernels for CUDA; no Lightning, no
transformers)."""

from topk_lightning.ops.feedforward import chunked_feed_forward, topk_feed_forward
from topk_lightning.ops.reference import dense_attention
from topk_lightning.ops.relative_bias import RelativePositionBias
from topk_lightning.ops.topk_attention import BACKENDS, resolve_backend, topk_attention

__all__ = ["BACKENDS", "RelativePositionBias", "chunked_feed_forward", "dense_attention", "resolve_backend",
           "topk_attention", "topk_feed_forward"]
