"""What the GPU would run, read without a GPU: the Triton forward kernels compiled for an NVIDIA target, per layout.

Compiles each forward layout of `topk_lightning.ops.triton_kernels` (the same compile-time arguments the backend
launches with, from `triton_backend.forward_config` / `forward_constants`; bf16 inputs, contiguous (B, H, L, D)
tensors) for a GPU architecture with the ptxas, cuobjdump and nvdisasm that ship in the triton wheel, then reports
registers, spill stack and, for every loop that holds the tensor-core product of a key block, its SASS instructions
per key block and warp. Those loops run once per key block of every tile, so at long inputs their instruction count
times the warps per program is what the forward pays per key block.

This is a static proxy for speed, not a timing: memory stalls, occupancy and latency hiding are not in it. Use it to
compare kernel variants on a machine without a GPU; measure with `benchmarks/tune_triton.py` on one.

    python benchmarks/triton_sass.py                       # sm_90 (H100/H200), k=64, D=64
    python benchmarks/triton_sass.py --arch 90 --topk 64 --head-dim 64 --markdown benchmarks/results/triton_sass.md
    python benchmarks/triton_sass.py --padding lengths     # a right-padded batch (key counts); mask: any key mask
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Integer arguments equal to 1 for contiguous (B, H, L, D) inputs, and those divisible by 16: Triton specializes
# both at launch, which turns the key loads into vectorized asynchronous copies.
_ONES = {"stride_qd", "stride_kd", "group"}
_DIVISIBLE = {"stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "q_len", "k_len",
              "row_blocks", "num_tiles"}


def _pointer_type(name: str, dtype: str, padding: str) -> str:
    if name in ("Q", "K"):
        return f"*{dtype}"
    if name == "PAD":
        return "*i32" if padding == "lengths" else "*u8"
    return "*i32" if ("IDX" in name or "COUNT" in name) else "*fp32"


def compile_layout(layout: str, *, arch: int, topk: int, head_dim: int, warps: int | None, block_m: int | None,
                   padding: str = "none"):
    """The compiled kernel (cubin bytes) and its forward_config for one layout; ``padding``: "none", "mask" (a key
    mask of any pattern) or "lengths" (right padding, read as each batch's key count)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from topk_lightning.ops import triton_backend, triton_kernels

    os.environ["TOPK_LIGHTNING_TRITON_FWD"] = ",".join(
        str(x) for x in (block_m or 64, 64 if head_dim <= 128 else 32, warps or 4, 2, layout))
    try:
        config = triton_backend.forward_config(topk, head_dim, torch.bfloat16)
    finally:
        os.environ.pop("TOPK_LIGHTNING_TRITON_FWD")
    constants = triton_backend.forward_constants(config, topk, head_dim, torch.bfloat16, causal=False,
                                                 has_pad=padding == "mask", key_lengths=padding == "lengths",
                                                 on_cuda=True)
    options = {"num_warps": constants.pop("num_warps"), "num_stages": constants.pop("num_stages")}
    kernel = getattr(triton_kernels, triton_backend.FORWARD_KERNELS[config["layout"]])
    constants.update({name: 1 for name in _ONES if name in kernel.arg_names})
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name[0].isupper():
            signature[name] = _pointer_type(name, "bf16", padding)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in _DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["cubin"], config, options["num_warps"]


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def analyse(cubin: bytes, *, head_dim: int) -> dict:
    """Registers, spill stack and the key-block loops of one cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    is_instruction = re.compile(r"^\s*/\*[0-9a-f]+\*/")
    labels = {line.strip()[:-1]: i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:$", line.strip())}
    spans = []
    for i, line in enumerate(sass):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and target.group(1) in labels and labels[target.group(1)] < i:
            spans.append((labels[target.group(1)], i))
    loops, selection = [], []
    for first, last in sorted(spans):
        body = [b for b in sass[first:last + 1] if is_instruction.match(b)]
        mma = sum(("HGMMA" in b or "HMMA" in b) for b in body)
        nested = [(f, l) for f, l in spans if first < f and l < last]
        if not mma and not nested and len(body) > 2:  # (not the branch-to-itself after EXIT)
            selection.append(len(body))  # an innermost loop of the selection: one bisection step per iteration
        nested_mma = any(any("MMA" in b for b in sass[f:l + 1]) for f, l in nested)
        if not mma or nested_mma:
            continue  # only the innermost loops over key blocks
        # Stores that a predicated forward branch jumps over (the bound kernel's appends) run only when an entry
        # of the warp passes its compare, which at long inputs is a few in a thousand: not on the common path.
        skipped = 0
        for i in range(first, last + 1):
            branch = re.search(r"@!?U?P\w+\s+BRA(?:\.\w+)* `\((\.L_x_\d+)\)", sass[i])
            end = labels.get(branch.group(1), -1) if branch else -1
            if first < i < end <= last and any("STG" in b for b in sass[i + 1:end]):
                skipped += sum(bool(is_instruction.match(b)) for b in sass[i + 1:end])
        # One key block's product on sm_90 is head_dim / 16 HGMMA (64x64x16); the bound kernel's first pass holds
        # two blocks per iteration.
        loops.append({"instructions": len(body), "common": len(body) - skipped,
                      "blocks": max(1, mma // max(1, head_dim // 16)),
                      "local_memory": sum(("LDL" in b or "STL" in b) for b in body),
                      "shared_memory": sum(("LDS" in b or "STS" in b) for b in body)})
    return {"registers": registers, "stack": stack, "loops": loops, "selection": selection}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=["buffer:4", "buffer:8", "stacks:8", "bound:4", "bound:8"],
                        help="layout:num_warps pairs")
    parser.add_argument("--padding", nargs="+", choices=("none", "lengths", "mask"), default=["none"],
                        help="compile for batches without padding (default), right-padded (read as key counts), "
                        "or with a key mask of any pattern; one table row per layout and padding")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)

    import triton

    lines = [f"Forward kernels compiled for sm_{args.arch} by triton {triton.__version__} (bf16, k={args.topk}, "
             f"D={args.head_dim}, BLOCK_M 64, BLOCK_N 64), {datetime.date.today()}: `python benchmarks/triton_sass.py "
             f"--arch {args.arch} --topk {args.topk} --head-dim {args.head_dim}`. Static SASS counts, not timings. "
             "Common path: without the stores that a branch skips unless an entry of the warp is appended. The bound "
             "kernel's loops, in order: pass 1 over whole pairs of key blocks, its masked last pair, pass 2 over whole "
             "blocks, its masked last block, the same two again (pass 2 from a tighter bound, for a tile whose stacks "
             "overflowed), the fallback's buffer loop; its hot path is the first and third (all key blocks but the "
             "last without padding or a causal mask, or up to each batch's key count with right padding; with a "
             "key mask of any pattern the unmasked loops are compiled out and the masked ones are the hot path). "
             "Padding: none; lengths (right padding, as tokenizers pad: each batch's key count, loops stop there); "
             "mask (any pattern, read per key). Spills (local memory ops) cost more than their count.",
             "",
             "| layout | warps | padding | registers | spill stack B | key-block loops: SASS per block per warp on the "
             "common path (local / shared memory ops) | hot-path warp-instructions per key block | other innermost "
             "loops (selection): SASS per iteration per warp |", "|---|---:|---|---:|---:|---|---:|---|"]
    for item in args.configs:
        layout, warps = item.split(":")
        for padding in args.padding:
            cubin, config, num_warps = compile_layout(layout, arch=args.arch, topk=args.topk, head_dim=args.head_dim,
                                                      warps=int(warps), block_m=None, padding=padding)
            report = analyse(cubin, head_dim=args.head_dim)
            loops = "; ".join(f"{loop['common'] / loop['blocks']:.0f} ({loop['local_memory']} / "
                              f"{loop['shared_memory']})" for loop in report["loops"])
            # The hot path: the one key loop; for the bound kernel, whose loops come in source order (as the
            # table's legend lists them), the two passes over whole blocks (pass 1, pass 2), or with a key mask,
            # where those are compiled out, the two masked ones.
            if config["layout"] != "bound":
                hot = report["loops"][:1]
            elif padding == "mask":
                hot = report["loops"][:2]
            else:
                hot = [report["loops"][0], report["loops"][2]]
            total = sum(loop["common"] / loop["blocks"] for loop in hot) * num_warps
            lines.append(f"| {config['layout']} | {num_warps} | {padding} | {report['registers']} | "
                         f"{report['stack']} | {loops} | {total:.0f} | {'; '.join(map(str, report['selection']))} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown:
        from topk_lightning.atomic import atomic_output

        with atomic_output(args.markdown) as tmp:
            tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
