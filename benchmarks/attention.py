"""Time and peak memory of one attention layer (and one FF layer), and of a whole encoder's train step:
eager, SDPA and top-k with each backend, on the CPU or a CUDA GPU.

CPU: every configuration runs in its own Python process, so one run's allocations cannot hide in another's peak.
Peak memory is the rise of the process's resident set (VmHWM, reset through /proc/self/clear_refs) over what it held
once the inputs existed, across the warm-up and the timed passes. Time is the median of ``--repeats`` passes after
one warm-up, by the wall clock.

CUDA: configurations run one after another in one process, each isolated by emptying the allocator's cache and
resetting its peak statistics; peak memory is ``torch.cuda.max_memory_allocated()`` over what was allocated once the
inputs existed (warm-up included); time is the median of CUDA-event timings after two warm-up passes. Needs only
torch, triton and transformers.

Implementations: ``eager`` (softmax(QK^T)V), ``sdpa`` (torch's scaled_dot_product_attention: the flash kernel where
it applies), ``topk`` (backend "auto": Triton on CUDA, PyTorch on the CPU, which runs the compiled CPU kernels of
``ops/cpu_kernels.py``), ``topk_torch``, ``topk_torch_ops`` (the PyTorch backend with those CPU kernels turned off:
PyTorch operations only), ``topk_triton``, and for FF layers ``ff_plain``, ``ff_chunked``, ``ff_topk``.
``--forward-only`` times inference (no autograd).

    python benchmarks/attention.py                                    # CPU defaults, markdown table
    python benchmarks/attention.py --lengths 1024 4096 --json results.json
    python benchmarks/attention.py --device cuda --dtype bfloat16 --lengths 4096 16384 32768 65536 131072 \\
        --impls sdpa eager topk_torch topk_triton --encoder-lengths 4096 16384 32768
    python benchmarks/attention.py --forward-only --batch 4 --head-dim 32 --lengths 2048 --impls sdpa topk
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from process_memory import reset_peak, rss_kib, run_child  # benchmarks/ is on sys.path when run as a script

ATTENTION = ("eager", "sdpa", "topk", "topk_torch", "topk_torch_ops", "topk_triton")
FEED_FORWARD = ("ff_plain", "ff_chunked", "ff_topk")
ENCODER = ("sdpa", "topk", "topk_ff_chunked", "topk_torch")
TOPK_BACKEND = {"topk": "auto", "topk_torch": "torch", "topk_torch_ops": "torch", "topk_triton": "triton"}


def layer_step(impl: str, length: int, args: argparse.Namespace):
    """Inputs and a closure running one forward (+ backward unless --forward-only) pass of one layer."""
    import torch
    import torch.nn.functional as F

    from topk_lightning.ops import chunked_feed_forward, topk_attention, topk_feed_forward

    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), args.device
    train = not args.forward_only
    b, h, d = args.batch, args.heads, args.head_dim
    if impl in ATTENTION:
        q, k, v = (torch.randn(b, h, length, d, dtype=dtype, device=device, requires_grad=train) for _ in range(3))
        grad = torch.randn(b, h, length, d, dtype=dtype, device=device)

        def attention():
            if impl == "sdpa":
                return F.scaled_dot_product_attention(q, k, v)
            if impl == "eager":
                return torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v
            return topk_attention(q, k, v, topk=args.topk, query_chunk_size=args.query_chunk_size,
                                  backend=TOPK_BACKEND[impl])

        leaves = (q, k, v)
        run = attention
    else:
        d_model = h * d
        lin1 = torch.nn.Linear(d_model, 4 * d_model, dtype=dtype, device=device)
        lin2 = torch.nn.Linear(4 * d_model, d_model, dtype=dtype, device=device)
        x = torch.randn(b, length, d_model, dtype=dtype, device=device, requires_grad=train)
        grad = torch.randn(b, length, d_model, dtype=dtype, device=device)

        def plain(hidden):
            return lin2(F.gelu(lin1(hidden)))

        def run():
            if impl == "ff_plain":
                return plain(x)
            if impl == "ff_chunked":
                return chunked_feed_forward(plain, x, args.ff_chunk_size)
            return topk_feed_forward(x, lin1.weight, lin1.bias, lin2.weight, lin2.bias, topk=args.ff_topk,
                                     activation=F.gelu)

        leaves = (x, *lin1.parameters(), *lin2.parameters())

    def step():
        if not train:
            with torch.no_grad():
                run()
            return
        run().backward(grad)
        for t in leaves:
            t.grad = None

    return step


def encoder_step(impl: str, length: int, args: argparse.Namespace):
    """A MiniLM-shaped BERT (6 layers, hidden 384, 12 heads, FF 1536; random weights, positions = length) and a
    closure running one train step's forward and backward (no optimizer): under autocast to ``--dtype`` when that is
    bf16 / fp16, in fp32 otherwise. Attention dropout ``--attention-dropout`` (MiniLM's 0.1 by default): on a CPU,
    SDPA with dropout runs PyTorch's math kernel, which stores the L x L probabilities."""
    import torch
    import transformers

    from topk_lightning import TopKConfig, apply_topk

    torch.manual_seed(0)
    device = args.device
    config = transformers.BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=length, vocab_size=30522, attention_probs_dropout_prob=args.attention_dropout,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).to(device).train()
    model.set_attn_implementation("sdpa")
    if impl != "sdpa":
        apply_topk(model, TopKConfig(
            topk=args.topk, query_chunk_size=args.query_chunk_size, backend=TOPK_BACKEND.get(impl, "auto"),
            ff_chunk_size=args.ff_chunk_size if impl == "topk_ff_chunked" else None,
        ))
    batch = args.encoder_batch
    input_ids = torch.randint(1000, 30000, (batch, length), device=device)
    weight = torch.randn(batch, length, 384, device=device)  # a random loss direction, not a constant sum

    low_precision = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)

    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=low_precision or torch.bfloat16,
                            enabled=low_precision is not None):
            hidden = model(input_ids=input_ids).last_hidden_state
        (hidden.float() * weight).sum().backward()
        for p in model.parameters():
            p.grad = None

    return step


