"""Triton kernels for top-k attention (imported only by `topk_lightning.ops.triton_backend`).

Forward selection (`topk_forward_kernel`), one program per tile of ``BLOCK_M`` query rows of one (batch, head),
persistent over tiles::

    for each block of BLOCK_N keys:            (one pass over QK^T; scores never leave the chip)
        s = q @ k_block.T, masked               tl.dot, fp32 accumulation (fp64 for fp64 inputs); unscaled
        append every s > threshold[row]         to the program's candidate buffer (CAND slots per row)
        every SEGMENT blocks, if a buffer could overflow: keep each row's TOPK largest, threshold = the k-th
    select a last time; write the kept key indices and the log-sum-exp of their scores times scale

The threshold only ever rises to the k-th largest score seen so far, so an entry below it can never be in the
final top k: the result is exactly the top-k of each row (ties broken towards the lower key index). Selection is
by bisection over the scores' bit patterns (order-preserving integer keys), which needs no sort.

Two other layouts of the same selection are selectable (`triton_backend.forward_config`): column stacks
(`topk_forward_stacks_kernel`) and the two-pass `topk_forward_bound_kernel`, which first bounds each row's k-th
score from below in a pass that only keeps maxima, then appends the few scores above the bound with stores that a
branch skips for all but a few entries in a thousand (no prefix sum, no cut in the loop). Compiled for sm_90 its two
passes issue about 0.28x the instructions per key block of the buffer kernel's one on their common path
(`benchmarks/triton_sass.py`); it has not run on a GPU.

Output (`topk_output_kernel`) and backward (`topk_backward_kernel`), one program per ``BLOCK_R`` query rows:
recompute p_j = exp(q . k[idx_j] * scale - lse) for the kept entries only; the output is sum_j p_j v[idx_j];
backward forms dS, stores dQ and adds dK, dV atomically (or writes dS out for a deterministic reduction).
"""

import triton
import triton.language as tl


@triton.jit
def _order_keys(values, KEY_BITS: tl.constexpr):
    """Integer keys whose signed order is the float order of ``values`` (fp32 -> int32, fp64 -> int64)."""
    if KEY_BITS == 64:
        bits = values.to(tl.int64, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    else:
        bits = values.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_to_value(keys, KEY_BITS: tl.constexpr):
    """Inverse of `_order_keys` (the transform is an involution)."""
    if KEY_BITS == 64:
        bits = tl.where(keys < 0, keys ^ 0x7FFFFFFFFFFFFFFF, keys)
        return bits.to(tl.float64, bitcast=True)
    else:
        bits = tl.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(keys, valid, TOPK: tl.constexpr, KEY_BITS: tl.constexpr):
    """Per row of ``keys`` (R, N): the TOPK-th largest valid key, i.e. the largest t with at least TOPK valid keys
    >= t. Rows with fewer than TOPK valid keys get the minimum integer (callers check the count).

    Bisection between the row's smallest and largest key, keeping at least TOPK keys >= ``lo`` and fewer than TOPK
    > ``hi``. A row stops as soon as exactly TOPK keys are >= lo (the answer is then the smallest of them) or lo
    meets hi (ties at the answer): a few steps when the TOPK-th and the next key are far apart in key space, never
    more than one per key bit. The loop runs until every row of the call has stopped.
    """
    if KEY_BITS == 64:
        smallest = tl.full([keys.shape[0]], -9223372036854775808, tl.int64)
        largest = tl.full([keys.shape[0]], 9223372036854775807, tl.int64)
    else:
        smallest = tl.full([keys.shape[0]], -2147483648, tl.int32)
        largest = tl.full([keys.shape[0]], 2147483647, tl.int32)
    lo = tl.min(tl.where(valid, keys, largest[:, None]), axis=1)
    hi = tl.max(tl.where(valid, keys, smallest[:, None]), axis=1)
    at_least_lo = tl.sum(valid.to(tl.int32), axis=1)
    pending = (at_least_lo > TOPK) & (lo < hi)
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        mid = (lo & hi) + ((lo ^ hi) >> 1) + ((lo ^ hi) & 1)  # ceil((lo + hi) / 2) without overflow: lo < mid <= hi
        at_least = tl.sum((valid & (keys >= mid[:, None])).to(tl.int32), axis=1)
        up = pending & (at_least >= TOPK)
        lo = tl.where(up, mid, lo)
        at_least_lo = tl.where(up, at_least, at_least_lo)
        hi = tl.where(pending & (at_least < TOPK), mid - 1, hi)
        pending = (at_least_lo > TOPK) & (lo < hi)
    answer = tl.min(tl.where(valid & (keys >= lo[:, None]), keys, largest[:, None]), axis=1)
    return tl.where(tl.sum(valid.to(tl.int32), axis=1) >= TOPK, answer, smallest)


@triton.jit
def _select_group(VAL, IDX_BUF, COUNT, THRESH, rows, slots, TOPK: tl.constexpr, KEY_BITS: tl.constexpr,
                  KEY_ORDER: tl.constexpr = True):
    """Keep the TOPK largest buffered candidates of the buffer rows ``rows`` (one per warp), moved to the front of
    each row in buffer order; counts and thresholds (the k-th largest value, or -inf while a row holds fewer than
    TOPK entries) are written back to COUNT/THRESH. Returns the kept values, their key indices and new positions,
    and the counts, for the final call's softmax. Of entries tied at the k-th value the lowest key indices stay:
    the first in buffer order when the buffer is in key order (KEY_ORDER), else found by bisection over indices."""
    count = tl.load(COUNT + rows)
    valid = slots[None, :] < count[:, None]
    offsets = rows[:, None].to(tl.int64) * slots.shape[0] + slots[None, :]
    values = tl.load(VAL + offsets, mask=valid, other=float("-inf"))
    index = tl.load(IDX_BUF + offsets, mask=valid, other=-1)
    keys = _order_keys(values, KEY_BITS)
    kth = _kth_largest_key(keys, valid, TOPK, KEY_BITS)
    full = count >= TOPK
    above = valid & (keys > kth[:, None])
    tied = valid & (keys == kth[:, None])
    room = TOPK - tl.sum(above.to(tl.int32), axis=1)
    if KEY_ORDER:
        keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    else:
        # The room-th smallest tied index, bit by bit; only when some row has more tied entries than room.
        index_cut = tl.full([rows.shape[0]], 2147483647, tl.int32)
        if tl.max(tl.where(full, tl.sum(tied.to(tl.int32), axis=1) - room, 0), axis=0) > 0:
            cut = tl.zeros([rows.shape[0]], dtype=tl.int32)
            for step in range(0, 31):
                candidate = cut + (tl.full([rows.shape[0]], 1, tl.int32) << (30 - step))
                below = tl.sum((tied & (index < candidate[:, None])).to(tl.int32), axis=1)
                cut = tl.where(below < room, candidate, cut)
            index_cut = cut
        keep = above | (tied & (index <= index_cut[:, None]))
    keep = tl.where(full[:, None], keep, valid)
    position = tl.cumsum(keep.to(tl.int32), axis=1) - 1
    new_count = tl.sum(keep.to(tl.int32), axis=1)
    threshold = tl.where(full, _key_to_value(kth, KEY_BITS), float("-inf"))
    tl.debug_barrier()  # every thread has read its rows before any entry moves
    moved = rows[:, None].to(tl.int64) * slots.shape[0] + position
    tl.store(VAL + moved, values, mask=keep)
    tl.store(IDX_BUF + moved, index, mask=keep)
    tl.store(COUNT + rows, new_count)
    tl.store(THRESH + rows, threshold.to(values.dtype))
    return values, index, keep, position, new_count


@triton.jit
def _load_query_tile(Q, b, h, rows, row_ok, dims, dim_ok, stride_qb, stride_qh, stride_qm, stride_qd,
                     DOT_UPCAST: tl.constexpr):
    """The (BLOCK_M, BLOCK_D) query tile of head (b, h), zeros past the rows and the head dimension."""
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    if DOT_UPCAST:  # Triton's interpreter multiplies bfloat16 tiles wrongly; the GPU never takes this branch
        q = q.to(tl.float32)
    return q


@triton.jit
def _open_tile(tile, Q, K, PAD, heads, group, q_len, k_len, row_blocks, causal_offset, dims, dim_ok,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_pb,
               BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_UPCAST: tl.constexpr, KEY_LENGTHS: tl.constexpr):
    """Tile number -> (batch x head, row block, batch, its query rows and which are real, the query tile, the base
    of its kv head's keys, the end of the keys it can see, and its batch's key count). With KEY_LENGTHS, PAD holds
    each batch's key count (a right-padded mask, as tokenizers pad): the loops stop there, so padding costs no
    score and every whole key block before it runs unmasked."""
    bh = tile // row_blocks
    row_block = tile % row_blocks
    b = bh // heads
    h = bh % heads
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q = _load_query_tile(Q, b, h, rows, row_ok, dims, dim_ok, stride_qb, stride_qh, stride_qm, stride_qd,
                         DOT_UPCAST)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    seen = k_len
    if KEY_LENGTHS:
        seen = tl.load(PAD + b * stride_pb)
    key_end = seen
    if CAUSAL:
        key_end = tl.minimum(seen, row_block * BLOCK_M + BLOCK_M + causal_offset)
    return bh, row_block, b, rows, row_ok, q, k_base, key_end, seen


@triton.jit
def _block_scores(q, k_base, cols, dims, dim_ok, k_len, stride_kn, stride_kd, IEEE: tl.constexpr,
                  DOT_UPCAST: tl.constexpr, SCORE_DTYPE: tl.constexpr, CHECK_COLS: tl.constexpr = True):
    """Unscaled scores q . k of the query tile against keys ``cols`` (zero for keys past k_len when CHECK_COLS;
    without it every col must be a key)."""
    load_ok = dim_ok[:, None]
    if CHECK_COLS:
        load_ok = load_ok & (cols < k_len)[None, :]
    k_t = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd, mask=load_ok, other=0.0)
    if DOT_UPCAST:
        k_t = k_t.to(tl.float32)
    if IEEE:
        return tl.dot(q, k_t, input_precision="ieee", out_dtype=SCORE_DTYPE)
    return tl.dot(q, k_t, out_dtype=SCORE_DTYPE)


