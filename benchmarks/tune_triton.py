"""Try tile configurations of the Triton top-k forward kernel on this GPU and time forward and backward separately.

Each configuration ``BLOCK_M,BLOCK_N,num_warps[,SEGMENT[,layout]]`` is passed through TOPK_LIGHTNING_TRITON_FWD
(the override that `topk_lightning.ops.triton_backend.forward_config` reads) and checked against the default
configuration before it is timed (CUDA events, median): every query must keep the same set of keys (all layouts
break ties towards lower key indices) and the outputs must agree to bf16 rounding. Prints a table; the fastest
configuration that passes the check is the one to make default.

    python benchmarks/tune_triton.py --lengths 4096 32768 --configs 64,64,8,2,bound 64,64,4,2,buffer
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import sys


def _time(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kept_keys(out):
    """The key indices each query kept, sorted, from the output of ``topk_attention(..., backend="triton")`` on
    inputs that require grad (the kernels save them for the backward)."""
    return out.grad_fn.saved_tensors[3].sort(dim=-1).values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--configs", nargs="+",
                        default=["64,64,8,2,bound", "64,64,4,2,bound", "64,64,4,2,buffer", "32,64,4,2,stacks"],
                        help="BLOCK_M,BLOCK_N,num_warps,SEGMENT[,layout] (see triton_backend.forward_config)")
    parser.add_argument("--best", type=Path, help="write the configuration fastest at the longest length here")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    from topk_lightning.ops import topk_attention

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; B={args.batch} H={args.heads} "
          f"D={args.head_dim} topk={args.topk} bfloat16")
    print("| L | config (BLOCK_M,BLOCK_N,warps,SEGMENT,layout) | forward ms | backward ms | fwd+bwd ms | "
          "max abs diff to default | queries keeping other keys |")
    timings = {}
    print("|---:|---|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        torch.manual_seed(0)
        shape = (args.batch, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        os.environ.pop("TOPK_LIGHTNING_TRITON_FWD", None)
        reference = topk_attention(q, k, v, topk=args.topk, backend="triton")
        reference_keys = kept_keys(reference)
        reference = reference.detach()
        for config in ["default", *args.configs]:
            if config == "default":
                os.environ.pop("TOPK_LIGHTNING_TRITON_FWD", None)
            else:
                os.environ["TOPK_LIGHTNING_TRITON_FWD"] = config
            try:
                out = topk_attention(q, k, v, topk=args.topk, backend="triton")
                others = (kept_keys(out) != reference_keys).any(dim=-1).sum().item()
                diff = (out.detach().float() - reference.float()).abs().max().item()
                del out
                forward = _time(lambda: topk_attention(q, k, v, topk=args.topk, backend="triton"), args.repeats)

                def both():
                    topk_attention(q, k, v, topk=args.topk, backend="triton").backward(grad)

                total = _time(both, args.repeats)
            except Exception as error:  # a configuration that does not compile or fit: report, go on
                print(f"| {length} | {config} | failed: {type(error).__name__}: {str(error)[:80]} | | | | |")
                continue
            print(f"| {length} | {config} | {forward:.2f} | {total - forward:.2f} | {total:.2f} | {diff:.2e} | "
                  f"{others} |", flush=True)
            if others == 0 and diff < 0.05:  # a configuration that selects differently is never picked
                timings[(length, config)] = total
    os.environ.pop("TOPK_LIGHTNING_TRITON_FWD", None)
    longest = max(args.lengths)
    ranked = sorted((t, c) for (length, c), t in timings.items() if length == longest)
    if ranked:
        best = ranked[0][1]
        print(f"fastest at L={longest}: {best} ({ranked[0][0]:.2f} ms)")
        if args.best:
            args.best.write_text("" if best == "default" else best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
