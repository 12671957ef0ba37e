"""How much work the bound forward kernel's selection does, simulated on random scores without a GPU.

`topk_forward_bound_kernel` (topk_lightning/ops/triton_kernels.py) bounds each query's k-th score from below by the
k-th largest of 2 * BLOCK_N group maxima (lane of the key block x parity of the block), appends the scores at or
above that bound, and ranks them with `_kth_largest_key`, a bisection over order-preserving integer keys that stops
once exactly k keys are at or above its lower end. This script replays those steps in PyTorch on scores q . k of
Gaussian queries and keys (unscaled, fp32, as the kernel ranks them) and reports, per length:

- candidates per query (what the stacks hold; CAND_C = 4k slots per row before a tile falls back),
- bisection steps of the pass-1 bound (the kernel loops until all BLOCK_M rows of a tile stop) and of the final
  ranking (GROUP rows at a time, one per warp).

Real attention scores are not Gaussian: treat the figures as the order of magnitude the kernel was designed for.

    python benchmarks/bound_simulation.py --lengths 4096 32768 --rows 64
"""

from __future__ import annotations

import argparse
import sys

import torch


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """The kernel's `_order_keys`: int keys whose order is the float order (as int64 here, so no overflow)."""
    bits = values.float().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def kth_largest_key(keys: torch.Tensor, topk: int) -> tuple[int, int]:
    """`_kth_largest_key` on one row of at least ``topk`` keys: the topk-th largest key and the steps it took."""
    lo, hi, at_least_lo, steps = int(keys.min()), int(keys.max()), keys.numel(), 0
    while at_least_lo > topk and lo < hi:
        mid = (lo + hi + 1) // 2
        at_least = int((keys >= mid).sum())
        steps += 1
        if at_least >= topk:
            lo, at_least_lo = mid, at_least
        else:
            hi = mid - 1
    return int(keys[keys >= lo].min()), steps


def simulate(length: int, *, rows: int, topk: int, head_dim: int, block_n: int, group: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, head_dim, generator=gen) @ torch.randn(length, head_dim, generator=gen).T
    groups = torch.arange(length) % block_n + block_n * ((torch.arange(length) // block_n) % 2)
    candidates, bound_steps, final_steps = [], [], []
    for row in scores:
        maxima = torch.full((2 * block_n,), float("-inf")).scatter_reduce(0, groups, row, reduce="amax")
        bound_steps.append(kth_largest_key(order_keys(maxima), topk)[1])
        bound = maxima.topk(topk).values[-1]
        kept = row[row >= bound]
        candidates.append(kept.numel())
        final_steps.append(kth_largest_key(order_keys(kept), topk)[1])
    final = torch.tensor(final_steps, dtype=torch.float64)
    usable = rows - rows % group
    return {
        "length": length,
        "candidates_mean": sum(candidates) / rows,
        "candidates_max": max(candidates),
        "bound_steps_per_tile": max(bound_steps),
        "final_steps_per_group": final[:usable].reshape(-1, group).amax(1).mean().item(),
        "full_bisection_steps": 31,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--rows", type=int, default=64, help="queries simulated per length (one tile: BLOCK_M)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="rows ranked at once (num_warps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"Gaussian q, k (D={args.head_dim}), k={args.topk}, BLOCK_N={args.block_n}, {args.rows} queries per "
          f"length, seed {args.seed}")
    print("| L | candidates per query: mean / max | pass-1 bisection steps (max over the tile) | final ranking steps "
          "(mean of the max per group) | steps of a bit-by-bit bisection |")
    print("|---:|---|---:|---:|---:|")
    for length in args.lengths:
        r = simulate(length, rows=args.rows, topk=args.topk, head_dim=args.head_dim, block_n=args.block_n,
                     group=args.group, seed=args.seed)
        print(f"| {length} | {r['candidates_mean']:.1f} / {r['candidates_max']} | {r['bound_steps_per_tile']} | "
              f"{r['final_steps_per_group']:.1f} | {r['full_bisection_steps']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
