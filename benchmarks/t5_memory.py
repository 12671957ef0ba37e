"""A T5-small-shaped encoder, forward+backward on the CPU: eager, SDPA (transformers' own) and top-k with chunked FF.

The model is a random ``T5EncoderModel`` shaped like T5-small's encoder: 6 layers, d_model 512, 8 heads of 64,
d_ff 2048 (ReLU), relative position bias (32 buckets, max distance 128), vocabulary 32,128, dropout 0.1, train mode.
One sequence of L random tokens, no padding; the backward pass starts from a random gradient of the last hidden
states, and fills every parameter's gradient (no optimizer state).

- ``eager``: attn_implementation="eager" (T5's (1, H, L, L) bias table, scores and probabilities per layer).
- ``sdpa``: attn_implementation="sdpa" (transformers passes the bias table to SDPA as a float mask).
- ``topk``: `apply_topk` with ``--topk`` keys per query and FF chunks of ``--ff-chunk-size`` tokens; the bias is
  computed per score tile and never materialised.

Each configuration runs in its own Python process. "peak MB added" is the rise of the resident set (VmHWM, reset via
/proc/self/clear_refs) over what the process held once the model and inputs existed, warm-up included; "process
peak MB" adds that baseline (Python, torch, the model's weights), which is what has to fit in a machine's memory.
Time is the median of ``--repeats`` passes after one warm-up.

"Longest L in 16 GB" is extrapolated from the measured process peaks, and labelled so: a straight line through the
top-k rows (memory linear in L), and ``a + c L^2`` through the eager / SDPA rows (their bias table, scores and
probabilities grow with L^2), each fitted by least squares.

    python benchmarks/t5_memory.py                                   # defaults below, prints markdown tables
    python benchmarks/t5_memory.py --lengths 2048 4096 --impls topk --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from process_memory import reset_peak, rss_kib, run_child  # benchmarks/ is on sys.path when run as a script

IMPLS = ("eager", "sdpa", "topk")
BUDGET_MB = 16 * 1024


def build_model(impl: str, args: argparse.Namespace):
    import torch
    import transformers

    import topk_lightning

    config = transformers.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        feed_forward_proj="relu",
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel._from_config(config, attn_implementation="eager" if impl == "eager" else "sdpa")
    if impl == "topk":
        topk_lightning.apply_topk(
            model, topk_lightning.TopKConfig(topk=args.topk, query_chunk_size=args.query_chunk_size,
                                             ff_chunk_size=args.ff_chunk_size),
        )
    return model.train()


def measure(impl: str, length: int, args: argparse.Namespace) -> dict:
    """Runs inside the child process: build the model and inputs, time forward+backward passes, measure peak RSS."""
    import torch

    model = build_model(impl, args)
    input_ids = torch.randint(2, 32128, (1, length), generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, length, 512, generator=torch.Generator().manual_seed(2))

    def step():
        model(input_ids=input_ids).last_hidden_state.backward(grad)
        model.zero_grad(set_to_none=True)

    reset_peak()
    baseline = rss_kib("VmRSS")
    step()  # warm-up: lazy initialisation, allocator pools
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = rss_kib("VmHWM")
    return {
        "L": length, "impl": impl, "seconds": statistics.median(times), "peak_mb": (peak - baseline) / 1024,
        "process_peak_mb": peak / 1024, "times": times,
    }


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y = a + b x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - slope * mean_x, slope


def longest_fitting(rows: list[dict], impl: str) -> dict | None:
    """Extrapolated longest L whose process peak stays within `BUDGET_MB`: linear for top-k, quadratic otherwise."""
    points = [(r["L"], r["process_peak_mb"]) for r in rows if r["impl"] == impl]
    if len(points) < 2:
        return None
    quadratic = impl != "topk"
    intercept, slope = _fit([(x * x if quadratic else x, y) for x, y in points])
    if slope <= 0:
        return None
    reach = (BUDGET_MB - intercept) / slope
    return {
        "impl": impl, "model": "a + c L^2" if quadratic else "a + b L", "intercept_mb": intercept,
        "slope_mb": slope, "longest_L": int(math.sqrt(reach) if quadratic else reach),
        "measured_L": [x for x, _ in points],
    }


def _tables(rows: list[dict], reach: list[dict]) -> str:
    sdpa = {r["L"]: r for r in rows if r["impl"] == "sdpa"}
    lines = [
        "| L | implementation | peak MB added | process peak MB | fwd+bwd s (median) | memory / sdpa | time / sdpa |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = sdpa.get(r["L"])
        mem = f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref and ref["peak_mb"] > 0 else "-"
        tim = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        lines.append(f"| {r['L']} | {r['impl']} | {r['peak_mb']:.0f} | {r['process_peak_mb']:.0f} | "
                     f"{r['seconds']:.2f} | {mem} | {tim} |")
    lines += ["", "| implementation | longest L in 16 GB (extrapolated) | fit of the process peak, MB | from L = |",
              "|---|---:|---|---|"]
    for r in reach:
        coefficient = "L^2" if r["model"] == "a + c L^2" else "L"
        lines.append(f"| {r['impl']} | {r['longest_L']:,} | {r['intercept_mb']:.0f} + {r['slope_mb']:.3g} "
                     f"{coefficient} | {', '.join(map(str, r['measured_L']))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--query-chunk-size", type=int, default=1024)
    parser.add_argument("--ff-chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-max", type=int, default=4096,
                        help="skip eager and sdpa above this length (their L^2 tables need tens of GB at 8192)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--json", type=Path, help="also write the rows and fits to this file")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "L", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        impl, length, out = args.child[0], int(args.child[1]), Path(args.child[2])
        out.write_text(json.dumps(measure(impl, length, args)))
        return 0

    passthrough = list(argv if argv is not None else sys.argv[1:])
    import torch

    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; T5-small-shaped encoder, B=1, fp32, topk={args.topk}, "
              f"query_chunk_size={args.query_chunk_size}, ff_chunk_size={args.ff_chunk_size}")
    print(f"# {header}", flush=True)
    rows = []
    for length in args.lengths:
        for impl in args.impls:
            if impl != "topk" and length > args.dense_max:
                continue
            row = run_child(__file__, passthrough, [impl, str(length)], f"{impl} L={length}", args.timeout)
            if row is not None:
                rows.append(row)
                print(f"  L={length:>6} {impl:<6} {row['peak_mb']:8.0f} MB added {row['process_peak_mb']:8.0f} MB "
                      f"process {row['seconds']:8.2f} s", flush=True)
    reach = [fit for impl in args.impls if (fit := longest_fitting(rows, impl)) is not None]
    print()
    print(_tables(rows, reach))
    if args.json:
        from topk_lightning.atomic import atomic_output

        with atomic_output(args.json) as partial:
            report = {"machine": header, "args": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
                      "rows": rows, "longest_in_16gb": reach}
            partial.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