@triton.jit
def _score_tile(q, k_base, PAD, b, rows, row_ok, cols, dims, dim_ok, threshold, k_len, causal_offset,
                stride_kn, stride_kd, stride_pb, stride_pn,
                HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
                SCORE_DTYPE: tl.constexpr, INCLUSIVE: tl.constexpr = False, COMPARE: tl.constexpr = True,
                ROW_MASK: tl.constexpr = True):
    """Unscaled scores q . k of a (BLOCK_M, BLOCK_N) tile against keys ``cols`` (a positive scale does not change
    which keys rank highest, so the selection never multiplies: `_write_kept` scales the kept ones), and which of
    them to append: above the row's threshold (or equal to it, INCLUSIVE; any score without COMPARE), on a real row
    and key, not padding, not in the causal future (rows past the queries are masked unless not ROW_MASK)."""
    col_ok = cols < k_len
    scores = _block_scores(q, k_base, cols, dims, dim_ok, k_len, stride_kn, stride_kd, IEEE, DOT_UPCAST, SCORE_DTYPE)
    if not COMPARE:
        take = col_ok[None, :]  # broadcast to the tile by the row mask below
    elif INCLUSIVE:
        take = (scores >= threshold[:, None]) & col_ok[None, :]
    else:
        take = (scores > threshold[:, None]) & col_ok[None, :]
    if HAS_PAD:
        pad = tl.load(PAD + b * stride_pb + cols * stride_pn, mask=col_ok, other=0)
        take = take & (pad != 0)[None, :]
    if CAUSAL:
        take = take & (cols[None, :] <= rows[:, None] + causal_offset)
    if ROW_MASK:
        take = take & row_ok[:, None]
    return scores, take