def measure_cpu(step, repeats: int) -> dict:
    # The peak covers the warm-up too: memory the allocator keeps after the first pass is memory the layer needs.
    reset_peak()
    baseline = rss_kib("VmRSS")
    step()  # warm-up: lazy initialisation, allocator pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": (rss_kib("VmHWM") - baseline) / 1024, "times": times}


def measure_cuda(make_step, repeats: int, max_seconds: float) -> dict:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before_inputs = torch.cuda.memory_allocated()
    step = make_step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    started = time.perf_counter()
    step()  # warm-up: kernel compilation, allocator pools
    torch.cuda.synchronize()
    if time.perf_counter() - started < max_seconds:
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
        if sum(times) > max_seconds:
            break
    peak = torch.cuda.max_memory_allocated() - baseline
    del step
    torch.cuda.empty_cache()
    return {"seconds": statistics.median(times), "peak_mb": peak / 2**20, "times": times,
            "inputs_mb": (baseline - before_inputs) / 2**20}


def _measure(kind: str, impl: str, length: int, args: argparse.Namespace, passthrough: list[str]) -> dict | None:
    make = (lambda: encoder_step(impl, length, args)) if kind == "encoder" else (lambda: layer_step(impl, length, args))
    if args.device == "cpu":
        row = run_child(__file__, passthrough, [kind, impl, str(length)], f"{kind} {impl} L={length}", args.timeout)
    else:
        import torch

        try:
            row = measure_cuda(make, args.repeats, args.max_seconds)
        except torch.cuda.OutOfMemoryError:
            print(f"  {kind} {impl} L={length}: out of GPU memory", file=sys.stderr)
            torch.cuda.empty_cache()
            return None
    if row is not None:
        row.update(kind=kind, impl=impl, L=length)
    return row


