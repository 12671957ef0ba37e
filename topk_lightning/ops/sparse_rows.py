"""Row-sparse products shared by top-k attention and top-k feed-forward layers.

Both operators keep, for each of R "query" rows, k entries of a table of T rows (keys, or hidden units). With
``index`` (R, k) naming the kept table rows and ``weights`` (R, k) their coefficients, everything the forward and
backward passes need reduces to three products, each done without materialising the (R, k, D) gathered rows:

- ``weighted_row_sum``: out[r] = sum_j weights[r, j] * table[index[r, j]]         (embedding_bag)
- ``sampled_dot``:      out[r, j] = left[r] . table[index[r, j]]                 (sampled dense-dense matmul)
- ``TransposedPattern.weighted_row_sum``: out[t] = sum over (r, j) with index[r, j] == t of weights[r, j] * src[r]
  (the same pattern read column-wise: entries sorted by table row once, then embedding_bag)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def weighted_row_sum(index: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[r] = sum_j weights[r, j] * table[index[r, j]]. index (R, k) int64, table (T, D), weights (R, k)."""
    return F.embedding_bag(index, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def sampled_dot(index: torch.Tensor, left: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[r, j] = left[r] . table[index[r, j]]. index (R, k) int64, left (R, D), table (T, D); fp32/fp64."""
    rows, k = index.shape
    crow = torch.arange(0, rows * k + 1, k, device=index.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely only on its SDDMM
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, index.reshape(-1), torch.zeros(rows * k, dtype=left.dtype, device=left.device),
            size=(rows, table.shape[0]), check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, left, table.t(), beta=0.0).values().view(rows, k)


class TransposedPattern:
    """The kept pattern of ``index`` (R, k) over a table of ``num_table_rows`` rows, grouped by table row.

    Sorting once lets several column-wise sums (dK and dV, or dW_in and dW_out) share the work.
    """

    def __init__(self, index: torch.Tensor, num_table_rows: int) -> None:
        self.k = index.shape[-1]
        flat = index.reshape(-1)
        # int32 keys sort ~1.6x faster than int64 on CPU.
        sorted_rows, self.order = torch.sort(flat.int() if num_table_rows < 2**31 else flat, stable=True)
        self.source_rows = self.order // self.k
        counts = torch.bincount(sorted_rows, minlength=num_table_rows)
        self.offsets = torch.zeros_like(counts)
        self.offsets[1:] = counts.cumsum(0)[:-1]

    def weighted_row_sum(self, source: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """out[t] = sum of weights[r, j] * source[r] over entries with index[r, j] == t. Returns (T, D)."""
        return F.embedding_bag(
            self.source_rows, source, self.offsets,
            per_sample_weights=weights.reshape(-1)[self.order].to(source.dtype), mode="sum",
        )
