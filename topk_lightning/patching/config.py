"""`TopKConfig`: which layers of a Hugging Face encoder run top-k attention and how its feed-forward layers run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from topk_lightning.errors import InputError
from topk_lightning.ops import BACKENDS


def _check_positive_int(name: str, value: object, *, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "None or an int >= 1" if optional else "an int >= 1"
        raise InputError(f"TopKConfig.{name} must be {expected}, got {value!r}")


@dataclass(kw_only=True)
class TopKConfig:
    """Settings for `apply_topk`. Invalid values raise `~topk_lightning.errors.InputError` (a ``ValueError``).

    Args:
        topk: keys each query attends to in the chosen layers (>= 1). ``topk >= sequence length`` is exact attention.
            ``None``: attention is left as the model runs it (exact; e.g. ``"sdpa"`` or ``"eager"``) and only the
            feed-forward options below are applied.
        query_chunk_size: at most this many queries have their scores against all keys materialised at once, so a
            layer's attention memory is O(query_chunk_size x L) instead of O(L x L) (>= 1).
        ff_chunk_size: if set, the feed-forward block of the chosen layers runs on chunks of this many tokens, each
            recomputed in backward (exact; bounds the (B, L, intermediate_size) activation to one chunk).
        ff_topk: if set, the feed-forward block of the chosen layers keeps, per token, only the ``ff_topk`` largest
            pre-activations of its first linear map (the paper's "feed-forward as attention"). ``ff_topk >=
            intermediate_size`` is exact. Combines with ``ff_chunk_size``.
        layers: indices of the layers to patch, 0-based; ``None`` patches all of them. Attention in the other layers
            stays exact. For ALBERT, whose layers share weights across depth, the indices refer to the distinct
            (weight-owning) layer modules, not to depth; see `apply_topk`.
        backend: which implementation of `topk_lightning.ops.topk_attention` runs: ``"auto"`` (Triton kernels on
            CUDA where they apply, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
    """

    topk: int | None = 64
    query_chunk_size: int = 1024
    ff_chunk_size: int | None = None
    ff_topk: int | None = None
    layers: list[int] | None = None
    backend: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(
                f"TopKConfig.backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}"
            )
        _check_positive_int("topk", self.topk, optional=True)
        _check_positive_int("query_chunk_size", self.query_chunk_size, optional=False)
        _check_positive_int("ff_chunk_size", self.ff_chunk_size, optional=True)
        _check_positive_int("ff_topk", self.ff_topk, optional=True)
        if self.layers is None:
            return
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise InputError(f"TopKConfig.layers must be None or a list of layer indices, got {self.layers!r}")
        layers = list(self.layers)
        for index in layers:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise InputError(
                    f"TopKConfig.layers must hold ints >= 0 (0-based layer indices), got {index!r} in {layers!r}"
                )
        if len(set(layers)) != len(layers):
            raise InputError(f"TopKConfig.layers must not repeat an index, got {layers!r}")
        if not layers:
            raise InputError("TopKConfig.layers must be None (all layers) or a non-empty list, got []")
        self.layers = layers