def _table(rows: list[dict], *, forward_only: bool) -> str:
    def group(r):
        return "ff" if r["impl"] in FEED_FORWARD else "attn"

    base = {(r["kind"], r["L"], group(r)): r for r in rows if r["impl"] in ("sdpa", "ff_plain")}
    unit = "ms" if any(r.get("device", "cpu") != "cpu" for r in rows) else "s"
    factor = 1000 if unit == "ms" else 1
    pass_name = "fwd" if forward_only else "fwd+bwd"
    lines = [
        f"| what | L | implementation | peak MB added | {pass_name} {unit} (median) | memory / baseline | "
        "time / baseline |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = base.get((r["kind"], r["L"], group(r)))
        mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref and ref["peak_mb"] > 0 else "-"
        tim = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        what = "encoder step" if r["kind"] == "encoder" else "layer"
        lines.append(f"| {what} | {r['L']} | {r['impl']} | {r['peak_mb']:.0f} | {r['seconds'] * factor:.3g} | "
                     f"{mem} | {tim} |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _describe(args: argparse.Namespace) -> str:
    import torch

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        try:
            import triton

            where += f", triton {triton.__version__}"
        except ImportError:
            pass
    else:
        where = (f"{_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads")
    encoder = (f"; encoder B={args.encoder_batch} attention dropout {args.attention_dropout}"
               if args.encoder_lengths else "")
    return (f"{where}; B={args.batch} H={args.heads} D={args.head_dim} topk={args.topk} "
            f"chunk={args.query_chunk_size} {args.dtype}{' forward only' if args.forward_only else ''}{encoder}; "
            f"{datetime.date.today().isoformat()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa", "topk", *FEED_FORWARD],
                        choices=[*ATTENTION, *FEED_FORWARD])
    parser.add_argument("--encoder-lengths", type=int, nargs="*", default=[],
                        help="also time a MiniLM-shaped encoder's train step at these lengths")
    parser.add_argument("--encoder-impls", nargs="+", default=list(ENCODER), choices=ENCODER)
    parser.add_argument("--encoder-batch", type=int, default=1)
    parser.add_argument("--attention-dropout", type=float, default=0.1,
                        help="the encoder's attention dropout (default MiniLM's 0.1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--query-chunk-size", type=int, default=1024)
    parser.add_argument("--ff-chunk-size", type=int, default=1024)
    parser.add_argument("--ff-topk", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--forward-only", action="store_true", help="time inference: forward under no_grad")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-max", type=int, default=4096, help="skip eager above this length (memory)")
    parser.add_argument("--torch-max", type=int, default=1 << 30, help="skip topk_torch above this length")
    parser.add_argument("--timeout", type=float, default=900, help="CPU: seconds per configuration")
    parser.add_argument("--max-seconds", type=float, default=10, help="CUDA: stop repeating after this long")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "IMPL", "L", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, impl, length, out = args.child[0], args.child[1], int(args.child[2]), Path(args.child[3])
        if impl == "topk_torch_ops":
            os.environ["TOPK_LIGHTNING_CPU_KERNEL"] = "0"
        step = encoder_step(impl, length, args) if kind == "encoder" else layer_step(impl, length, args)
        out.write_text(json.dumps(measure_cpu(step, args.repeats)))
        return 0

    passthrough = list(argv if argv is not None else sys.argv[1:])
    description = _describe(args)
    print(f"# {description}", flush=True)
    plan = [("layer", impl, length) for length in args.lengths for impl in args.impls
            if not (impl == "eager" and length > args.eager_max) and not (impl == "topk_torch" and length >
                                                                            args.torch_max)]
    plan += [("encoder", impl, length) for length in args.encoder_lengths for impl in args.encoder_impls]
    rows = []
    for kind, impl, length in plan:
        row = _measure(kind, impl, length, args, passthrough)
        if row is None:
            continue
        row["device"] = args.device
        rows.append(row)
        print(f"  {kind:<7} L={length:>6} {impl:<16} {row['peak_mb']:9.0f} MB {row['seconds'] * 1000:10.2f} ms",
              flush=True)
    print()
    print(_table(rows, forward_only=args.forward_only))
    if args.json:
        from topk_lightning.atomic import atomic_output

        with atomic_output(args.json) as partial:
            report = {"machine": description,
                      "args": {k: v for k, v in vars(args).items() if k not in ("json", "child")}, "rows": rows}
            partial.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