@triton.jit
def _select_tile_buffered(q, k_base, PAD, IDX, LSE, SCRATCH_VAL, SCRATCH_IDX, SCRATCH_COUNT, SCRATCH_THRESH,
                          b, bh, rows, row_ok, buffer_first, row_first, key_end, dims, dim_ok, scale,
                          q_len, k_len, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                          TOPK: tl.constexpr, CAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SEGMENT: tl.constexpr, GROUP: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                          KEY_BITS: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
                          SCORE_DTYPE: tl.constexpr):
    """One tile of BLOCK_M query rows through the candidate buffer (rows ``buffer_first`` ... of SCRATCH_*, CAND
    slots each), from a threshold of -inf: the kept key indices go to IDX and the log-sum-exp to LSE."""
    buffer_rows = buffer_first + tl.arange(0, BLOCK_M)
    keys_in_block = tl.arange(0, BLOCK_N)
    group_rows = tl.arange(0, GROUP)
    slots = tl.arange(0, CAND)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    threshold = tl.full([BLOCK_M], float("-inf"), SCORE_DTYPE)
    # Keys in segments of SEGMENT blocks: within one the loop only appends (no branches, so loads pipeline);
    # between segments, rows whose buffer could not take another segment are selected down to TOPK.
    for segment in range(0, key_end, SEGMENT * BLOCK_N):
        for start in range(segment, tl.minimum(segment + SEGMENT * BLOCK_N, key_end), BLOCK_N):
            cols = start + keys_in_block
            scores, take = _score_tile(q, k_base, PAD, b, rows, row_ok, cols, dims, dim_ok, threshold,
                                       k_len, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                                       HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE)
            position = count[:, None] + tl.cumsum(take.to(tl.int32), axis=1) - 1
            target = buffer_rows[:, None] * CAND + position  # int32: the buffers hold far fewer than 2**31
            tl.store(SCRATCH_VAL + target, scores, mask=take)
            tl.store(SCRATCH_IDX + target, cols[None, :] + position * 0, mask=take)
            count += tl.sum(take.to(tl.int32), axis=1)
        if tl.max(count, axis=0) > CAND - SEGMENT * BLOCK_N:
            tl.store(SCRATCH_COUNT + buffer_rows, count)
            tl.debug_barrier()
            for first in range(0, BLOCK_M, GROUP):
                _select_group(SCRATCH_VAL, SCRATCH_IDX, SCRATCH_COUNT, SCRATCH_THRESH,
                              buffer_first + first + group_rows, slots, TOPK, KEY_BITS)
            tl.debug_barrier()
            count = tl.load(SCRATCH_COUNT + buffer_rows)
            threshold = tl.load(SCRATCH_THRESH + buffer_rows)

    # Final selection, GROUP rows at a time: kept indices and the log-sum-exp of their scores.
    tl.store(SCRATCH_COUNT + buffer_rows, count)
    tl.debug_barrier()
    for first in range(0, BLOCK_M, GROUP):
        rows_g = row_first + first + group_rows
        values, index, keep, position, kept = _select_group(
            SCRATCH_VAL, SCRATCH_IDX, SCRATCH_COUNT, SCRATCH_THRESH, buffer_first + first + group_rows,
            slots, TOPK, KEY_BITS,
        )
        _write_kept(IDX, LSE, values, index, keep, position, kept, rows_g, bh, q_len, scale, TOPK)


@triton.jit
def _write_kept(IDX, LSE, values, index, keep, position, kept, rows, bh, q_len, scale, TOPK: tl.constexpr):
    """Store what `_select_group` kept for query ``rows``: key indices to IDX, log-sum-exp of the scaled scores
    (``values * scale``) to LSE."""
    values = values * scale
    # Rows with nothing to attend (kept 0) get lse = -inf and no kept entries: zeros, never NaN.
    row_max = tl.where(kept > 0, tl.max(tl.where(keep, values, float("-inf")), axis=1), 0.0)
    total = tl.sum(tl.where(keep, tl.exp(tl.where(keep, values, 0.0) - row_max[:, None]), 0.0), axis=1)
    lse = tl.where(kept > 0, row_max + tl.log(tl.where(kept > 0, total, 1.0)), float("-inf"))
    rows_ok = rows < q_len
    row_slots = (bh * q_len + rows).to(tl.int64)
    tl.store(LSE + row_slots, lse, mask=rows_ok)
    # Slots past a row's count keep the -1 the caller filled IDX with.
    tl.store(IDX + row_slots[:, None] * TOPK + position, index, mask=keep & rows_ok[:, None])


