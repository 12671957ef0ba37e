"""Forward+backward time and peak memory of one attention layer (and one FF layer): eager, SDPA and top-k.

Every configuration runs in its own Python process, so one run's allocations cannot hide in another's peak.
Peak memory is the rise of the process's resident set (VmHWM, reset through /proc/self/clear_refs) over what it
held once the inputs existed, across the warm-up and the timed passes. Time is the median of ``--repeats`` forward+backward passes after one warm-up.

    python benchmarks/attention.py                      # defaults below, prints a markdown table
    python benchmarks/attention.py --lengths 1024 4096 --json results.json
    python benchmarks/attention.py --eager-max 8192     # eager beyond 4096 needs many GB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATTENTION = ("eager", "sdpa", "topk")
FEED_FORWARD = ("ff_plain", "ff_chunked", "ff_topk")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set


def measure(impl: str, length: int, args: argparse.Namespace) -> dict:
    """Runs inside the child process: build inputs, time ``repeats`` forward+backward passes, measure peak RSS."""
    import torch
    import torch.nn.functional as F

    from topk_lightning.ops import chunked_feed_forward, topk_attention, topk_feed_forward

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    b, h, d = args.batch, args.heads, args.head_dim
    if impl in ATTENTION:
        q, k, v = (torch.randn(b, h, length, d, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, length, d, dtype=dtype)

        def step():
            if impl == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v)
            elif impl == "eager":
                out = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v
            else:
                out = topk_attention(q, k, v, topk=args.topk, query_chunk_size=args.query_chunk_size)
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None
    else:
        d_model = h * d
        d_ff = 4 * d_model
        lin1 = torch.nn.Linear(d_model, d_ff, dtype=dtype)
        lin2 = torch.nn.Linear(d_ff, d_model, dtype=dtype)
        x = torch.randn(b, length, d_model, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, length, d_model, dtype=dtype)

        def plain(hidden):
            return lin2(F.gelu(lin1(hidden)))

        def step():
            if impl == "ff_plain":
                out = plain(x)
            elif impl == "ff_chunked":
                out = chunked_feed_forward(plain, x, args.ff_chunk_size)
            else:
                out = topk_feed_forward(x, lin1.weight, lin1.bias, lin2.weight, lin2.bias, topk=args.ff_topk,
                                        activation=F.gelu)
            out.backward(grad)
            x.grad = None
            for p in (*lin1.parameters(), *lin2.parameters()):
                p.grad = None

    # The peak covers the warm-up too: memory the allocator keeps after the first pass is memory the layer needs.
    _reset_peak()
    baseline = _rss_kib("VmRSS")
    step()  # warm-up: lazy initialisation, allocator pools
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    return {
        "L": length, "impl": impl, "seconds": statistics.median(times), "peak_mb": (peak - baseline) / 1024,
        "times": times,
    }


def _run_child(impl: str, length: int, argv: list[str], timeout: float) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_path = handle.name
    cmd = [sys.executable, __file__, *argv, "--child", impl, str(length), out_path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            print(f"  {impl} L={length} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(Path(out_path).read_text())
    except subprocess.TimeoutExpired:
        print(f"  {impl} L={length} timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    finally:
        Path(out_path).unlink(missing_ok=True)


def _table(rows: list[dict]) -> str:
    base = {(r["L"], "attn" if r["impl"] in ATTENTION else "ff"): r for r in rows if r["impl"] in ("sdpa", "ff_plain")}
    lines = [
        "| L | implementation | peak MB added | fwd+bwd s (median) | memory / baseline | time / baseline |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = base.get((r["L"], "attn" if r["impl"] in ATTENTION else "ff"))
        mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref and ref["peak_mb"] > 0 else "-"
        tim = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        lines.append(f"| {r['L']} | {r['impl']} | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {mem} | {tim} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", default=[*ATTENTION, *FEED_FORWARD],
                        choices=[*ATTENTION, *FEED_FORWARD])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--query-chunk-size", type=int, default=1024)
    parser.add_argument("--ff-chunk-size", type=int, default=1024)
    parser.add_argument("--ff-topk", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-max", type=int, default=4096, help="skip eager above this length (memory)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "L", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        impl, length, out = args.child[0], int(args.child[1]), Path(args.child[2])
        out.write_text(json.dumps(measure(impl, length, args)))
        return 0

    passthrough = list(argv if argv is not None else sys.argv[1:])
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; B={args.batch} H={args.heads} D={args.head_dim} "
          f"topk={args.topk} chunk={args.query_chunk_size} {args.dtype}", flush=True)
    rows = []
    for length in args.lengths:
        for impl in args.impls:
            if impl == "eager" and length > args.eager_max:
                continue
            row = _run_child(impl, length, passthrough, args.timeout)
            if row is not None:
                rows.append(row)
                print(f"  L={length:>6} {impl:<10} {row['peak_mb']:8.0f} MB {row['seconds']:8.2f} s", flush=True)
    print()
    print(_table(rows))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
                                   "rows": rows}, indent=2, default=str))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
