"""T5's bucketed relative position bias, described rather than materialised.

T5 adds to every score a learned bias that depends only on the distance between key and query, through a bucket::

    score[b, h, i, j] += weight[bucket(j - (i + query_offset)), h]

transformers builds it as a (1, H, Lq, Lk) tensor (`T5Attention.compute_bias`): 12.9 GB in fp32 for 12 heads at
L=16,384. A `RelativePositionBias` carries only the (num_buckets, H) embedding and the bucketing parameters, and the
PyTorch backend of `topk_attention` turns it into bias one score tile at a time:

- The bias is a function of the distance d = j - i, and a (Lq, Lk) block has only Lq + Lk - 1 distances, so the
  backend looks every distance's bucket up once (`bias_by_distance`: (H, Lq + Lk - 1)) and reads a tile's bias as
  windows of that row (`tile_bias`).
- Backward: the gradient of each kept score is added to its distance, then the distances to their buckets
  (`embedding_grad`), so the embedding's gradient comes from the kept entries only, in O(L * k) memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each ``relative_position`` (key position - query position), as int64 in [0, num_buckets).

    Mesh TensorFlow's rule, as ``transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket``:
    bidirectional buckets give half of the buckets to keys after the query; half of the (remaining) buckets are
    exact distances, the other half grow logarithmically up to ``max_distance``, beyond which the distance shares
    the last bucket. Unidirectional (decoder) buckets send every key after the query to bucket 0.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Same float32 arithmetic as transformers, so that the buckets agree exactly at the log-spaced boundaries.
    if_large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.clamp(if_large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, if_large)


@dataclass(frozen=True, eq=False)
class RelativePositionBias:
    """A T5 relative position bias for `topk_attention`: ``score[b, h, i, j] += weight[bucket(j - i - offset), h]``.

    Args:
        weight: (num_buckets, H) float, the bucket embedding (T5's ``relative_attention_bias.weight``); H is the
            number of query heads. Receives a gradient through the kept entries when it requires one.
        bidirectional: True for encoder self-attention (keys on either side get their own buckets), False for
            causal decoder self-attention (T5's ``not is_decoder``).
        num_buckets: ``relative_attention_num_buckets``; >= 2, >= 4 when bidirectional (T5 uses 32).
        max_distance: ``relative_attention_max_distance``; distances from here on share the last bucket; larger
            than the exact buckets (num_buckets // 2, halved again when bidirectional). T5 uses 128.
        query_offset: position of the first query, >= 0: the tokens already in a KV cache when decoding step by
            step (T5's ``past_seen_tokens``). Keys start at position 0.
    """

    weight: torch.Tensor
    bidirectional: bool
    num_buckets: int
    max_distance: int
    query_offset: int = 0

    def __post_init__(self) -> None:
        for name in ("num_buckets", "max_distance", "query_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RelativePositionBias.{name} must be an int >= 0, got {value!r}")
        smallest = 4 if self.bidirectional else 2
        if self.num_buckets < smallest:
            raise ValueError(
                f"RelativePositionBias.num_buckets must be >= {smallest} "
                f"({'bidirectional' if self.bidirectional else 'causal'} buckets), got {self.num_buckets}"
            )
        max_exact = (self.num_buckets // 2 if self.bidirectional else self.num_buckets) // 2
        if self.max_distance <= max_exact:
            raise ValueError(
                f"RelativePositionBias.max_distance must be larger than the {max_exact} exact buckets, got "
                f"{self.max_distance}"
            )
        weight = self.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"RelativePositionBias.weight must be a 2-D float tensor (num_buckets, H), got {shape}")
        if weight.shape[0] != self.num_buckets:
            raise ValueError(
                f"RelativePositionBias.weight has {weight.shape[0]} rows for num_buckets={self.num_buckets}; "
                "expected (num_buckets, H)"
            )

    @property
    def heads(self) -> int:
        return self.weight.shape[1]

    def distance_buckets(self, q_len: int, k_len: int) -> torch.Tensor:
        """(Lq + Lk - 1,) int64: the bucket of each distance j - i, entry ``j - i + Lq - 1``."""
        first = -(q_len - 1 + self.query_offset)
        relative = torch.arange(first, first + q_len + k_len - 1, device=self.weight.device)
        return relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )

    def dense(self, q_len: int, k_len: int) -> torch.Tensor:
        """The whole (1, H, Lq, Lk) bias, as transformers' ``compute_bias`` returns it: for tests and exact paths."""
        table = self.weight[self.distance_buckets(q_len, k_len)].t()  # (H, Lq + Lk - 1)
        return tile_bias(table, 0, q_len, q_len, k_len).unsqueeze(0)


def bias_by_distance(position_bias: RelativePositionBias, buckets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(H, Lq + Lk - 1): the bias of every distance, from `RelativePositionBias.distance_buckets`."""
    return position_bias.weight.detach().to(dtype)[buckets].t().contiguous()


def tile_bias(table: torch.Tensor, start: int, stop: int, q_len: int, k_len: int) -> torch.Tensor:
    """(H, stop - start, Lk): the bias of query rows [start, stop) from ``table`` (H, Lq + Lk - 1).

    Row i, key j reads ``table[:, j - i + Lq - 1]``. ``unfold`` makes window w = ``table[:, w : w + Lk]`` (a view),
    row i is window ``Lq - 1 - i``, so a tile's windows run backwards: one flip, the tile's only copy.
    """
    windows = table.unfold(-1, k_len, 1)  # (H, Lq, Lk)
    return windows[:, q_len - stop : q_len - start].flip(1)


def embedding_grad(
    position_bias: RelativePositionBias, buckets: torch.Tensor, grad_by_distance: torch.Tensor
) -> torch.Tensor:
    """(num_buckets, H) gradient of the embedding from the gradient summed per distance, (H, Lq + Lk - 1)."""
    grad = torch.zeros(position_bias.weight.shape, dtype=grad_by_distance.dtype, device=grad_by_distance.device)
    return grad.index_add_(0, buckets, grad_by_distance.t()).to(position_bias.weight.dtype)


def check_position_bias(position_bias: object, query: torch.Tensor) -> None:
    """Raise a ValueError unless ``position_bias`` is a `RelativePositionBias` that fits ``query`` (B, H, Lq, D)."""
    if not isinstance(position_bias, RelativePositionBias):
        raise ValueError(f"position_bias must be a RelativePositionBias or None, got {type(position_bias).__name__}")
    if position_bias.heads != query.shape[1]:
        raise ValueError(
            f"position_bias.weight has {position_bias.heads} heads (num_buckets, H) for query with {query.shape[1]}"
        )
    if position_bias.weight.device != query.device:
        raise ValueError(
            f"position_bias.weight is on {position_bias.weight.device}, query on {query.device}; expected the same"
        )
