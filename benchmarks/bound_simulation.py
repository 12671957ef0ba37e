"""How much work the bound forward kernel's selection does, simulated on random scores without a GPU.

`topk_forward_bound_kernel` (topk_lightning/ops/triton_kernels.py) bounds each query's k-th score from below by the
k-th largest of 2 * BLOCK_N group maxima (lane of the key block x parity of the block), appends the scores at or
above that bound, and ranks them with `_kth_largest_key`, a bisection over order-preserving integer keys that stops
once exactly k keys are at or above its lower end. This script replays those steps in PyTorch on scores q . k of
Gaussian queries and keys (unscaled, fp32, as the kernel ranks them) and reports, per length:

- candidates per query (what the stacks hold; CAND_C = 4k slots per row before a tile falls back),
- tiles where a (query, lane) stack gets more than DEPTH entries, so that pass 2 runs again from the k-th largest
  score the stacks kept, and tiles that overflow even then and take the candidate-buffer fallback,
- bisection steps of the pass-1 bound (the kernel loops until all BLOCK_M rows of a tile stop) and of the final
  ranking (GROUP rows at a time, one per warp).

Real attention scores are not Gaussian: treat the figures as the order of magnitude the kernel was designed for.

    python benchmarks/bound_simulation.py --lengths 4096 32768 --rows 4096
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


def stack_heights(row: torch.Tensor, bound: torch.Tensor, block_n: int) -> torch.Tensor:
    """Entries each lane's stack receives in pass 2: the scores >= bound, by key index modulo BLOCK_N."""
    return torch.bincount(torch.nonzero(row >= bound).flatten() % block_n, minlength=block_n)


def stacks_keep(row: torch.Tensor, bound: torch.Tensor, block_n: int, depth: int) -> torch.Tensor:
    """What DEPTH-deep stacks hold after pass 2: per lane the first DEPTH - 1 entries and the last one (past
    DEPTH every append overwrites the last slot)."""
    kept = []
    for lane in range(block_n):
        entries = row[lane::block_n]
        entries = entries[entries >= bound]
        kept.append(entries if entries.numel() <= depth else torch.cat([entries[:depth - 1], entries[-1:]]))
    return torch.cat(kept)


def simulate(length: int, *, rows: int, topk: int, head_dim: int, block_n: int, block_m: int, depth: int,
             group: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, head_dim, generator=gen) @ torch.randn(length, head_dim, generator=gen).T
    groups = torch.arange(length) % block_n + block_n * ((torch.arange(length) // block_n) % 2)
    candidates, bound_steps, final_steps, deepest, deepest_again = [], [], [], [], []
    for row in scores:
        maxima = torch.full((2 * block_n,), float("-inf")).scatter_reduce(0, groups, row, reduce="amax")
        bound_steps.append(kth_largest_key(order_keys(maxima), topk)[1])
        bound = maxima.topk(topk).values[-1]
        kept = row[row >= bound]
        candidates.append(kept.numel())
        final_steps.append(kth_largest_key(order_keys(kept), topk)[1])
        heights = stack_heights(row, bound, block_n)
        deepest.append(int(heights.max()))
        if heights.max() > depth:  # the kernel's second pass 2, from the k-th largest score the stacks kept
            tighter = stacks_keep(row, bound, block_n, depth).topk(topk).values[-1]
            heights = stack_heights(row, tighter, block_n)
        deepest_again.append(int(heights.max()))
    final = torch.tensor(final_steps, dtype=torch.float64)
    usable = rows - rows % group
    tiles = rows // block_m
    per_tile = torch.tensor(deepest[:tiles * block_m]).reshape(tiles, block_m).amax(1)
    per_tile_again = torch.tensor(deepest_again[:tiles * block_m]).reshape(tiles, block_m).amax(1)
    return {
        "tiles": tiles,
        "tiles_overflowing": int((per_tile > depth).sum()),
        "tiles_overflowing_again": int((per_tile_again > depth).sum()),
        "length": length,
        "candidates_mean": sum(candidates) / rows,
        "candidates_max": max(candidates),
        "bound_steps_per_tile": torch.tensor(bound_steps[:tiles * block_m], dtype=torch.float64)
        .reshape(tiles, block_m).amax(1).mean().item(),
        "final_steps_per_group": final[:usable].reshape(-1, group).amax(1).mean().item(),
        "full_bisection_steps": 31,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--rows", type=int, default=4096, help="queries simulated per length")
    parser.add_argument("--block-m", type=int, default=64, help="queries per tile")
    parser.add_argument("--depth", type=int, default=8, help="stack depth (CAND // BLOCK_N of forward_config)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="rows ranked at once (num_warps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"Gaussian q, k (D={args.head_dim}), k={args.topk}, BLOCK_M={args.block_m}, BLOCK_N={args.block_n}, "
          f"DEPTH={args.depth}, {args.rows} queries per length, seed {args.seed}")
    print("| L | candidates per query: mean / max | tiles with a stack over DEPTH: after pass 2 / after pass 2 again "
          "(to the buffer fallback) | pass-1 bisection steps (mean of the max per tile) | final ranking steps "
          "(mean of the max per group) | steps of a bit-by-bit bisection |")
    print("|---:|---|---|---:|---:|---:|")
    for length in args.lengths:
        r = simulate(length, rows=args.rows, topk=args.topk, head_dim=args.head_dim, block_n=args.block_n,
                     block_m=args.block_m, depth=args.depth, group=args.group, seed=args.seed)
        print(f"| {length} | {r['candidates_mean']:.1f} / {r['candidates_max']} | {r['tiles_overflowing']} / "
              f"{r['tiles_overflowing_again']} of {r['tiles']} | {r['bound_steps_per_tile']:.1f} | "
              f"{r['final_steps_per_group']:.1f} | {r['full_bisection_steps']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