@triton.jit
def topk_forward_kernel(
    Q, K, PAD, IDX, LSE, SCRATCH_VAL, SCRATCH_IDX, SCRATCH_COUNT, SCRATCH_THRESH, PARAMS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pb, stride_pn,
    heads, group, q_len, k_len, row_blocks, num_tiles, causal_offset,
    TOPK: tl.constexpr, CAND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENT: tl.constexpr, GROUP: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, KEY_LENGTHS: tl.constexpr,
    KEY_BITS: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Selection: each row's kept key indices (IDX, (B*H*Lq, TOPK), -1 past the row's count) and the log-sum-exp
    of their scores (LSE). Grid (programs,), persistent over the B * H * row_blocks tiles. Each program owns
    BLOCK_M rows of the SCRATCH_* buffers (CAND >= TOPK + SEGMENT * BLOCK_N slots per row, a count and a
    threshold per row). PARAMS = [scale]
    in the score dtype (fp64 for fp64 inputs, else fp32), as are SCRATCH_VAL, SCRATCH_THRESH and LSE.

    The hot loop keeps only (BLOCK_M, BLOCK_N) tiles in registers; selection runs GROUP buffer rows at a time
    (one row per warp) so that it never holds a (BLOCK_M, CAND) tile.
    """
    SCORE_DTYPE = SCRATCH_VAL.dtype.element_ty
    scale = tl.load(PARAMS)
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        bh, row_block, b, rows, row_ok, q, k_base, key_end, seen = _open_tile(
            tile, Q, K, PAD, heads, group, q_len, k_len, row_blocks, causal_offset, dims, dim_ok,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_pb, BLOCK_M, CAUSAL, DOT_UPCAST,
            KEY_LENGTHS)
        _select_tile_buffered(q, k_base, PAD, IDX, LSE, SCRATCH_VAL, SCRATCH_IDX, SCRATCH_COUNT, SCRATCH_THRESH,
                              b, bh, rows, row_ok, pid * BLOCK_M, row_block * BLOCK_M, key_end, dims, dim_ok, scale,
                              q_len, seen, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                              TOPK, CAND, BLOCK_M, BLOCK_N, SEGMENT, GROUP, HAS_PAD, CAUSAL, KEY_BITS, IEEE,
                              DOT_UPCAST, SCORE_DTYPE)
        tl.debug_barrier()  # the buffer is reused by the next tile


@triton.jit
def _stack_counts(VAL, IDX_BUF, base, tile, count, DEPTH: tl.constexpr, SLICE: tl.constexpr,
                  KEY_BITS: tl.constexpr, TOPK: tl.constexpr):
    """Rank the entries of the (BLOCK_M, BLOCK_N) column stacks: the k-th largest key of every row, and the key
    index up to which entries tied with it are kept (lowest indices first). Everything is reduced along rows in
    the layout of the loaded slices, so no step crosses warps."""
    if KEY_BITS == 64:
        low = tl.full([count.shape[0]], -9223372036854775808, tl.int64)
        one = tl.full([count.shape[0]], 1, tl.int64)
    else:
        low = tl.full([count.shape[0]], -2147483648, tl.int32)
        one = tl.full([count.shape[0]], 1, tl.int32)
    held = tl.sum(count, axis=1)
    non_negative = tl.zeros([count.shape[0]], dtype=tl.int32)
    for d in range(0, DEPTH):
        valid = d < count
        values = tl.load(VAL + base + d * SLICE + tile, mask=valid, other=float("-inf"))
        non_negative += tl.sum((valid & (_order_keys(values, KEY_BITS) >= 0)).to(tl.int32), axis=1)
    answer = tl.where(non_negative >= TOPK, low * 0, low)
    for step in range(0, KEY_BITS - 1):
        candidate = answer | (one << (KEY_BITS - 2 - step))
        at_least = tl.zeros([count.shape[0]], dtype=tl.int32)
        for d in range(0, DEPTH):
            valid = d < count
            values = tl.load(VAL + base + d * SLICE + tile, mask=valid, other=float("-inf"))
            at_least += tl.sum((valid & (_order_keys(values, KEY_BITS) >= candidate[:, None])).to(tl.int32), axis=1)
        answer = tl.where(at_least >= TOPK, candidate, answer)
    above = tl.zeros([count.shape[0]], dtype=tl.int32)
    tied = tl.zeros([count.shape[0]], dtype=tl.int32)
    for d in range(0, DEPTH):
        valid = d < count
        keys = _order_keys(tl.load(VAL + base + d * SLICE + tile, mask=valid, other=float("-inf")), KEY_BITS)
        above += tl.sum((valid & (keys > answer[:, None])).to(tl.int32), axis=1)
        tied += tl.sum((valid & (keys == answer[:, None])).to(tl.int32), axis=1)
    full = held >= TOPK
    room = TOPK - above
    # Among entries tied at the k-th key keep the `room` lowest key indices: the room-th smallest index, bit by bit.
    index_cut = tl.full([count.shape[0]], 2147483647, tl.int32)
    if tl.max(tl.where(full, tied - room, 0), axis=0) > 0:
        cut = tl.zeros([count.shape[0]], dtype=tl.int32)
        for step in range(0, 31):
            candidate = cut + (tl.full([count.shape[0]], 1, tl.int32) << (30 - step))
            below = tl.zeros([count.shape[0]], dtype=tl.int32)
            for d in range(0, DEPTH):
                valid = d < count
                keys = _order_keys(tl.load(VAL + base + d * SLICE + tile, mask=valid, other=float("-inf")), KEY_BITS)
                index = tl.load(IDX_BUF + base + d * SLICE + tile, mask=valid, other=0)
                below += tl.sum((valid & (keys == answer[:, None]) & (index < candidate[:, None])).to(tl.int32),
                                axis=1)
            cut = tl.where(below < room, candidate, cut)
        index_cut = tl.where(tied > room, cut, index_cut)
    return answer, index_cut, full


@triton.jit
def _emit_from_stacks(BUF_VAL, BUF_IDX, IDX, LSE, base, tile, count, bh, q_len, rows, row_ok, scale,
                      DEPTH: tl.constexpr, SLICE: tl.constexpr, KEY_BITS: tl.constexpr, TOPK: tl.constexpr,
                      SCORE_DTYPE: tl.constexpr):
    """Final selection from the column stacks (``count`` entries each): the TOPK largest of every row, their key
    indices to IDX in (depth, lane) order and the log-sum-exp of their scores times ``scale`` to LSE."""
    tl.debug_barrier()
    kth, index_cut, full = _stack_counts(BUF_VAL, BUF_IDX, base, tile, count, DEPTH, SLICE,
                                         KEY_BITS, TOPK)
    row_max = tl.full([rows.shape[0]], float("-inf"), SCORE_DTYPE)
    for d in range(0, DEPTH):
        valid = d < count
        values = tl.load(BUF_VAL + base + d * SLICE + tile, mask=valid, other=float("-inf"))
        index = tl.load(BUF_IDX + base + d * SLICE + tile, mask=valid, other=0)
        keys = _order_keys(values, KEY_BITS)
        keep = valid & ((keys > kth[:, None]) | ((keys == kth[:, None]) & (index <= index_cut[:, None])))
        keep = tl.where(full[:, None], keep, valid)
        row_max = tl.maximum(row_max, tl.max(tl.where(keep, values * scale, float("-inf")), axis=1))
    kept = tl.zeros([rows.shape[0]], dtype=tl.int32)
    total = tl.zeros([rows.shape[0]], dtype=SCORE_DTYPE)
    safe_max = tl.where(row_max > float("-inf"), row_max, 0.0)
    row_slots = (bh * q_len + rows).to(tl.int64)
    for d in range(0, DEPTH):
        valid = d < count
        values = tl.load(BUF_VAL + base + d * SLICE + tile, mask=valid, other=float("-inf"))
        index = tl.load(BUF_IDX + base + d * SLICE + tile, mask=valid, other=0)
        keys = _order_keys(values, KEY_BITS)
        keep = valid & ((keys > kth[:, None]) | ((keys == kth[:, None]) & (index <= index_cut[:, None])))
        keep = tl.where(full[:, None], keep, valid)
        position = kept[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        kept += tl.sum(keep.to(tl.int32), axis=1)
        total += tl.sum(tl.where(keep, tl.exp(tl.where(keep, values * scale, 0.0) - safe_max[:, None]), 0.0),
                        axis=1)
        # Slots past a row's count keep the -1 the caller filled IDX with.
        tl.store(IDX + row_slots[:, None] * TOPK + position, index, mask=keep & row_ok[:, None])
    # Rows with nothing to attend (kept 0) get lse = -inf and no kept entries: zeros, never NaN.
    lse = tl.where(kept > 0, safe_max + tl.log(tl.where(kept > 0, total, 1.0)), float("-inf"))
    tl.store(LSE + row_slots, lse, mask=row_ok)


@triton.jit
def _stacks_prologue(PARAMS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
    """What a column-stack kernel needs before its tile loop: the scale, its program id, the head dimensions, the
    rows and lanes of a score tile, each entry's offset within a stack slice, and its own stacks' first slot."""
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, BLOCK_N)
    tile = local[:, None] * BLOCK_N + lanes[None, :]
    return tl.load(PARAMS), pid, dims, dims < HEAD_DIM, local, lanes, tile, pid * (DEPTH * BLOCK_M * BLOCK_N)


@triton.jit
def topk_forward_stacks_kernel(
    Q, K, PAD, IDX, LSE, BUF_VAL, BUF_IDX, PARAMS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pb, stride_pn,
    heads, group, q_len, k_len, row_blocks, num_tiles, causal_offset,
    TOPK: tl.constexpr, DEPTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENT: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, KEY_LENGTHS: tl.constexpr,
    KEY_BITS: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Selection, like `topk_forward_kernel`, with the candidate buffer laid out as column stacks.

    Score (r, c) of every key block can only go to stack (r, c) (DEPTH slots), at the stack's own depth, so an
    append is an elementwise store in the layout the scores come in: no prefix sum, no shared memory. After every
    SEGMENT blocks, if a stack might overflow, each row is cut to its TOPK largest entries (bisection over the
    loaded stack slices, reduced along rows only) and the kept entries are repacked evenly over the row's stacks.
    BUF_* hold DEPTH slices of (BLOCK_M, BLOCK_N) per program.
    """
    SCORE_DTYPE = BUF_VAL.dtype.element_ty
    SLICE: tl.constexpr = BLOCK_M * BLOCK_N
    scale, pid, dims, dim_ok, local, lanes, tile, base = _stacks_prologue(PARAMS, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                                         BLOCK_N, DEPTH)

    for tile_id in range(pid, num_tiles, tl.num_programs(0)):
        bh, row_block, b, rows, row_ok, q, k_base, key_end, seen = _open_tile(
            tile_id, Q, K, PAD, heads, group, q_len, k_len, row_blocks, causal_offset, dims, dim_ok,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_pb, BLOCK_M, CAUSAL, DOT_UPCAST,
            KEY_LENGTHS)
        count = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        threshold = tl.full([BLOCK_M], float("-inf"), SCORE_DTYPE)
        for segment in range(0, key_end, SEGMENT * BLOCK_N):
            for start in range(segment, tl.minimum(segment + SEGMENT * BLOCK_N, key_end), BLOCK_N):
                cols = start + lanes
                scores, take = _score_tile(q, k_base, PAD, b, rows, row_ok, cols, dims, dim_ok, threshold,
                                           seen, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                                           HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE)
                slot = base + count * SLICE + tile
                tl.store(BUF_VAL + slot, scores, mask=take)
                tl.store(BUF_IDX + slot, cols[None, :] + count * 0, mask=take)
                count += take.to(tl.int32)
            if tl.max(tl.max(count, axis=1), axis=0) > DEPTH - SEGMENT:
                tl.debug_barrier()  # appends by every thread are visible before the stacks are read
                kth, index_cut, full = _stack_counts(BUF_VAL, BUF_IDX, base, tile, count, DEPTH, SLICE,
                                                     KEY_BITS, TOPK)
                # Repack the kept entries, in (depth, lane) order, to flat positions p -> slice p // BLOCK_N,
                # lane p % BLOCK_N. A slice is only written once every thread has read it.
                packed = tl.zeros([BLOCK_M], dtype=tl.int32)
                for d in range(0, DEPTH):
                    valid = d < count
                    values = tl.load(BUF_VAL + base + d * SLICE + tile, mask=valid, other=float("-inf"))
                    index = tl.load(BUF_IDX + base + d * SLICE + tile, mask=valid, other=0)
                    keys = _order_keys(values, KEY_BITS)
                    keep = valid & ((keys > kth[:, None]) | ((keys == kth[:, None]) & (index <= index_cut[:, None])))
                    keep = tl.where(full[:, None], keep, valid)
                    position = packed[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
                    packed += tl.sum(keep.to(tl.int32), axis=1)
                    target = base + (position // BLOCK_N) * SLICE + local[:, None] * BLOCK_N + position % BLOCK_N
                    tl.debug_barrier()
                    tl.store(BUF_VAL + target, values, mask=keep)
                    tl.store(BUF_IDX + target, index, mask=keep)
                tl.debug_barrier()
                count = tl.maximum((packed[:, None] - lanes[None, :] + BLOCK_N - 1) // BLOCK_N, 0)
                threshold = tl.where(full, _key_to_value(kth, KEY_BITS), threshold).to(SCORE_DTYPE)

        # Final selection: the kept key indices, in (depth, lane) order, and the log-sum-exp of their scores.
        _emit_from_stacks(BUF_VAL, BUF_IDX, IDX, LSE, base, tile, count, bh, q_len, rows, row_ok, scale,
                          DEPTH, SLICE, KEY_BITS, TOPK, SCORE_DTYPE)
        tl.debug_barrier()  # the stacks are reused by the next tile


@triton.jit
def _append_above(VAL, IDX_BUF, tile, count, scores, bound, start, DEPTH: tl.constexpr, SLICE: tl.constexpr,
                  BLOCK_N: tl.constexpr, INLINE_PTX: tl.constexpr):
    """Append every score >= ``bound`` (per entry; +inf where a key must not be taken) to its column stack: entry
    (r, c) of the tile goes to ``VAL[min(count, DEPTH - 1) * SLICE + tile]`` with its key index ``start + c`` in
    IDX_BUF. Returns the new stack heights; past DEPTH an entry overwrites the last slot (the caller then appends
    again from a tighter bound, or redoes the tile). On CUDA (32-bit scores) each entry is inline PTX in the tensor-core layout the scores come in: a compare,
    a warp vote and a branch over the stores, which run only when an entry of the warp passes (a few in a thousand
    at long inputs). `tl.store` would instead compute every address and first move the whole tile to a store layout
    through shared memory (sm_90 SASS: `benchmarks/triton_sass.py`)."""
    if INLINE_PTX:
        count = tl.inline_asm_elementwise(
            # $0 new height, tied to $3 the height | $1 score, $2 bound (as 32-bit), $4 tile, $5 start, $6 VAL,
            # $7 IDX_BUF, $8 DEPTH - 1, $9 SLICE, $10 BLOCK_N - 1. An entry that fails the compare costs three
            # instructions (compare, warp vote, branch); a warp where one passes runs the stores, predicated.
            "{ .reg .pred p, any; .reg .b32 d, col; .reg .b64 at; "
            "setp.ge.f32 p, $1, $2; vote.sync.any.pred any, p, 0xffffffff; @!any bra.uni SKIP; "
            "min.s32 d, $0, $8; mad.lo.s32 d, d, $9, $4; mul.wide.s32 at, d, 4; "
            "add.s64 at, at, $6; @p st.global.b32 [at], $1; "
            "and.b32 col, $4, $10; add.s32 col, col, $5; mul.wide.s32 at, d, 4; "
            "add.s64 at, at, $7; @p st.global.b32 [at], col; @p add.s32 $0, $0, 1; SKIP: }",
            "=r,r,r,0,r,r,l,l,r,r,r",
            [scores.to(tl.int32, bitcast=True), bound.to(tl.int32, bitcast=True), count, tile, start,
             VAL.to(tl.int64, bitcast=True), IDX_BUF.to(tl.int64, bitcast=True), DEPTH - 1, SLICE, BLOCK_N - 1],
            dtype=tl.int32, is_pure=False, pack=1,
        )
    else:
        take = scores >= bound
        slot = tl.minimum(count, DEPTH - 1) * SLICE + tile
        tl.store(VAL + slot, scores, mask=take)
        tl.store(IDX_BUF + slot, start + tile % BLOCK_N, mask=take)
        count += take.to(tl.int32)
    return count


@triton.jit
def _row_lower_bound(q, k_base, PAD, b, rows, row_ok, key_end, dims, dim_ok, k_len, causal_offset,
                     stride_kn, stride_kd, stride_pb, stride_pn,
                     TOPK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                     KEY_BITS: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
                     SCORE_DTYPE: tl.constexpr):
    """A lower bound of every row's TOPK-th largest score, from one pass over QK^T that stores nothing.

    Keys fall into 2 * BLOCK_N disjoint groups (lane of the key block x parity of the block) and the pass keeps each
    group's maximum. TOPK groups whose maxima are >= t hold TOPK distinct scores >= t, so the TOPK-th largest group
    maximum never exceeds the TOPK-th largest score. With twice as many groups as TOPK (BLOCK_N >= TOPK) the bound
    is tight: about 1.4 TOPK scores per row reach it on Gaussian scores, against about 4.5 TOPK with TOPK groups.
    Rows with fewer than TOPK non-empty groups get -inf, rows past the queries +inf (nothing to append).
    """
    lanes = tl.arange(0, BLOCK_N)
    no_threshold = tl.zeros([rows.shape[0]], SCORE_DTYPE)  # not compared
    even = tl.full([rows.shape[0], BLOCK_N], float("-inf"), SCORE_DTYPE)
    odd = tl.full([rows.shape[0], BLOCK_N], float("-inf"), SCORE_DTYPE)
    # Whole pairs of blocks with every key visible need no mask: a running maximum per entry is the whole loop.
    unmasked_end = 0
    if not (HAS_PAD or CAUSAL):
        unmasked_end = key_end - key_end % (2 * BLOCK_N)
    for start in range(0, unmasked_end, 2 * BLOCK_N):
        even = tl.maximum(even, _block_scores(q, k_base, start + lanes, dims, dim_ok, k_len, stride_kn, stride_kd,
                                              IEEE, DOT_UPCAST, SCORE_DTYPE, False))
        odd = tl.maximum(odd, _block_scores(q, k_base, start + BLOCK_N + lanes, dims, dim_ok, k_len, stride_kn,
                                            stride_kd, IEEE, DOT_UPCAST, SCORE_DTYPE, False))
    for start in range(unmasked_end, key_end, 2 * BLOCK_N):
        scores, take = _score_tile(q, k_base, PAD, b, rows, row_ok, start + lanes, dims, dim_ok, no_threshold,
                                   k_len, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                                   HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE, False, False)
        even = tl.maximum(even, tl.where(take, scores, float("-inf")))  # keys past key_end: masked by take
        scores, take = _score_tile(q, k_base, PAD, b, rows, row_ok, start + BLOCK_N + lanes, dims, dim_ok,
                                   no_threshold, k_len, causal_offset, stride_kn, stride_kd, stride_pb,
                                   stride_pn, HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE, False, False)
        odd = tl.maximum(odd, tl.where(take, scores, float("-inf")))
    maxima = tl.reshape(tl.join(even, odd), (rows.shape[0], 2 * BLOCK_N))
    present = maxima > float("-inf")
    kth = _kth_largest_key(_order_keys(maxima, KEY_BITS), present, TOPK, KEY_BITS)
    enough = tl.sum(present.to(tl.int32), axis=1) >= TOPK
    bound = tl.where(enough, _key_to_value(kth, KEY_BITS), float("-inf"))
    return tl.where(row_ok, bound, float("inf")).to(SCORE_DTYPE)


@triton.jit
def _append_pass(q, k_base, PAD, BUF_VAL, BUF_IDX, b, rows, row_ok, threshold, tile, key_end, dims, dim_ok, k_len,
                 causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr, HAS_PAD: tl.constexpr,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, SCORE_DTYPE: tl.constexpr,
                 INLINE_PTX: tl.constexpr):
    """Pass 2 of the bound kernel: append every visible score >= its row's threshold to the column stacks at
    BUF_VAL / BUF_IDX (from depth 0); returns the stack heights. Unmasked over whole key blocks when there is no
    padding or causal mask, masked over the rest; rows past the queries have threshold +inf."""
    SLICE: tl.constexpr = BLOCK_M * BLOCK_N
    lanes = tl.arange(0, BLOCK_N)
    count = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    row_bound = tl.broadcast_to(threshold[:, None], (BLOCK_M, BLOCK_N))
    unmasked_end = 0
    if not (HAS_PAD or CAUSAL):
        unmasked_end = key_end - key_end % BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        scores = _block_scores(q, k_base, start + lanes, dims, dim_ok, k_len, stride_kn, stride_kd, IEEE,
                               DOT_UPCAST, SCORE_DTYPE, False)
        count = _append_above(BUF_VAL, BUF_IDX, tile, count, scores, row_bound, start, DEPTH, SLICE, BLOCK_N,
                              INLINE_PTX)
    for start in range(unmasked_end, key_end, BLOCK_N):
        scores, visible = _score_tile(q, k_base, PAD, b, rows, row_ok, start + lanes, dims, dim_ok, threshold,
                                      k_len, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                                      HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE, False, False, False)
        count = _append_above(BUF_VAL, BUF_IDX, tile, count, scores, tl.where(visible, row_bound, float("inf")),
                              start, DEPTH, SLICE, BLOCK_N, INLINE_PTX)
    return count


@triton.jit
def _emit_compacted(BUF_VAL, BUF_IDX, COUNTS, SMALL_VAL, SMALL_IDX, SMALL_COUNT, SMALL_THRESH, IDX, LSE,
                    base, count, pid, bh, q_len, row_first, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr, CAND_C: tl.constexpr,
                    GROUP: tl.constexpr, TOPK: tl.constexpr, KEY_BITS: tl.constexpr, WRITE: tl.constexpr = True):
    """Final selection of the bound kernel, GROUP rows at a time: each row's stack entries (a few times TOPK of its
    DEPTH * BLOCK_N slots; the first DEPTH of a stack that overflowed) are packed into CAND_C slots (the caller
    checked they fit) and `_select_group` ranks them there, so the bisection runs over CAND_C slots instead of all
    DEPTH * BLOCK_N. It leaves each row's TOPK-th largest entry (-inf below TOPK entries) in SMALL_THRESH; with
    WRITE the kept indices and log-sum-exp go to IDX and LSE."""
    SLICE: tl.constexpr = BLOCK_M * BLOCK_N
    local = tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, BLOCK_N)
    counts_base = pid * SLICE
    tl.store(COUNTS + counts_base + local[:, None] * BLOCK_N + lanes[None, :], count)
    tl.debug_barrier()  # counts and stack entries of every thread are visible to the group loads
    group_rows = tl.arange(0, GROUP)
    slots = tl.arange(0, DEPTH * BLOCK_N)
    small = tl.arange(0, CAND_C)
    lane = slots % BLOCK_N
    depth = slots // BLOCK_N
    for first in range(0, BLOCK_M, GROUP):
        r = first + group_rows
        held = tl.load(COUNTS + counts_base + r[:, None] * BLOCK_N + lane[None, :])
        valid = depth[None, :] < held
        offsets = base + depth[None, :] * SLICE + r[:, None] * BLOCK_N + lane[None, :]
        values = tl.load(BUF_VAL + offsets, mask=valid, other=float("-inf"))
        index = tl.load(BUF_IDX + offsets, mask=valid, other=0)
        position = tl.cumsum(valid.to(tl.int32), axis=1) - 1
        small_rows = pid * BLOCK_M + r
        target = small_rows[:, None] * CAND_C + position
        tl.store(SMALL_VAL + target, values, mask=valid)
        tl.store(SMALL_IDX + target, index, mask=valid)
        tl.store(SMALL_COUNT + small_rows, tl.sum(valid.to(tl.int32), axis=1))
        tl.debug_barrier()
        # packed in (depth, lane) order, not key order: ties at the k-th value are resolved by key index
        values, index, keep, position, kept = _select_group(SMALL_VAL, SMALL_IDX, SMALL_COUNT, SMALL_THRESH,
                                                            small_rows, small, TOPK, KEY_BITS, False)
        if WRITE:
            _write_kept(IDX, LSE, values, index, keep, position, kept, row_first + r, bh, q_len, scale, TOPK)


@triton.jit
def topk_forward_bound_kernel(
    Q, K, PAD, IDX, LSE, BUF_VAL, BUF_IDX, SCRATCH_COUNT, SCRATCH_THRESH, COUNTS, SMALL_VAL, SMALL_IDX, PARAMS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_pb, stride_pn,
    heads, group, q_len, k_len, row_blocks, num_tiles, causal_offset,
    TOPK: tl.constexpr, DEPTH: tl.constexpr, CAND_C: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENT: tl.constexpr, GROUP: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, KEY_LENGTHS: tl.constexpr,
    KEY_BITS: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, INLINE_PTX: tl.constexpr,
):
    """Selection, like `topk_forward_kernel`, in two passes over QK^T per tile so that the hot loop never cuts.

    Pass 1 (`_row_lower_bound`) finds a threshold at or below each row's TOPK-th score. Pass 2 appends the scores
    >= threshold to column stacks of DEPTH slots (`_append_above`: elementwise in the score layout, no prefix sum;
    both passes run unmasked over whole key blocks when there is no padding or causal mask, and masked over the
    rest) and `_emit_compacted` ranks the few candidates left (CAND_C slots per row in SMALL_*; COUNTS holds the
    (BLOCK_M, BLOCK_N) stack heights of each program). When a stack overflows (5-8% of the tiles on Gaussian scores
    at DEPTH 8, `benchmarks/bound_simulation.py`), pass 2 runs again from the TOPK-th largest score the
    stacks kept, a tighter bound. A tile that still overflows, or with a row of more than CAND_C candidates (many
    equal scores, keys masked into few groups), is redone through the candidate buffer (`_select_tile_buffered`,
    the stacks' memory viewed as DEPTH * BLOCK_N slots per row): exact either way.
    """
    SCORE_DTYPE = BUF_VAL.dtype.element_ty
    SLICE: tl.constexpr = BLOCK_M * BLOCK_N
    CAND: tl.constexpr = DEPTH * BLOCK_N
    scale, pid, dims, dim_ok, local, lanes, tile, base = _stacks_prologue(PARAMS, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                                         BLOCK_N, DEPTH)

    for tile_id in range(pid, num_tiles, tl.num_programs(0)):
        bh, row_block, b, rows, row_ok, q, k_base, key_end, seen = _open_tile(
            tile_id, Q, K, PAD, heads, group, q_len, k_len, row_blocks, causal_offset, dims, dim_ok,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_pb, BLOCK_M, CAUSAL, DOT_UPCAST,
            KEY_LENGTHS)
        threshold = _row_lower_bound(q, k_base, PAD, b, rows, row_ok, key_end, dims, dim_ok, seen,
                                     causal_offset, stride_kn, stride_kd, stride_pb, stride_pn, TOPK, BLOCK_N,
                                     HAS_PAD, CAUSAL, KEY_BITS, IEEE, DOT_UPCAST, SCORE_DTYPE)
        count = _append_pass(q, k_base, PAD, BUF_VAL + base, BUF_IDX + base, b, rows, row_ok, threshold, tile,
                             key_end, dims, dim_ok, seen, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                             BLOCK_M, BLOCK_N, DEPTH, HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE, INLINE_PTX)
        stored = tl.max(tl.sum(tl.minimum(count, DEPTH), axis=1), axis=0)
        if (tl.max(tl.max(count, axis=1), axis=0) > DEPTH) & (stored <= CAND_C):
            # A stack overflowed. What the stacks kept is a subset of each row's scores, so its TOPK-th largest is
            # still at or below the row's TOPK-th score, and much closer to it than the pass-1 bound: append again
            # from there (about TOPK entries per row), which overflows only where one lane holds many of the kept.
            _emit_compacted(BUF_VAL, BUF_IDX, COUNTS, SMALL_VAL, SMALL_IDX, SCRATCH_COUNT, SCRATCH_THRESH, IDX,
                            LSE, base, count, pid, bh, q_len, row_block * BLOCK_M, scale, BLOCK_M, BLOCK_N, DEPTH,
                            CAND_C, GROUP, TOPK, KEY_BITS, False)
            tl.debug_barrier()  # every row's threshold is written and every stack read before the stacks refill
            threshold = tl.where(row_ok, tl.load(SCRATCH_THRESH + pid * BLOCK_M + local), float("inf"))
            count = _append_pass(q, k_base, PAD, BUF_VAL + base, BUF_IDX + base, b, rows, row_ok, threshold, tile,
                                 key_end, dims, dim_ok, seen, causal_offset, stride_kn, stride_kd, stride_pb,
                                 stride_pn, BLOCK_M, BLOCK_N, DEPTH, HAS_PAD, CAUSAL, IEEE, DOT_UPCAST, SCORE_DTYPE,
                                 INLINE_PTX)
        deepest = tl.max(tl.max(count, axis=1), axis=0)
        most = tl.max(tl.sum(count, axis=1), axis=0)
        if (deepest <= DEPTH) & (most <= CAND_C):
            _emit_compacted(BUF_VAL, BUF_IDX, COUNTS, SMALL_VAL, SMALL_IDX, SCRATCH_COUNT, SCRATCH_THRESH, IDX, LSE,
                            base, count, pid, bh, q_len, row_block * BLOCK_M, scale, BLOCK_M, BLOCK_N, DEPTH,
                            CAND_C, GROUP, TOPK, KEY_BITS)
        else:
            tl.debug_barrier()  # every stack entry is written before the buffer path reuses the memory
            _select_tile_buffered(q, k_base, PAD, IDX, LSE, BUF_VAL, BUF_IDX, SCRATCH_COUNT, SCRATCH_THRESH,
                                  b, bh, rows, row_ok, pid * BLOCK_M, row_block * BLOCK_M, key_end, dims, dim_ok,
                                  scale, q_len, seen, causal_offset, stride_kn, stride_kd, stride_pb, stride_pn,
                                  TOPK, CAND, BLOCK_M, BLOCK_N, SEGMENT, GROUP, HAS_PAD, CAUSAL, KEY_BITS, IEEE,
                                  DOT_UPCAST, SCORE_DTYPE)
        tl.debug_barrier()  # the stacks are reused by the next tile


@triton.jit(do_not_specialize=["seed"])
def topk_output_kernel(
    Q, K, V, IDX, LSE, OUT, PARAMS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads, group, q_len, seed,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
):
    """out = sum_j w_j v[idx_j] with w_j = exp(q . k[idx_j] * scale - lse), dropout applied: the probabilities are
    recomputed from the kept indices rather than stored. Grid (query row blocks, batch x heads)."""
    ACC = LSE.dtype.element_ty
    scale = tl.load(PARAMS)
    dropout_p = tl.load(PARAMS + 1)
    row_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    kv = h // group
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < q_len
    slots = tl.arange(0, TOPK_P2)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row_slots = (bh * q_len + rows).to(tl.int64)
    index = tl.load(IDX + row_slots[:, None] * TOPK + slots[None, :],
                    mask=row_ok[:, None] & (slots < TOPK)[None, :], other=-1)
    present = index >= 0
    safe_index = tl.where(present, index, 0)
    gather = present[:, :, None] & dim_ok[None, None, :]
    lse = tl.load(LSE + row_slots, mask=row_ok, other=0.0)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(ACC)
    keys = tl.load(K + b * stride_kb + kv * stride_kh + safe_index[:, :, None] * stride_kn
                   + dims[None, None, :] * stride_kd, mask=gather, other=0.0).to(ACC)
    weight = tl.where(present, tl.exp(tl.sum(q[:, None, :] * keys, axis=2) * scale - lse[:, None]), 0.0)
    if DROPOUT:
        kept = tl.rand(seed + bh, rows[:, None] * TOPK + slots[None, :]) >= dropout_p
        weight = tl.where(kept, weight / (1.0 - dropout_p), 0.0)
    values = tl.load(V + b * stride_vb + kv * stride_vh + safe_index[:, :, None] * stride_vn
                     + dims[None, None, :] * stride_vd, mask=gather, other=0.0).to(ACC)
    out = tl.sum(weight[:, :, None] * values, axis=1)
    tl.store(OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def topk_backward_kernel(
    Q, K, V, DO, IDX, LSE, DQ, DK, DV, DS, W, PARAMS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    heads, launch_heads, head_offset, group, q_len, seed,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Grid (query row blocks, batch x launch_heads). The launch covers query heads head_offset ...
    head_offset + launch_heads - 1; DK/DV (fp32 accumulators, ATOMIC) hold only their kv heads, the first one
    being head_offset // group. Without ATOMIC, dS and the dropout-scaled probabilities go to DS/W (B, H, Lq, TOPK)
    for a deterministic reduction by the caller. LSE and PARAMS = [scale, dropout_p] have the compute dtype."""
    ACC = LSE.dtype.element_ty
    scale = tl.load(PARAMS)
    dropout_p = tl.load(PARAMS + 1)
    row_block = tl.program_id(0)
    b = tl.program_id(1) // launch_heads
    h = tl.program_id(1) % launch_heads + head_offset
    kv = h // group
    kv_local = kv - head_offset // group
    bh = b * heads + h

    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < q_len
    slots = tl.arange(0, TOPK_P2)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    row_slots = (bh * q_len + rows).to(tl.int64)

    index = tl.load(IDX + row_slots[:, None] * TOPK + slots[None, :],
                    mask=row_ok[:, None] & (slots < TOPK)[None, :], other=-1)
    present = index >= 0
    lse = tl.load(LSE + row_slots, mask=row_ok, other=0.0).to(ACC)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(ACC)
    grad_out = tl.load(
        DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + dims[None, :] * stride_dod,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    ).to(ACC)
    gather = present[:, :, None] & dim_ok[None, None, :]
    safe_index = tl.where(present, index, 0)
    keys = tl.load(K + b * stride_kb + kv * stride_kh + safe_index[:, :, None] * stride_kn
                   + dims[None, None, :] * stride_kd, mask=gather, other=0.0).to(ACC)
    values = tl.load(V + b * stride_vb + kv * stride_vh + safe_index[:, :, None] * stride_vn
                     + dims[None, None, :] * stride_vd, mask=gather, other=0.0).to(ACC)

    prob = tl.where(present, tl.exp(tl.sum(q[:, None, :] * keys, axis=2) * scale - lse[:, None]), 0.0)
    grad_prob = tl.sum(grad_out[:, None, :] * values, axis=2)
    weight = prob
    if DROPOUT:
        kept = tl.rand(seed + bh, rows[:, None] * TOPK + slots[None, :]) >= dropout_p
        grad_prob = tl.where(kept, grad_prob / (1.0 - dropout_p), 0.0)
        weight = tl.where(kept, prob / (1.0 - dropout_p), 0.0)
    grad_score = prob * (grad_prob - tl.sum(prob * grad_prob, axis=1)[:, None])

    grad_q = tl.sum(grad_score[:, :, None] * keys, axis=1) * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + dims[None, :] * stride_dqd,
             grad_q.to(DQ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if ATOMIC:
        target = (b * stride_dkb + kv_local * stride_dkh + safe_index[:, :, None] * stride_dkn
                  + dims[None, None, :] * stride_dkd)
        tl.atomic_add(DK + target, (grad_score * scale)[:, :, None] * q[:, None, :], mask=gather, sem="relaxed")
        tl.atomic_add(DV + target, weight[:, :, None] * grad_out[:, None, :], mask=gather, sem="relaxed")
    else:
        entry = row_slots[:, None] * TOPK + slots[None, :]
        tl.store(DS + entry, grad_score, mask=present)
        tl.store(W + entry, weight, mask=present)
