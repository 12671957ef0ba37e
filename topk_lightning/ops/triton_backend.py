"""The Triton backend of top-k attention: launch code and autograd function for `triton_kernels`.

Forward: one persistent kernel. Each program takes tiles of query rows and streams over the keys once, computing
scores with ``tl.dot`` and appending those above its running threshold to a small candidate buffer; the buffer is
compacted to the exact top k whenever it fills (see `triton_kernels`; `forward_config` selects other layouts of
this selection, among them a two-pass one). Scores never reach global memory.
Saved for backward: the kept key indices (int32, -1 for empty slots) and each row's log-sum-exp: O(L * k).

Backward: one kernel over query rows recomputes the kept probabilities, writes dQ, and adds dK/dV atomically
into fp32 accumulators (a head group at a time, so the extra memory stays bounded). Atomic adds make dK/dV
reproducible only to rounding; with ``torch.use_deterministic_algorithms(True)`` the kernel writes dS instead and
dK/dV are reduced deterministically over the key-sorted pattern, as the PyTorch backend does.

Dropout masks are drawn in the kernels (Philox, seeded from torch's default generator) and replayed in backward,
so ``torch.manual_seed`` reproduces them; they differ from the PyTorch backend's draws.
"""

from __future__ import annotations

import functools
import os

import torch

from topk_lightning.ops.sparse_rows import TransposedPattern
from topk_lightning.ops.torch_backend import compute_dtype

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
MAX_TOPK = 256
FORWARD_LAYOUTS = ("buffer", "stacks", "bound")  # see forward_config
# Resident programs of the forward kernel per streaming multiprocessor (registers allow two; more queue up).
PROGRAMS_PER_SM = int(os.environ.get("TOPK_LIGHTNING_TRITON_PROGRAMS_PER_SM", "2"))
# fp32 dK/dV accumulators for half-precision inputs are filled this many bytes at a time (a group of kv heads, at
# least one). Each kv head's sums are complete within one launch, so a smaller budget costs only launches: at
# B=1, L=32k, D=64 a kv head needs 16 MiB, and all 12 at once added ~200 MB to the backward's peak (H200,
# 2026-11-30: 482 MB against SDPA's 291 MB).
ACCUMULATOR_BUDGET_BYTES = 32 << 20


