"""Compiled CPU kernels for top-k attention (`cpu_kernels.c`): the whole forward, and a row-wise exact top-k.

On a CPU the PyTorch steps of top-k attention are bound by memory traffic and by ``torch.topk``: every score tile is
written by a matmul, read back by the selection (``torch.topk`` costs ~4 ns per score read), and a dozen small ops
follow. Measured on 2 cores (Intel Xeon, AVX-512), forward only, B=4, H=12, L=2,048, D=32, k=64: 475 ms against
SDPA's 96 ms. The C forward computes the scores of four query rows at a time into a buffer that stays in cache,
selects each row's top k there, and finishes the row (softmax, weighted sum of value rows) before moving on:
128 ms for the same layer (`benchmarks/results/attention_forward.json`; the README's CPU section has the command).

- `attention_forward`: the whole forward for fp32 without an additive bias (dropout included); it also writes the
  kept indices and probabilities that the PyTorch backward reads.
- `topk_rows`: the selection alone (fp32 and fp64), which the PyTorch path uses for everything else (an additive
  bias, a T5 relative bias, fp64, top-k feed-forward layers).

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; -O3,
-march=native, falling back to portable flags if those fail) and cached in ``$TOPK_LIGHTNING_CACHE`` (default
``~/.cache/topk_lightning``) under a name that includes the source, the flags, the compiler and the CPU, so a cache
shared between machines never loads code built for another CPU. Where no compiler is found or no build succeeds, one
warning says why and both functions return None: the caller then runs the PyTorch steps (same results, slower).
``TOPK_LIGHTNING_CPU_KERNEL=0`` turns the kernels off; ``=portable`` builds them without the AVX-512 code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")
PORTABLE_FLAGS = BASE_FLAGS + ("-DTOPK_PORTABLE",)
# 512-bit vectors measured ~10% faster than GCC's default 256 for the score blocks (Xeon, AVX-512).
NATIVE_FLAGS = BASE_FLAGS + ("-march=native",) + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)
DISABLE_ENV = "TOPK_LIGHTNING_CPU_KERNEL"
CACHE_ENV = "TOPK_LIGHTNING_CACHE"
# Below this many scores a call runs on one thread (starting threads costs ~10-50 us each).
_SCORES_PER_THREAD = 1 << 16
_FUNCTIONS = {torch.float32: "topk_rows_f32", torch.float64: "topk_rows_f64"}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed = False


def available() -> bool:
    """Whether the compiled kernels can run here (compiling them on the first call)."""
    return _load() is not None


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact top-k along the last dim of a CPU fp32/fp64 tensor: (values, int64 indices), unsorted.

    Of tied scores at the k-th place the lower indices are kept. Returns None where the kernel does not apply
    (another device or dtype, ``k`` not below the row length, a NaN in the scores, the kernel unavailable), so that
    the caller falls back to ``torch.topk``.
    """
    if scores.device.type != "cpu" or scores.dtype not in _FUNCTIONS or scores.dim() == 0:
        return None
    length = scores.shape[-1]
    if not 0 < k < length or scores.numel() == 0 or scores.requires_grad:
        return None
    library = _load()
    if library is None:
        return None
    rows_view = scores.reshape(-1, length)
    if rows_view.stride(-1) != 1:
        rows_view = rows_view.contiguous()
    rows = rows_view.shape[0]
    values = torch.empty(rows, k, dtype=scores.dtype)
    index = torch.empty(rows, k, dtype=torch.int64)
    threads = max(1, min(torch.get_num_threads(), scores.numel() // _SCORES_PER_THREAD))
    status = getattr(library, _FUNCTIONS[scores.dtype])(
        rows_view.data_ptr(), rows, length, rows_view.stride(0), k, _groups(length, k), threads, values.data_ptr(),
        index.data_ptr(),
    )
    if status != 0:  # 1: a NaN (torch.topk ranks it first), 2: out of memory
        return None
    shape = (*scores.shape[:-1], k)
    return values.view(shape), index.view(shape)


# Keys are padded to a multiple of this for the compiled score blocks (KEY_BLOCK in cpu_kernels.c).
_KEY_BLOCK = 32


def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    save_for_backward: bool = True,
    dropped: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """A whole top-k attention forward in compiled code: fp32 CPU tensors, shapes as `topk_attention`.

    Scores are computed four query rows at a time into a buffer that stays in cache (never as a tile in memory),
    then each row keeps its top k, takes their softmax and sums the kept value rows. A key padding mask and
    ``causal`` are applied as in `topk_attention`; a row with nothing to attend gets zeros. With dropout,
    ``dropped`` (B, H, Lq, k) bool flags the kept entries it removes; the others are scaled by 1 / (1 - dropout_p)
    in the output (kept_prob holds the probabilities before dropout, as the backward expects). Returns (out (B, H, Lq,
    D) contiguous, kept_index int32 and kept_prob fp32, both (B, H, Lq, k), or None and None without
    ``save_for_backward``), or None where it does not apply (the caller then runs the PyTorch steps).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if not (
        query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32
        and 0 < k < k_len < 2**31 and q_len > 0 and batch * heads > 0
        and (dropped is None or (dropped.dtype == torch.bool and dropped.shape == (batch, heads, q_len, k)))
    ):
        return None
    library = _load()
    if library is None:
        return None
    padded = -(-k_len // _KEY_BLOCK) * _KEY_BLOCK
    key_t = key.new_zeros(batch * kv_heads, dim, padded)
    key_t[:, :, :k_len] = key.reshape(batch * kv_heads, k_len, dim).transpose(1, 2)
    query = query.contiguous()
    value = value.contiguous()
    key_bias = None
    if key_padding_mask is not None and not bool(key_padding_mask.all()):
        key_bias = torch.zeros(batch, k_len).masked_fill_(~key_padding_mask, float("-inf"))
    out = torch.empty(batch, heads, q_len, dim)
    kept_index = torch.empty(batch, heads, q_len, k, dtype=torch.int32) if save_for_backward else None
    kept_prob = torch.empty(batch, heads, q_len, k) if save_for_backward else None
    threads = max(1, min(torch.get_num_threads(), query.numel() * k_len // (dim * _SCORES_PER_THREAD)))
    if dropped is not None:
        dropped = dropped.contiguous()
    status = library.topk_forward_f32(
        query.data_ptr(), key_t.data_ptr(), value.data_ptr(), 0 if key_bias is None else key_bias.data_ptr(),
        0 if dropped is None else dropped.data_ptr(), 1.0 / (1.0 - dropout_p), batch, heads, kv_heads, q_len, k_len,
        padded, dim, k, _groups(k_len, k), int(causal), float(scale), threads,
        out.data_ptr(), *(0 if kept is None else kept.data_ptr() for kept in (kept_index, kept_prob)),
    )
    return (out, kept_index, kept_prob) if status == 0 else None


def _groups(length: int, k: int) -> int:
    # Groups of ~8 scores: measured fastest at L = 512-8,192 and k = 8-64; at least k of them for the bound.
    return max(k, min(length // 8, 4 * k))


def _load() -> ctypes.CDLL | None:
    global _library, _load_failed
    if _library is not None or _load_failed:
        return _library
    setting = os.environ.get(DISABLE_ENV, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return None
    with _lock:
        if _library is None and not _load_failed:
            try:
                _library = build_library(portable=setting == "portable")
            except (OSError, RuntimeError) as error:
                _load_failed = True
                warnings.warn(
                    f"topk_lightning: the compiled CPU kernels are unavailable ({error}); running top-k attention "
                    f"with PyTorch operations (same results, slower). Set {DISABLE_ENV}=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _library


def build_library(portable: bool = False) -> ctypes.CDLL:
    """Compile (or find in the cache) and load `cpu_kernels.c`; ``portable`` leaves out the AVX-512 code.

    Raises:
        RuntimeError: no C compiler, or no set of flags compiled it (the compiler's message included).
        OSError: the library could not be loaded.
    """
    attempts = [PORTABLE_FLAGS] if portable else [NATIVE_FLAGS, PORTABLE_FLAGS]
    for flags in attempts:
        try:
            return _declare(ctypes.CDLL(str(_build(flags))))
        except (RuntimeError, OSError):
            if flags is attempts[-1]:
                raise
    raise AssertionError("unreachable")


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_void_p]
    library.topk_forward_f32.restype = ctypes.c_int
    library.topk_forward_f32.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_double] + [ctypes.c_int64] * 10 + [ctypes.c_double, ctypes.c_int64]
        + [ctypes.c_void_p] * 3
    )
    return library


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(flags: tuple[str, ...]) -> Path:
    """Compile `SOURCE` unless a library built from it for this CPU is cached; returns the library's path."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                        _cpu_identity().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "topk_lightning")
    target = cache / f"cpu_kernels-{digest}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load a half-written library.
    handle, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.partial", dir=cache)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