def unsupported_reason(
    query: torch.Tensor, key: torch.Tensor, *, topk: int, bias: torch.Tensor | None = None, position_bias=None,
    scale: float | None = None,
) -> str | None:
    """Why the kernels cannot take these arguments, or None when they can."""
    if scale is not None and not scale > 0:
        # The kernels rank unscaled scores q . k, which ranks like scale * q . k only for a positive scale.
        return f"scale {scale} is not positive"
    if bias is not None:
        return "an additive bias is supported by the PyTorch backend only"
    if position_bias is not None:
        return "a relative position_bias is supported by the PyTorch backend only"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported (float16, bfloat16, float32, float64)"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dimension {query.shape[-1]} is above {MAX_HEAD_DIM}"
    if min(topk, key.shape[2]) > MAX_TOPK:
        return f"topk {min(topk, key.shape[2])} (keys kept per query) is above {MAX_TOPK}"
    return None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _program_slots(device_index: int) -> int:
    """Programs the persistent forward launches on this GPU: a few per streaming multiprocessor."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count * PROGRAMS_PER_SM


def forward_config(topk: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and buffer layout of the forward (selection) kernel.

    Keys stream in segments of SEGMENT blocks of BLOCK_N; after a segment, rows whose buffer could not take
    another one are cut to their TOPK largest entries. ``layout`` "stacks" (`topk_forward_stacks_kernel`) gives
    every (row, lane) of a score tile its own stack of DEPTH slots: deep enough for the kept entries spread over
    the lanes plus a segment, with room so that cuts are rare once the threshold is high. ``layout`` "buffer"
    (`topk_forward_kernel`) appends to one CAND-slot buffer per row through a prefix sum. ``layout`` "bound"
    (`topk_forward_bound_kernel`) first finds a lower bound of each row's k-th score in a pass that stores nothing,
    then appends only scores above it to CAND // BLOCK_N-deep stacks, never cutting in the hot loop; it needs
    topk <= BLOCK_N for a tight bound, so a larger topk takes the "buffer" layout.
    """
    # The default is the configuration measured fastest on an H200 (benchmarks/tune_triton.py, 2026-11-30:
    # benchmarks/results/attention_cuda.md). The "stacks" layout compiles without register spills for D <= 128
    # (ptxas) and passes the interpreter tests, but has not yet run on a GPU: select it with
    # TOPK_LIGHTNING_TRITON_FWD=64,64,8,2,stacks (BLOCK_N 32 for D > 64) and measure before relying on it.
    # Likewise "bound" (TOPK_LIGHTNING_TRITON_FWD=64,64,8,2,bound): 0.28x the buffer kernel's SASS instructions per
    # key block for sm_90 on its common path (benchmarks/triton_sass.py), never run on a GPU yet;
    # benchmarks/tune_triton.py tries it first.
    config = {"BLOCK_M": 64, "BLOCK_N": 64 if head_dim <= 128 else 32, "num_warps": 4, "num_stages": 3,
              "SEGMENT": 2, "layout": "buffer"}
    override = os.environ.get("TOPK_LIGHTNING_TRITON_FWD")  # "BLOCK_M,BLOCK_N,num_warps,SEGMENT[,layout]"
    if override:
        fields = override.split(",")
        config.update(zip(("BLOCK_M", "BLOCK_N", "num_warps", "SEGMENT"), (int(x) for x in fields[:4])))
        if len(fields) > 4:
            config["layout"] = fields[4]
    if config["layout"] not in FORWARD_LAYOUTS:
        raise ValueError(f"TOPK_LIGHTNING_TRITON_FWD={override!r}: layout {config['layout']!r} is not one of "
                         f"{', '.join(FORWARD_LAYOUTS)}")
    if config["layout"] == "bound" and topk > config["BLOCK_N"]:
        config["layout"] = "buffer"
    config["DEPTH"] = -(-topk // config["BLOCK_N"]) + config["SEGMENT"] + 5
    config["CAND"] = _next_power_of_2(4 * topk + config["SEGMENT"] * config["BLOCK_N"])
    config["CAND_C"] = _next_power_of_2(4 * topk)  # "bound": a row's candidates after pass 2, ~1.4 topk typically
    return config


FORWARD_KERNELS = {"buffer": "topk_forward_kernel", "stacks": "topk_forward_stacks_kernel",
                   "bound": "topk_forward_bound_kernel"}  # layout -> kernel in `triton_kernels`


def forward_constants(config: dict, topk: int, head_dim: int, dtype: torch.dtype, *, causal: bool, has_pad: bool,
                      on_cuda: bool, key_lengths: bool = False) -> dict:
    """Compile-time arguments (and num_warps / num_stages) of the forward kernel of ``config["layout"]``.
    ``has_pad``: a key mask of any pattern is read per key; ``key_lengths``: each batch's keys are a prefix whose
    length is read once per tile (the two exclude each other)."""
    if has_pad and key_lengths:
        raise ValueError("forward_constants: has_pad and key_lengths exclude each other")
    constants = dict(
        TOPK=topk, HEAD_DIM=head_dim, BLOCK_D=max(16, _next_power_of_2(head_dim)), BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"], SEGMENT=config["SEGMENT"], HAS_PAD=has_pad, CAUSAL=causal, KEY_LENGTHS=key_lengths,
        KEY_BITS=64 if dtype == torch.float64 else 32, IEEE=dtype in (torch.float32, torch.float64),
        DOT_UPCAST=not on_cuda and dtype == torch.bfloat16,  # the interpreter multiplies bf16 tiles wrongly
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if config["layout"] == "bound":
        constants.update(DEPTH=config["CAND"] // config["BLOCK_N"], CAND_C=config["CAND_C"],
                         GROUP=config["num_warps"], INLINE_PTX=on_cuda and dtype != torch.float64)
    elif config["layout"] == "stacks":
        constants.update(DEPTH=config["DEPTH"])
    else:
        constants.update(CAND=config["CAND"], GROUP=config["num_warps"])
    return constants


def _forward_scratch(config: dict, programs: int, score_dtype: torch.dtype, device) -> list[torch.Tensor]:
    """The per-program working memory of the forward kernel of ``config["layout"]``, in its argument order:
    candidate values and key indices (buffer rows of CAND slots, or DEPTH stack slices), then for "buffer" and
    "bound" a count and a threshold per row, and for "bound" the stack heights and the packed candidates."""
    rows = programs * config["BLOCK_M"]
    slots = rows * (config["DEPTH"] * config["BLOCK_N"] if config["layout"] == "stacks" else config["CAND"])
    scratch = [torch.empty(slots, dtype=score_dtype, device=device),
               torch.empty(slots, dtype=torch.int32, device=device)]
    if config["layout"] in ("buffer", "bound"):
        scratch += [torch.empty(rows, dtype=torch.int32, device=device),
                    torch.empty(rows, dtype=score_dtype, device=device)]
    if config["layout"] == "bound":
        scratch += [torch.empty(rows * config["BLOCK_N"], dtype=torch.int32, device=device),
                    torch.empty(rows * config["CAND_C"], dtype=score_dtype, device=device),
                    torch.empty(rows * config["CAND_C"], dtype=torch.int32, device=device)]
    return scratch


def gather_config(topk: int, head_dim: int) -> dict:
    """Rows per program of the output and backward kernels, which hold (rows, topk, head_dim) gathered tiles."""
    topk_p2 = max(16, _next_power_of_2(topk))
    block_d = max(16, _next_power_of_2(head_dim))
    block_r = max(1, min(16, 8192 // (topk_p2 * block_d)))
    return {"BLOCK_R": block_r, "TOPK_P2": topk_p2, "num_warps": 4}


def key_padding_layout(key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    """How the forward kernels read a (B, Lk) bool key mask: ``(None, "none")`` when every key is visible,
    ``(lengths, "lengths")`` when each batch's visible keys are a prefix (right padding, what tokenizers produce;
    int32 (B,) counts: the kernels stop there and need no per-key mask), else ``(mask as uint8, "mask")``.
    One host synchronisation, as the all-visible check alone needed."""
    if key_padding_mask is None:
        return None, "none"
    lengths = key_padding_mask.sum(-1, dtype=torch.int32)
    positions = torch.arange(key_padding_mask.shape[-1], device=key_padding_mask.device)
    prefix = key_padding_mask == (positions[None, :] < lengths[:, None])
    every_key, is_prefix = torch.stack([key_padding_mask.all(), prefix.all()]).tolist()
    if every_key:
        return None, "none"
    if is_prefix:
        return lengths, "lengths"
    return key_padding_mask.to(torch.uint8), "mask"


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


class TritonTopKAttention(torch.autograd.Function):
    """Autograd function of the Triton backend; arguments as `topk_attention`, already checked."""

    @staticmethod
    def forward(ctx, query, key, value, key_padding_mask, topk, scale, dropout_p, causal):
        from topk_lightning.ops import triton_kernels as kernels

        batch, heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        k = max(1, min(topk, k_len))
        out = torch.empty(batch, heads, q_len, head_dim, dtype=query.dtype, device=query.device)
        kept_index = torch.full((batch, heads, q_len, k), -1, dtype=torch.int32, device=query.device)
        score_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        lse = torch.full((batch, heads, q_len), float("-inf"), dtype=score_dtype, device=query.device)
        params = torch.tensor([scale, dropout_p], dtype=score_dtype, device=query.device)
        seed = int(torch.randint(0, 2**31 - 1 - batch * heads, (1,)).item()) if dropout_p > 0 else 0

        if q_len and k_len:
            config = forward_config(k, head_dim, query.dtype)
            row_blocks = triton_cdiv(q_len, config["BLOCK_M"])
            num_tiles = batch * heads * row_blocks
            if query.device.type == "cuda":
                programs = min(num_tiles, _program_slots(query.device.index or 0))
            else:  # the interpreter runs programs one after another
                programs = min(num_tiles, 2)
            pad, layout = key_padding_layout(key_padding_mask)
            has_pad, key_lengths = layout == "mask", layout == "lengths"
            pad_strides = (0, 0) if pad is None else (pad.stride(0), pad.stride(1) if has_pad else 0)
            pad = kept_index if pad is None else pad  # a valid pointer the kernel never reads
            constants = forward_constants(config, k, head_dim, query.dtype, causal=bool(causal), has_pad=has_pad,
                                          key_lengths=key_lengths, on_cuda=query.device.type == "cuda")
            shape_args = (*_strides(query), *_strides(key), *pad_strides,
                          heads, heads // kv_heads, q_len, k_len, row_blocks, num_tiles, k_len - q_len)
            scratch = _forward_scratch(config, programs, score_dtype, query.device)
            getattr(kernels, FORWARD_KERNELS[config["layout"]])[(programs,)](
                query, key, pad, kept_index, lse, *scratch, params, *shape_args, **constants,
            )
            rows_config = gather_config(k, head_dim)
            kernels.topk_output_kernel[(triton_cdiv(q_len, rows_config["BLOCK_R"]), batch * heads)](
                query, key, value, kept_index, lse, out, params,
                *_strides(query), *_strides(key), *_strides(value), *_strides(out),
                heads, heads // kv_heads, q_len, seed,
                TOPK=k, TOPK_P2=rows_config["TOPK_P2"], HEAD_DIM=head_dim,
                BLOCK_D=max(16, _next_power_of_2(head_dim)), BLOCK_R=rows_config["BLOCK_R"],
                DROPOUT=dropout_p > 0, num_warps=rows_config["num_warps"],
            )
        else:
            out.zero_()
        ctx.save_for_backward(query, key, value, kept_index, lse, params)
        ctx.config = (float(scale), float(dropout_p), seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from topk_lightning.ops import triton_kernels as kernels

        query, key, value, kept_index, lse, params = ctx.saved_tensors
        scale, dropout_p, seed = ctx.config
        batch, heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        group = heads // kv_heads
        k = kept_index.shape[-1]
        grad_q = torch.empty_like(query, memory_format=torch.contiguous_format)
        grad_k = torch.zeros_like(key, memory_format=torch.contiguous_format)
        grad_v = torch.zeros_like(value, memory_format=torch.contiguous_format)
        if q_len == 0 or k_len == 0:
            return grad_q.zero_(), grad_k, grad_v, None, None, None, None, None

        config = gather_config(k, head_dim)
        block_r = config["BLOCK_R"]
        work = compute_dtype(query.dtype)
        deterministic = torch.are_deterministic_algorithms_enabled()

        def launch(head_offset, launch_heads, acc_k, acc_v, grad_score, weight):
            kernels.topk_backward_kernel[(triton_cdiv(q_len, block_r), batch * launch_heads)](
                query, key, value, grad_out, kept_index, lse, grad_q, acc_k, acc_v, grad_score, weight, params,
                *_strides(query), *_strides(key), *_strides(value), *_strides(grad_out), *_strides(grad_q),
                *_strides(acc_k),
                heads, launch_heads, head_offset, group, q_len, seed,
                TOPK=k, TOPK_P2=config["TOPK_P2"], HEAD_DIM=head_dim,
                BLOCK_D=max(16, _next_power_of_2(head_dim)), BLOCK_R=block_r,
                DROPOUT=dropout_p > 0, ATOMIC=not deterministic, num_warps=config["num_warps"],
            )

        if deterministic:
            grad_score = torch.zeros(batch, heads, q_len, k, dtype=work, device=query.device)
            weight = torch.zeros_like(grad_score)
            launch(0, heads, grad_k, grad_v, grad_score, weight)
            _key_gradients_deterministic(kept_index, grad_score, weight, query, grad_out, grad_k, grad_v, scale)
        elif work == query.dtype:  # fp32/fp64: accumulate in the gradients themselves
            launch(0, heads, grad_k, grad_v, grad_q, grad_q)
        else:
            per_kv_head = 2 * batch * k_len * head_dim * 4
            kv_step = max(1, min(kv_heads, ACCUMULATOR_BUDGET_BYTES // max(1, per_kv_head)))
            for first in range(0, kv_heads, kv_step):
                last = min(first + kv_step, kv_heads)
                acc_k = torch.zeros(batch, last - first, k_len, head_dim, dtype=torch.float32, device=key.device)
                acc_v = torch.zeros_like(acc_k)
                launch(first * group, (last - first) * group, acc_k, acc_v, grad_q, grad_q)
                grad_k[:, first:last] = acc_k
                grad_v[:, first:last] = acc_v
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _key_gradients_deterministic(kept_index, grad_score, weight, query, grad_out, grad_k, grad_v, scale):
    """dK, dV by summing over the key-sorted pattern (no atomics): the PyTorch backend's reduction."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = grad_k.shape[1], grad_k.shape[2]
    k = kept_index.shape[-1]
    slabs, rows = batch * kv_heads, (heads // kv_heads) * q_len
    work = grad_score.dtype
    # Empty slots (-1) carry zero weight; point them at key 0 of their slab.
    index = kept_index.reshape(slabs, rows, k).long().clamp_min(0)
    flat = (index + (torch.arange(slabs, device=index.device) * k_len)[:, None, None]).view(-1, k)
    by_key = TransposedPattern(flat, slabs * k_len)
    dv = by_key.weighted_row_sum(grad_out.reshape(-1, head_dim).to(work), weight.reshape(-1, k))
    dk = by_key.weighted_row_sum(query.reshape(-1, head_dim).to(work), grad_score.reshape(-1, k)) * scale
    grad_v.copy_(dv.view(grad_v.shape))
    grad_k.copy_(dk.view(grad_k.shape))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
