"""The sparse GEMV's Triton kernels: y = (x ⊙ 1[|x| > t]) Wᵀ + b for 1 to 8 rows, W stored column-major.

Only the jitted code lives here; the launchers, which pick a config and hold the scratch, are in ``sparse_gemv.py``
(docs/design.md, "Sparse GEMV" says why each choice was made). The loops with x rounded to int8 are in
``x_int8_triton.py``, the int8 / int4 to float conversions in ``int_weights_triton.py``.

Layout: with W column-major (strides (1, N)), input k's weights are one contiguous row of N values, so a zero x[k]
skips one contiguous stretch of memory. The kernel takes W's strides, so a row-major W also works (slowly). int8 and
packed int4 weights (``WFMT``; kernels/quantize.py) keep that layout; their sums are scaled, never their tiles.

Split-K without a memset: the grid is (N tiles) x (K splits) of short programs. Each adds its fp32 partial into a
workspace with atomics; then either the last program of an N tile to arrive (an arrival counter) reads the sums
back, zeroes the workspace and writes y, or, where launches overlap (PDL), a second tiny launch does that
(``finish_kernel``; ``finish_add_rmsnorm_kernel`` also adds the residual and applies the RMSNorm after o and down).
Either way every launch leaves the workspace and counters zero.
"""
import triton
import triton.language as tl

from teal_fx.kernels.int_weights_triton import (
    INT4_OFFSET,
    INT8_OFFSET,
    int4_as_fp32,
    int4_as_halves,
    int4_as_subnormal_halves,
    int8_as_fp16,
    int8_as_fp32,
    int8_as_subnormal_halves,
    swap_middle_of_fours,
)
from teal_fx.kernels.x_int8_triton import w4a8_partial, w8a8_partial


@triton.jit
def load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N: tl.constexpr):
    """The [BK, BN] weight tile with the rows no input needs left unread (zero)."""
    if EVEN_N:  # the mask must be constant along N for 16-byte loads: no N bound check when tiles divide N
        mask = need[:, None]
    else:
        mask = need[:, None] & n_ok[None, :]
    return tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask, other=0.0,
                   eviction_policy="evict_first")

@triton.jit
def store_survivors(idx_ptr, offs_c, keep_c):
    """Store the inputs ``offs_c`` whose ``keep_c`` is set to idx_ptr[0, n), in order (a prefix sum gives each its
    slot); return (each input's slot, n)."""
    pos = tl.cumsum(keep_c.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + pos, offs_c, mask=keep_c)
    return pos, tl.sum(keep_c.to(tl.int32), axis=0)


@triton.jit
def pack_survivors(x_ptr, idx_ptr, offs_m, m_ok, stride_xm, k_lo, k_hi, threshold, M, CHUNK: tl.constexpr):
    """Store the inputs of [k_lo, k_hi) whose mean |x| over the M rows is above t to idx_ptr[0, n) and return n
    (one row: its own mask). Every program of a K split writes the same values to its slot."""
    offs_c = k_lo + tl.arange(0, CHUNK)
    xc = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :],
                 mask=m_ok[:, None] & (offs_c < k_hi)[None, :], other=0.0).to(tl.float32)
    keep_c = tl.sum(tl.abs(xc), axis=0) / M > threshold  # padded rows and inputs past k_hi add 0 (t >= 0)
    _, n_keep = store_survivors(idx_ptr, offs_c, keep_c)
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier
    return n_keep


@triton.jit
def pack_survivor_columns(x_ptr, idx_ptr, xv_ptr, offs_m, m_ok, stride_xm, k_lo, k_hi, K_PER_SPLIT, threshold, M,
                          BM: tl.constexpr, CHUNK: tl.constexpr, EVEN_K: tl.constexpr):
    """As ``pack_survivors``, and the survivors' x columns too: column j (all BM rows, padded rows zero) at
    xv_ptr[j * BM, + BM), zeros from n to CHUNK. Each column is one contiguous 32-byte run (bf16, 16 rows), so the
    stores are whole sectors, and the tensor-core loop reads [BK, BM] blocks of it by address (cp.async)."""
    offs_c = k_lo + tl.arange(0, CHUNK)
    if EVEN_K:  # k_hi - k_lo is K_PER_SPLIT: a bound the compiler sees in 16s, so the loads stay 16 bytes wide
        k_ok = tl.arange(0, CHUNK) < K_PER_SPLIT
    else:
        k_ok = offs_c < k_hi
    xt = tl.load(x_ptr + offs_c[:, None] + offs_m[None, :] * stride_xm, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
    keep_c = tl.sum(tl.abs(xt.to(tl.float32)), axis=1) / M > threshold  # padded rows / inputs add 0 (t >= 0)
    pos, n_keep = store_survivors(idx_ptr, offs_c, keep_c)
    tl.store(xv_ptr + pos[:, None] * BM + offs_m[None, :], xt.to(xv_ptr.dtype.element_ty), mask=keep_c[:, None])
    slots = tl.arange(0, CHUNK)  # the slots past n_keep (disjoint from the survivors' slots): zeros
    tl.store(xv_ptr + slots[:, None] * BM + offs_m[None, :], tl.zeros_like(xt).to(xv_ptr.dtype.element_ty),
             mask=(slots >= n_keep)[:, None])
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier
    return n_keep


@triton.jit
def gather_survivors(idx_ptr, j, n_keep, x_ptr, offs_m, m_ok, stride_xm, w_ptr, offs_c, c_ok, stride_wk, stride_wn,
                     EVEN_N: tl.constexpr):
    """The x columns [BM, BK] and the stored weight rows [BK, columns at ``offs_c``] of packed survivors ``j`` (those
    at or past ``n_keep``: zero, unread)."""
    ok = j < n_keep
    k = tl.load(idx_ptr + j, mask=ok, other=0)
    xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & ok[None, :], other=0.0)
    return xs, load_needed_rows(w_ptr, k, offs_c, ok, c_ok, stride_wk, stride_wn, EVEN_N)


@triton.jit
def int4_dots(xs, p, acc_lo, acc_hi, IEEE: tl.constexpr, UPCAST: tl.constexpr, ASM: tl.constexpr):
    """acc_lo += xs @ (low nibbles - 8), acc_hi += xs @ (high nibbles - 8): operands in x's type (fp32: fp16 tiles
    widened, full-precision dots; the interpreter's bf16: fp32)."""
    BF16: tl.constexpr = xs.dtype == tl.bfloat16
    lo, hi = int4_as_halves(p, BF16, ASM)
    if IEEE or UPCAST:
        xf = xs.to(tl.float32)
        acc_lo = tl.dot(xf, lo.to(tl.float32), acc_lo, input_precision="ieee")
        acc_hi = tl.dot(xf, hi.to(tl.float32), acc_hi, input_precision="ieee")
    else:
        acc_lo = tl.dot(xs, lo, acc_lo)
        acc_hi = tl.dot(xs, hi, acc_hi)
    return acc_lo, acc_hi


@triton.jit
def int4_dot_partial(x_ptr, w_ptr, idx_ptr, k_lo, k_hi, threshold, offs_m, m_ok, stride_xm, offs_p, p_ok, stride_wk,
                     stride_wn, M, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr,
                     EVEN_N: tl.constexpr, COMPACT: tl.constexpr, SHARED: tl.constexpr, IEEE: tl.constexpr,
                     UPCAST: tl.constexpr, ASM: tl.constexpr):
    """[BM, BN] sums over packed int4 weights on tensor cores, not yet scaled (the launcher keeps a program's inputs
    in one scale group). The low and high nibbles (even and odd columns) are two dots of BN / 2 columns, joined once
    after the loop: an interleaved weight tile fed to one dot came out doubled on the H200 (docs/perf-log.md v22).
    COMPACT: over the packed survivors (one row or a shared mask), the next tile requested before this one's dots;
    else every input, a row read where some row needs it."""
    acc_lo = tl.zeros((BM, BN // 2), dtype=tl.float32)
    acc_hi = tl.zeros((BM, BN // 2), dtype=tl.float32)
    if COMPACT:
        n_keep = pack_survivors(x_ptr, idx_ptr, offs_m, m_ok, stride_xm, k_lo, k_hi, threshold, M, CHUNK)
        xs, p = gather_survivors(idx_ptr, tl.arange(0, BK), n_keep, x_ptr, offs_m, m_ok, stride_xm, w_ptr, offs_p, p_ok,
                                 stride_wk, stride_wn, EVEN_N)
        for j0 in range(0, n_keep, BK):
            xs_n, p_n = gather_survivors(idx_ptr, j0 + BK + tl.arange(0, BK), n_keep, x_ptr, offs_m, m_ok, stride_xm,
                                         w_ptr, offs_p, p_ok, stride_wk, stride_wn, EVEN_N)
            acc_lo, acc_hi = int4_dots(xs, p, acc_lo, acc_hi, IEEE, UPCAST, ASM)
            xs, p = xs_n, p_n
    else:
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0)
            if SHARED:
                need = tl.sum(tl.abs(x.to(tl.float32)), axis=0) / M > threshold
                keep = need[None, :] & m_ok[:, None]
            else:
                keep = tl.abs(x.to(tl.float32)) > threshold
                need = tl.max(keep.to(tl.int32), axis=0) > 0
            p = load_needed_rows(w_ptr, offs_k, offs_p, need, p_ok, stride_wk, stride_wn, EVEN_N)
            acc_lo, acc_hi = int4_dots(tl.where(keep, x, 0.0), p, acc_lo, acc_hi, IEEE, UPCAST, ASM)
    return tl.interleave(acc_lo, acc_hi)


@triton.jit
def load_weight_tile(w_ptr, offs_k, offs_n, offs_p, need, n_ok, p_ok, stride_wk, stride_wn, EVEN_N: tl.constexpr,
                     WFMT: tl.constexpr, ASM: tl.constexpr):
    """The [BK, BN] tile of W in its stored values, rows no input needs left unread: float W as stored; int8 q and
    int4 q - 8 as fp32 (the int4 bytes at ``offs_p``, low nibble: even column, high: odd). Scales are not applied
    here: the callers scale sums (kernels/quantize.py). An unread int4 row comes out as -8, harmless because every
    caller zeroes x where no row is read."""
    if WFMT == 2:  # (one return: Triton types every return of a function, constexpr branches or not)
        w = int4_as_fp32(load_needed_rows(w_ptr, offs_k, offs_p, need, p_ok, stride_wk, stride_wn, EVEN_N), ASM)
    elif WFMT == 1:
        w = int8_as_fp32(load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N), ASM)
    else:
        w = load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N)
    return w


@triton.jit
def half_scaled(x, TOP: tl.constexpr = 129):
    """x [BK] (fp32 holding bf16/fp16 values) times 2^s in fp16, 2^s putting max|x| in [4, 8), and 2^-s. A tile's fp16
    sum of up to 32 products with int8 (|q| <= 128) stays below 32 x 128 x 8 = 32768, inside fp16's range, and bf16
    values keep every mantissa bit (those below 2^-14 of the largest lose some). 2^s from the exponent bits. TOP 141:
    max|x| in [2^14, 2^15) instead (int4's subnormal nibbles, < 2^-20 x 16: their products stay normal halves)."""
    e = (tl.max(tl.abs(x), axis=0).to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent of max|x| (0: all zero)
    s = tl.minimum(tl.maximum(TOP - e, -100), 100)  # max|x| in [2^(e-127), 2^(e-126)) -> [4, 8) (TOP 129)
    scale = ((s + 127) << 23).to(tl.float32, bitcast=True)
    unscale = ((127 - s) << 23).to(tl.float32, bitcast=True)
    return (x * scale).to(tl.float16), unscale


@triton.jit
def tile_sum(x, q, WFMT: tl.constexpr, WMATH: tl.constexpr, ASM: tl.constexpr):
    """Σ_k x[k] q[k, :] over one tile of stored weights (float, or int8 / packed int4 values, unscaled), x fp32 with
    dropped inputs 0.

    WMATH 0: each weight converted exactly (permute, subtract), fp32 products. 1: the permute alone leaves q plus a
    constant c (``INT8_OFFSET``, ``INT4_OFFSET``), and c Σx is subtracted once per tile: one float operation a weight
    fewer, at the cost of rounding sums c / |q| times larger (int8 ~3e-4 of a tile's sum, int4 ~2e-3; perf-log v28).
    2: fp16 products and sums (paired HFMA2, half the float instructions), x scaled per tile by a power of two into
    fp16's range (``half_scaled``); a tile's sum rounds at fp16's 2^-11. 4: as 2 over the unsigned values (int4's
    nibbles 0..15, int8's q + 128) as subnormal halves, masked out of their bytes (no permutes, no offset subtraction:
    8 Σx or 128 Σx is subtracted per tile in fp32); the unsigned sums round ~3-4x coarser than 2's (perf-log v43)."""
    if WMATH == 1:
        if WFMT == 2:
            s = tl.sum(x[:, None] * int4_as_fp32(q, ASM, True), axis=0) - INT4_OFFSET * tl.sum(x, axis=0)
        else:
            s = tl.sum(x[:, None] * int8_as_fp32(q, ASM, True), axis=0) - INT8_OFFSET * tl.sum(x, axis=0)
    elif WMATH == 2:
        xs, unscale = half_scaled(x)
        if WFMT == 2:
            lo, hi = int4_as_halves(q, False, ASM)
            s = tl.interleave(tl.sum(xs[:, None] * lo, axis=0).to(tl.float32),
                              tl.sum(xs[:, None] * hi, axis=0).to(tl.float32)) * unscale
        else:
            s = tl.sum(xs[:, None] * int8_as_fp16(q, ASM), axis=0).to(tl.float32) * unscale
    elif WMATH == 4 and WFMT == 2:  # int4: the nibbles n as subnormal halves, x times 2^s into [2^14, 2^15)
        xs, unscale = half_scaled(x, 141)  # (the products normal halves)
        lo, hi = int4_as_subnormal_halves(q, ASM)
        x8 = 8.0 * tl.sum(x, axis=0)  # Σ x (n - 8) = Σ x n - 8 Σ x
        s = tl.interleave(
            swap_middle_of_fours(tl.sum(xs[:, None] * lo, axis=0).to(tl.float32) * (unscale * 16777216.0) - x8),
            swap_middle_of_fours(tl.sum(xs[:, None] * hi, axis=0).to(tl.float32) * (unscale * 1048576.0) - x8))
    elif WMATH == 4:  # int8: q + 128 as subnormal halves, the same scaling (a tile of 32 sums below 2^4)
        xs, unscale = half_scaled(x, 141)
        w = int8_as_subnormal_halves(q, ASM)
        s = swap_middle_of_fours(tl.sum(xs[:, None] * w, axis=0).to(tl.float32) * (unscale * 16777216.0)
                                 - 128.0 * tl.sum(x, axis=0))
    elif WFMT == 2:
        s = tl.sum(x[:, None] * int4_as_fp32(q, ASM), axis=0)
    elif WFMT == 1:
        s = tl.sum(x[:, None] * int8_as_fp32(q, ASM), axis=0)
    else:
        s = tl.sum(x[:, None] * q.to(tl.float32), axis=0)
    return s


@triton.jit
def group_scales(s_ptr, k0, offs_n, n_ok, stride_sg, GROUP: tl.constexpr):
    """int4: the [BN] scales of the group holding inputs [k0, k0 + BK) (BK divides GROUP: one group per tile)."""
    return tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)

@triton.jit
def silu_times_up(gate, up, out_ty: tl.constexpr):
    """silu(gate) * up from the fp32 sums, rounded to ``out_ty`` after each op as eager ``F.silu(gate) * up`` is."""
    gate = gate.to(out_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    return act * up.to(out_ty).to(tl.float32)

@triton.jit
def store_swiglu_x(g_ptr, u_ptr, stride_gm, x_ptr, stride_xm, offs_m, m_ok, k_lo, k_hi, CHUNK: tl.constexpr):
    """x[:, k_lo:k_hi] = silu(gate) * up from the fp32 sums a gate/up launch left in the workspace (``X_SWIGLU``):
    what its finishing launch would have written, rounded as it rounds. Every program of a K split writes the same
    values and reads back only its own split, after the barrier, so no program waits on another."""
    offs_k = k_lo + tl.arange(0, CHUNK)
    mask = m_ok[:, None] & (offs_k < k_hi)[None, :]
    offs = offs_m[:, None] * stride_gm + offs_k[None, :]
    # .cg: the sums were added at L2 by the launch before; both requested before either is used
    gate = tl.load(g_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    up = tl.load(u_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    x = silu_times_up(gate, up, x_ptr.dtype.element_ty)
    tl.store(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], x.to(x_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier

@triton.jit
def merge_weights(m_tot, m_s):
    """Folding a split's softmax state (max ``m_s``, base 2) into the running one (max ``m_tot``): the new max and
    the weights of the old sums and of the split's. The decode attention's merge and ``store_merged_x`` both take
    them from here and apply them alike (sum · w_old + split's · w_s), so the two give the same bits."""
    m_new = tl.maximum(m_tot, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m_tot - m_safe), tl.exp2(m_s - m_safe)

@triton.jit
def store_merged_x(acc_ptr, ml_ptr, x_ptr, stride_xm, offs_m, m_ok, k_lo, k_hi, HKV, NSPLIT: tl.constexpr,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CHUNK: tl.constexpr):
    """x[:, k_lo:k_hi] = the decode attention's output, merged here from the softmax states its NSPLIT splits left
    (``decode_attention_kernel`` with MERGE off: acc [slot, GP, DP], ml [slot, 2, GP], slot (row · HKV + KV head) ·
    NSPLIT + split), input k being head k // D's column k % D, as o reads the heads side by side. Rounded as the
    attention's own merge rounds; every program of a K split writes the same values and reads back only its own
    split, after the barrier (as ``store_swiglu_x``)."""
    offs_k = k_lo + tl.arange(0, CHUNK)
    mask = m_ok[:, None] & (offs_k < k_hi)[None, :]
    head = offs_k // D
    g = head % G
    slot = (offs_m[:, None] * HKV + (head // G)[None, :]) * NSPLIT
    acc_offs = slot * (GP * DP) + (g * DP + offs_k % D)[None, :]
    ml_offs = slot * (2 * GP) + g[None, :]
    m_tot = tl.full((offs_m.shape[0], CHUNK), float("-inf"), tl.float32)
    l_tot = tl.zeros((offs_m.shape[0], CHUNK), tl.float32)
    out = tl.zeros((offs_m.shape[0], CHUNK), tl.float32)
    for s in range(0, NSPLIT):
        # .cg: written by the attention launch before this one
        m_s = tl.load(ml_ptr + ml_offs + s * 2 * GP, mask=mask, other=0.0, cache_modifier=".cg")
        l_s = tl.load(ml_ptr + ml_offs + s * 2 * GP + GP, mask=mask, other=0.0, cache_modifier=".cg")
        a_s = tl.load(acc_ptr + acc_offs + s * GP * DP, mask=mask, other=0.0, cache_modifier=".cg")
        m_tot, w_old, w_s = merge_weights(m_tot, m_s)
        l_tot = l_tot * w_old + l_s * w_s
        out = out * w_old + a_s * w_s
    x = out / tl.where(mask, l_tot, 1.0)
    tl.store(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], x.to(x_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier

@triton.jit
def packed_sum(x_ptr, w_ptr, idx_ptr, xv_ptr, k_lo, k_hi, threshold, offs_n, n_ok, stride_wk, stride_wn,
               BK: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr, offs_p, p_ok,
               WFMT: tl.constexpr, ASM: tl.constexpr, WMATH: tl.constexpr):
    """Σ_k x_k W[k, offs_n] over the survivors of [k_lo, k_hi) (at most CHUNK inputs, one row), unscaled: they are
    packed into the slot at idx_ptr / xv_ptr first, then summed a tile of BK stored rows at a time."""
    acc = tl.zeros((BN,), dtype=tl.float32)
    offs = k_lo + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
    keep = tl.abs(x) > threshold
    slot, n_keep = store_survivors(idx_ptr, offs, keep)
    tl.store(xv_ptr + slot, x, mask=keep)
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier
    # one tile in flight, the next tile's indices requested before this tile's FMAs: keeping two tiles' rows in
    # flight (requested a tile ahead) ran int8 gate/up at 50% in 60-75 µs instead of 16 (docs/perf-log.md v26)
    j = tl.arange(0, BK)
    ok = j < n_keep
    k = tl.load(idx_ptr + j, mask=ok, other=0)
    xv = tl.load(xv_ptr + j, mask=ok, other=0.0)
    for j0 in range(0, n_keep, BK):
        if WMATH == 2 or WMATH == 4:  # the stored rows, summed as the masked loop's fp16 tiles (``tile_sum``)
            w = load_needed_rows(w_ptr, k, offs_p if WFMT == 2 else offs_n, ok, p_ok if WFMT == 2 else n_ok,
                                 stride_wk, stride_wn, EVEN_N)
        else:
            w = load_weight_tile(w_ptr, k, offs_n, offs_p, ok, n_ok, p_ok, stride_wk, stride_wn, EVEN_N, WFMT, ASM)
        jn = j0 + BK + tl.arange(0, BK)
        ok_next = jn < n_keep
        if WMATH == 2 or WMATH == 4:  # whole tiles of the slot, unmasked: 16-byte loads where masked ones came one
            # entry at a time (~150 instructions a tile fewer, SASS). Entries past n_keep (the next slot's, or the
            # launcher's BK of padding) are never used: their rows are unread and their x is selected away below
            k_next = tl.load(idx_ptr + jn)
            xv_next = tl.load(xv_ptr + jn)
        else:
            k_next = tl.load(idx_ptr + jn, mask=ok_next, other=0)
            xv_next = tl.load(xv_ptr + jn, mask=ok_next, other=0.0)
        if WMATH == 2 or WMATH == 4:
            acc += tile_sum(tl.where(ok, xv, 0.0), w, WFMT, WMATH, ASM)
        else:
            acc += tl.sum(xv[:, None] * w.to(tl.float32), axis=0)
        k, xv, ok = k_next, xv_next, ok_next
    return acc

@triton.jit
def in_thread_partial(x_ptr, w_ptr, idx_ptr, xv_ptr, k_lo, k_hi, threshold, offs_n, n_ok, stride_wk, stride_wn,
                       BK: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr,
                       PACK: tl.constexpr, offs_p, p_ok, s_ptr, stride_sg, WFMT: tl.constexpr, GROUP: tl.constexpr,
                       ASM: tl.constexpr, WMATH: tl.constexpr):
    """Σ_k x_k W[k, offs_n] over the inputs of [k_lo, k_hi) that survive the threshold (one row of x).

    With BN = 256 * num_warps every thread holds whole columns of a [BK, BN] tile (8 columns x BK rows), so the
    sum over the tile's rows stays inside the thread: the accumulator is 8 registers and the rest can hold a
    whole tile's loads in flight (the [BK, BN] accumulator of the other loop leaves ptxas room for half a tile).

    PACK: the survivors' indices and values are packed first (a prefix sum over the chunk, stored to a scratch
    slot that every program of this K split and segment shares: they all write the same values), then the loop
    runs over full tiles of needed weight rows only: at 90% a tenth of the iterations, where a loop over all
    rows pays a memory round trip per tile however few rows it keeps (docs/design.md, "Sparse GEMV: tiles and loops"). Without PACK the loop
    walks every input and masks the rows not needed. WFMT 2 (int4) scales each tile's sum by its group's scales,
    or, packed, each group's sum (a program's inputs lie in one group, or are whole groups packed in turn). Packed,
    WMATH 2 (and 4) sums each tile of survivors in fp16 as the masked loop does (``tile_sum``), on the stored rows;
    else exactly in fp32.
    """
    acc = tl.zeros((BN,), dtype=tl.float32)
    if PACK:
        if WFMT == 2 and CHUNK > GROUP:
            # int4 over whole scale groups: each group packed into its own part of the slot (the other programs of
            # this K split write the same values there, whichever group they are at), summed, then scaled
            for g0 in range(k_lo, k_hi, GROUP):
                part = packed_sum(x_ptr, w_ptr, idx_ptr + (g0 - k_lo), xv_ptr + (g0 - k_lo), g0,
                                  tl.minimum(g0 + GROUP, k_hi), threshold, offs_n, n_ok, stride_wk, stride_wn, BK,
                                  BN, GROUP, EVEN_N, offs_p, p_ok, WFMT, ASM, WMATH)
                acc += part * group_scales(s_ptr, g0, offs_n, n_ok, stride_sg, GROUP)
        else:
            acc = packed_sum(x_ptr, w_ptr, idx_ptr, xv_ptr, k_lo, k_hi, threshold, offs_n, n_ok, stride_wk,
                             stride_wn, BK, BN, CHUNK, EVEN_N, offs_p, p_ok, WFMT, ASM, WMATH)
            if WFMT == 2:  # int4: the program's inputs lie in one scale group
                acc = acc * group_scales(s_ptr, k_lo, offs_n, n_ok, stride_sg, GROUP)
    else:
        offs_k = k_lo + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            keep = tl.abs(x) > threshold  # x past k_hi is 0: never kept (t >= 0)
            stored = load_needed_rows(w_ptr, offs_k, offs_p if WFMT == 2 else offs_n, keep, p_ok if WFMT == 2 else n_ok,
                                      stride_wk, stride_wn, EVEN_N)
            nxt = offs_k + BK
            x_next = tl.load(x_ptr + nxt, mask=nxt < k_hi, other=0.0).to(tl.float32)
            part = tile_sum(tl.where(keep, x, 0.0), stored, WFMT, WMATH, ASM)
            if WFMT == 2:
                part = part * group_scales(s_ptr, k0, offs_n, n_ok, stride_sg, GROUP)
            acc += part
            x = x_next
    return acc

@triton.jit
def in_thread_rows_partial(x_ptr, w_ptr, k_lo, k_hi, threshold, offs_m, m_ok, stride_xm, offs_n, n_ok,
                            stride_wk, stride_wn, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                            EVEN_N: tl.constexpr, offs_p, p_ok, s_ptr, stride_sg, WFMT: tl.constexpr,
                            GROUP: tl.constexpr, M, SHARED: tl.constexpr, ASM: tl.constexpr):
    """[BM, BN] partial sums for 2-8 rows in the in-thread layout: each row keeps its own mask, a weight row is
    read when some row needs it, and the [BM, BK] x [BK, BN] product is summed over K inside each thread (CUDA
    cores; the tensor-core path pads the rows to 16 and stages the tiles through shared memory)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = k_lo + tl.arange(0, BK)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0).to(tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        if SHARED:  # one mask for all rows: the rows' mean |x| against t (padded rows add 0)
            need = tl.sum(tl.abs(x), axis=0) / M > threshold
            keep = need[None, :] & m_ok[:, None]
        else:
            keep = tl.abs(x) > threshold  # padded rows and inputs past k_hi are 0: never kept (t >= 0)
            need = tl.max(keep.to(tl.int32), axis=0) > 0
        w = load_weight_tile(w_ptr, offs_k, offs_n, offs_p, need, n_ok, p_ok, stride_wk, stride_wn, EVEN_N, WFMT, ASM)
        nxt = offs_k + BK
        x_next = tl.load(x_ptr + offs_m[:, None] * stride_xm + nxt[None, :],
                         mask=m_ok[:, None] & (nxt < k_hi)[None, :], other=0.0).to(tl.float32)
        xs = tl.where(keep, x, 0.0)
        part = tl.sum(xs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        if WFMT == 2:
            part = part * group_scales(s_ptr, k0, offs_n, n_ok, stride_sg, GROUP)[None, :]
        acc += part
        x = x_next
    return acc

# A grouped launch swaps scalars per segment inside a runtime `if`; both branches must have the same type, so
# a swapped value may never be 1 (Triton turns an argument equal to 1 into a compile-time constant). The
# launcher groups only column-major weights (stride_wn == 1 in every segment, so it is never swapped) with
# N >= 16. Never disable specialisation of the strides: the "divisible by 16" hint on stride_wk is what
# makes the weight loads 16 bytes wide (without it the kernel ran 6x slower; docs/design.md, "Sparse GEMV: layout and split-K").
@triton.jit
def sparse_gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, xv_ptr,
    M, N, K, threshold,
    stride_xm, stride_wn, stride_wk, stride_ym,
    K_PER_SPLIT,
    SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, IN_THREAD: tl.constexpr, COMPACT: tl.constexpr,
    CHUNK: tl.constexpr,
    # segments 1 and 2 (a grouped launch: linears sharing the input x, each with its own weight, bias,
    # output and threshold; N tiles [0, TILES1) are segment 0, [TILES1, TILES2) segment 1, the rest segment 2)
    w1_ptr=None, b1_ptr=None, y1_ptr=None, N1=0, threshold1=0.0, stride_wk1=0, stride_ym1=0,
    w2_ptr=None, b2_ptr=None, y2_ptr=None, N2=0, threshold2=0.0, stride_wk2=0, stride_ym2=0,
    TILES1=0, TILES2=0, N_TOTAL=0, NSEG: tl.constexpr = 1,
    # SwiGLU epilogue (two segments, gate then up, of equal N, no bias): the last program to arrive at column
    # tile j of either segment writes silu(gate) * up for it, rounded as eager rounds (after each op)
    GATED: tl.constexpr = False,
    # programmatic dependent launch (kernels/pdl.py): wait for the previous kernel before reading x or the
    # workspace; let the next kernel launch once the main loop's loads are issued
    PDL: tl.constexpr = False,
    # split-K sums finished by a second launch (``finish_kernel``) instead of this grid's last arriver
    APART: tl.constexpr = False,
    # weight format (kernels/quantize.py): 0 float as x; 1 int8 with scales [N] applied to the sums; 2 int4 packed
    # two outputs a byte, w_ptr [N / 2, K] column-major, scales [ceil(K / GROUP), N] (row stride stride_sg)
    # applied to each tile's sums (BK divides GROUP). Segments swap s_ptr / stride_sg as they swap w_ptr.
    WFMT: tl.constexpr = 0, GROUP: tl.constexpr = 128, s_ptr=None, stride_sg=0,
    # int8 on tensor cores with fp16 operands: the weights converted by bit pattern two to a register, x rounded to
    # fp16 (a candidate for one row, swept by examples/bench_kernels.py --sweep-weights; not chosen by default)
    HALF_DOT: tl.constexpr = False,
    # a plan's batch_mask="shared": the rows drop the inputs whose mean |x| over the rows is <= t, all together (one
    # row: the same as its own mask). Several rows take the tensor-core or the in-thread rows loop.
    SHARED: tl.constexpr = False,
    s1_ptr=None, stride_sg1=0, s2_ptr=None, stride_sg2=0,
    # inline PTX allowed (an NVIDIA GPU; not the CPU interpreter): the int8 -> fp16 byte permutes of HALF_DOT
    ASM: tl.constexpr = False,
    # how the one-row masked in-thread loop sums int8/int4 tiles (``tile_sum``): 0 exact fp32, 1 fp32 with the
    # conversion's offset subtracted per tile, 2 fp16 products and sums (also in the packed loop); 3 (int8, W8A8) x
    # quantized to int8 per 32 inputs, int32 products (``w8a8_partial``); 4 as 2 over unsigned subnormal halves
    WMATH: tl.constexpr = 0,
    # x is silu(gate) * up of the gate/up launch before this one, formed here from the sums it left in the
    # workspace (g_ptr / u_ptr [M, K], rows stride_gm) and stored to x_ptr for this program's split
    # (``store_swiglu_x``): the SwiGLU finishing launch folded into this one (``sparse_gemv_mlp_add_rmsnorm``)
    X_SWIGLU: tl.constexpr = False, g_ptr=None, u_ptr=None, stride_gm=0,
    # x is the output of the decode attention launch before this one, merged here from the softmax states of its
    # cache splits (acc_ptr / ml_ptr; HKV KV heads of G query heads of D columns, padded to GP / DP) and stored to
    # x_ptr for this program's split (``store_merged_x``): the attention's merge folded into o's launch
    X_MERGE: tl.constexpr = False, acc_ptr=None, ml_ptr=None, HKV=1, NSPLIT: tl.constexpr = 1, G: tl.constexpr = 1,
    GP: tl.constexpr = 1, D: tl.constexpr = 1, DP: tl.constexpr = 1,
):
    """Program (N tile, K split) of y = (x ⊙ 1[|x| > t]) Wᵀ + b; segments 1 and 2 as segment 0, other pointers.

    x_ptr [M, K] (rows stride_xm, inputs contiguous); w_ptr [N, K] at (stride_wn, stride_wk), column-major for
    speed; b_ptr [N] (read when HAS_BIAS); y_ptr [M, N] (rows stride_ym). ws_ptr: fp32 split-K sums, one row of
    ws_width columns per padded row of x; cnt_ptr: one arrival counter per N tile; idx_ptr / xv_ptr: the packed
    survivors' indices and values (COMPACT), one CHUNK slot per (segment, K split): fp32 values for one row on CUDA
    cores, BM x CHUNK of x's dtype on tensor cores. All scratch is zero, or written before read, between launches.
    M rows (at most BM), N outputs, K inputs; threshold t >= 0 (so zero padding is never kept). A program covers
    inputs [pid(1) * K_PER_SPLIT, + K_PER_SPLIT), SPLIT_K of them along K, in tiles of BK inputs by BN outputs.
    Loops: USE_DOT (tensor cores, rows padded to BM >= 16; with COMPACT, the packed survivors of one mask for all
    rows, a shared mask's or one row's, gathered into tiles; int4: two nibble dots, ``int4_dot_partial``),
    IN_THREAD (a tile's sum stays in each thread; with COMPACT over the packed survivors only, one row), else
    [BK, BN] FMAs reduced after the loop (one row).
    IEEE: fp32 dots in full precision; UPCAST: the CPU interpreter's bf16 dots, computed in fp32; EVEN_N / EVEN_K:
    the tiles divide N / K (no bounds masks).
    """
    if PDL:
        tl.extra.cuda.gdc_wait()
    pn_all = tl.program_id(0)
    pk = tl.program_id(1)
    pn = pn_all
    col0 = pn_all * 0  # this segment's first column in the shared workspace
    seg = pn_all * 0
    ws_width = N
    if NSEG > 1:
        ws_width = N_TOTAL
        if pn_all >= TILES1:
            if NSEG > 2 and pn_all >= TILES2:
                pn = pn_all - TILES2
                col0 = TILES2 * BN
                seg = 2
                w_ptr, b_ptr, y_ptr, N, threshold = w2_ptr, b2_ptr, y2_ptr, N2, threshold2
                stride_wk, stride_ym = stride_wk2, stride_ym2
                if WFMT != 0:
                    s_ptr, stride_sg = s2_ptr, stride_sg2
            else:
                pn = pn_all - TILES1
                col0 = TILES1 * BN
                seg = 1
                w_ptr, b_ptr, y_ptr, N, threshold = w1_ptr, b1_ptr, y1_ptr, N1, threshold1
                stride_wk, stride_ym = stride_wk1, stride_ym1
                if WFMT != 0:
                    s_ptr, stride_sg = s1_ptr, stride_sg1
    offs_n = pn * BN + tl.arange(0, BN)
    offs_p = pn * (BN // 2) + tl.arange(0, BN // 2)  # int4: the packed bytes of this tile's columns
    p_ok = offs_p < N // 2
    offs_m = tl.arange(0, BM)
    n_ok = offs_n < N
    m_ok = offs_m < M
    k_lo = pk * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if X_SWIGLU:
        store_swiglu_x(g_ptr, u_ptr, stride_gm, x_ptr, stride_xm, offs_m, m_ok, k_lo, k_hi, CHUNK)
    if X_MERGE:
        store_merged_x(acc_ptr, ml_ptr, x_ptr, stride_xm, offs_m, m_ok, k_lo, k_hi, HKV, NSPLIT, G, GP, D, DP, CHUNK)
    if USE_DOT and WFMT == 2:
        acc = int4_dot_partial(x_ptr, w_ptr, idx_ptr + (seg * SPLIT_K + pk) * CHUNK, k_lo, k_hi, threshold, offs_m,
                               m_ok, stride_xm, offs_p, p_ok, stride_wk, stride_wn, M, BM, BN, BK, CHUNK, EVEN_N,
                               COMPACT, SHARED, IEEE, UPCAST, ASM)
        acc = acc * group_scales(s_ptr, k_lo, offs_n, n_ok, stride_sg, GROUP)[None, :]
    elif USE_DOT and COMPACT:
        # one list of needed inputs for every row (a shared mask, or one row): pack this split's survivors and their
        # x columns once, then run the tensor cores over tiles of them, so the weight rows copied fall with the
        # sparsity (the masked loop below copies every row, zeros for the dropped ones)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        slot = (seg * SPLIT_K + pk) * CHUNK
        xslot = xv_ptr + slot * BM
        n_keep = pack_survivor_columns(x_ptr, idx_ptr + slot, xslot, offs_m, m_ok, stride_xm, k_lo, k_hi,
                                       K_PER_SPLIT, threshold, M, BM, CHUNK, EVEN_K)
        # the next tile's indices are requested a tile ahead and the packed x columns are read by address, so no
        # load waits on one before it in the iteration: the software pipeliner copies both operands to shared
        # memory stages ahead (cp.async). Only kept weight rows are copied: the masked loop below zero-fills the
        # dropped ones through the same L1 / shared-memory path, which bounds it (docs/perf-log.md v29); this loop
        # is the shared-mask rule on the MLP shapes (v30)
        ok = tl.arange(0, BK) < n_keep
        k = tl.load(idx_ptr + slot + tl.arange(0, BK), mask=ok, other=0)
        for j0 in range(0, n_keep, BK):
            jn = j0 + BK + tl.arange(0, BK)
            ok_n = jn < n_keep
            k_n = tl.load(idx_ptr + slot + jn, mask=ok_n, other=0)
            xs = tl.trans(tl.load(xslot + (j0 + tl.arange(0, BK))[:, None] * BM + offs_m[None, :]))
            w = load_needed_rows(w_ptr, k, offs_n, ok, n_ok, stride_wk, stride_wn, EVEN_N)
            if HALF_DOT:  # int8 rows as fp16, x in fp16 (tensor-core operands of one type)
                if UPCAST:
                    acc = tl.dot(xs.to(tl.float16).to(tl.float32), int8_as_fp16(w, ASM).to(tl.float32), acc,
                                 input_precision="ieee")
                else:
                    acc = tl.dot(xs.to(tl.float16), int8_as_fp16(w, ASM), acc)
            else:
                wf = w
                if WFMT == 1:
                    wf = int8_as_fp32(w, ASM)
                    if not UPCAST:
                        wf = wf.to(x_ptr.dtype.element_ty)  # int8 values: exact in fp16/bf16
                if UPCAST:
                    acc = tl.dot(xs.to(tl.float32), wf.to(tl.float32), acc, input_precision="ieee")
                elif IEEE:
                    acc = tl.dot(xs, wf, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xs, wf, acc)
            k, ok = k_n, ok_n
    elif USE_DOT:
        # rows padded to BM >= 16: a skinny matmul on tensor cores, weight rows masked by "any row needs it".
        # x is requested a tile ahead of the mask it sets, so the weight rows' copies (cp.async, software
        # pipelined) never wait on it (docs/perf-log.md v29)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        offs_k = k_lo + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            nxt = offs_k + BK
            x_next = tl.load(x_ptr + offs_m[:, None] * stride_xm + nxt[None, :],
                             mask=m_ok[:, None] & (nxt < k_hi)[None, :], other=0.0)
            if SHARED:  # one mask for all rows: the rows' mean |x| against t (padded rows add 0)
                need = tl.sum(tl.abs(x.to(tl.float32)), axis=0) / M > threshold
                keep = need[None, :] & m_ok[:, None]
            else:
                keep = tl.abs(x.to(tl.float32)) > threshold
                need = tl.max(keep.to(tl.int32), axis=0) > 0
            xs = tl.where(keep, x, 0.0)
            if HALF_DOT:  # int8 through the fp16 bit pattern (0x6400 | (q + 128) is 1024 + q + 128, exactly), x in fp16
                w16 = int8_as_fp16(load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N),
                                   ASM)
                if UPCAST:  # the CPU interpreter's dots, in fp32
                    acc = tl.dot(xs.to(tl.float16).to(tl.float32), w16.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xs.to(tl.float16), w16, acc)
            else:
                w = load_weight_tile(w_ptr, offs_k, offs_n, offs_p, need, n_ok, p_ok, stride_wk, stride_wn, EVEN_N, WFMT, ASM)
                if WFMT != 0 and not UPCAST:  # (UPCAST, the interpreter's bf16 dots, takes the fp32 tile)
                    w = w.to(x_ptr.dtype.element_ty)  # int8 values: exact in fp16/bf16 (int4 takes int4_dot_partial)
                if UPCAST:  # the CPU interpreter mis-computes bf16 dots; the GPU never takes this branch
                    acc = tl.dot(xs.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                elif IEEE:
                    acc = tl.dot(xs, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xs, w, acc)
            x = x_next
    elif IN_THREAD and BM > 1:
        acc = in_thread_rows_partial(x_ptr, w_ptr, k_lo, k_hi, threshold, offs_m, m_ok, stride_xm, offs_n, n_ok,
                                      stride_wk, stride_wn, BM, BK, BN, EVEN_N, offs_p, p_ok, s_ptr, stride_sg,
                                      WFMT, GROUP, M, SHARED, ASM)
    elif IN_THREAD and WMATH == 3:  # W8A8 / W4A8: x's int8 words and tile scales in this split's scratch slot
        slot = (seg * SPLIT_K + pk) * CHUNK
        if WFMT == 2:
            acc = tl.reshape(w4a8_partial(x_ptr, w_ptr, idx_ptr + slot, xv_ptr + slot, k_lo, k_hi, threshold, offs_n,
                                          offs_p, p_ok, stride_wk, stride_wn, s_ptr, stride_sg, BK, BN, CHUNK, EVEN_N,
                                          GROUP, N, ASM), (1, BN))
        else:
            acc = tl.reshape(w8a8_partial(x_ptr, w_ptr, idx_ptr + slot, xv_ptr + slot, k_lo, k_hi, threshold, offs_n,
                                          n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, ASM), (1, BN))
    elif IN_THREAD:
        slot = (seg * SPLIT_K + pk) * CHUNK
        acc = tl.reshape(in_thread_partial(x_ptr, w_ptr, idx_ptr + slot, xv_ptr + slot, k_lo, k_hi, threshold,
                                            offs_n, n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, COMPACT,
                                            offs_p, p_ok, s_ptr, stride_sg, WFMT, GROUP, ASM, WMATH),
                         (1, BN))
    else:
        # one row: FMAs into a [BK, BN] accumulator, a single reduction over K after the loop; the next chunk
        # of x is requested before this chunk's weights are used
        acc2 = tl.zeros((BK, BN), dtype=tl.float32)
        offs_k = k_lo + tl.arange(0, BK)
        if EVEN_K:
            x = tl.load(x_ptr + offs_k).to(tl.float32)
        else:
            x = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            keep = tl.abs(x) > threshold
            w = load_weight_tile(w_ptr, offs_k, offs_n, offs_p, keep, n_ok, p_ok, stride_wk, stride_wn, EVEN_N, WFMT, ASM)
            nxt = offs_k + BK
            x_next = tl.load(x_ptr + nxt, mask=nxt < k_hi, other=0.0).to(tl.float32)
            wf = w.to(tl.float32)
            if WFMT == 2:
                wf = wf * group_scales(s_ptr, k0, offs_n, n_ok, stride_sg, GROUP)[None, :]
            acc2 += tl.where(keep, x, 0.0)[:, None] * wf
            x = x_next
        acc = tl.reshape(tl.sum(acc2, axis=0), (1, BN))

    if WFMT == 1:  # int8: one scale per output channel, applied once to the sums
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if PDL and not USE_DOT:  # the tensor-core path ran 1.5 µs slower at 8 rows with the next grid resident early
        tl.extra.cuda.gdc_launch_dependents()
    y_offs = offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1 and not GATED and not APART:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # partials meet in an fp32 workspace (zero between launches); the last program of this N tile to
        # arrive reads it back (an atomic read, at L2 where the partials landed), zeroes it for the next
        # launch, adds the bias and writes y.
        ws_offs = offs_m[:, None] * ws_width + col0 + offs_n[None, :]
        tl.atomic_add(ws_ptr + ws_offs, acc, mask=y_mask, sem="relaxed")
        # APART: _finish_kernel, launched next, reads the sums back once this grid has completed
        if not APART:
            tl.debug_barrier()
            if GATED:  # one counter per column tile, shared by the gate and up programs of that tile
                counter = cnt_ptr + pn
                arrivals = 2 * SPLIT_K
            else:
                counter = cnt_ptr + pn_all
                arrivals = SPLIT_K
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == arrivals - 1:
                zero = tl.zeros((BM, BN), dtype=tl.float32)
                if GATED:
                    out_ty = y_ptr.dtype.element_ty
                    g_offs = offs_m[:, None] * ws_width + offs_n[None, :]
                    u_offs = g_offs + TILES1 * BN
                    gate = tl.atomic_add(ws_ptr + g_offs, zero, mask=y_mask, sem="relaxed")
                    tl.store(ws_ptr + g_offs, zero, mask=y_mask)
                    up = tl.atomic_add(ws_ptr + u_offs, zero, mask=y_mask, sem="relaxed")
                    tl.store(ws_ptr + u_offs, zero, mask=y_mask)
                    total = silu_times_up(gate, up, out_ty)
                else:
                    total = tl.atomic_add(ws_ptr + ws_offs, zero, mask=y_mask, sem="relaxed")
                    tl.store(ws_ptr + ws_offs, zero, mask=y_mask)
                    if HAS_BIAS:
                        total += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
                tl.atomic_xchg(counter, 0)

@triton.jit
def finish_kernel(
    ws_ptr, y_ptr, b_ptr, M, N, ws_width, stride_ym,
    y1_ptr=None, b1_ptr=None, N1=0, stride_ym1=0, y2_ptr=None, b2_ptr=None, N2=0, stride_ym2=0,
    TILES1=0, TILES2=0, NSEG: tl.constexpr = 1,
    BM: tl.constexpr = 1, BN: tl.constexpr = 256, HAS_BIAS: tl.constexpr = False, GATED: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """The split-K epilogue as its own launch (``APART``): one program per column tile of the workspace reads
    the sums, zeroes them for the next launch, adds the bias (or forms silu(gate) * up) and writes y.

    Stream order (or, with PDL, ``gdc_wait``) guarantees that the partials of the GEMV grid before it have all
    landed, which the in-kernel protocol has to establish itself: a fence, an arrival counter and a read-back
    per N tile, about 1 µs more per launch on the H100 (docs/design.md, "Launch boundaries")."""
    pn_all = tl.program_id(0)
    pn = pn_all
    col0 = pn_all * 0
    if NSEG > 1 and not GATED:
        if pn_all >= TILES1:
            if NSEG > 2 and pn_all >= TILES2:
                pn = pn_all - TILES2
                col0 = TILES2 * BN
                y_ptr, b_ptr, N, stride_ym = y2_ptr, b2_ptr, N2, stride_ym2
            else:
                pn = pn_all - TILES1
                col0 = TILES1 * BN
                y_ptr, b_ptr, N, stride_ym = y1_ptr, b1_ptr, N1, stride_ym1
    offs_n = pn * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws_offs = offs_m[:, None] * ws_width + col0 + offs_n[None, :]
    zero = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_BIAS and not GATED:
        # an input of the op, complete before its GEMV grid passed its wait: read before this launch's (pdl.py)
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0, cache_modifier=".cg").to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    total = tl.load(ws_ptr + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
    if GATED:  # gate in the first TILES1 tiles, up in the next TILES1, as the GEMV grid lays them out
        # both sums requested before either is zeroed: a load after a store to the same buffer would wait for
        # the first round trip
        up = tl.load(ws_ptr + ws_offs + TILES1 * BN, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(ws_ptr + ws_offs, zero, mask=mask)
        tl.store(ws_ptr + ws_offs + TILES1 * BN, zero, mask=mask)
        total = silu_times_up(total, up, y_ptr.dtype.element_ty)
    else:
        tl.store(ws_ptr + ws_offs, zero, mask=mask)
        if HAS_BIAS:
            total += bias[None, :]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], total.to(y_ptr.dtype.element_ty), mask=mask)

@triton.jit
def finish_add_rmsnorm_kernel(ws_ptr, b_ptr, res_ptr, nw_ptr, h_ptr, out_ptr, N, ws_width, stride_res, stride_h,
                               stride_out, eps, BN: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                               M=1, z_ptr=None, Z_N=0, ZERO: tl.constexpr = False):
    """The split-K epilogue of a linear followed by a residual add and an RMSNorm (Llama's), one program per row
    holding all N columns: y = sums (+ bias), h = residual + y, out = norm_weight * (h * rsqrt(mean(h²) + eps)).

    Rounds where eager rounds (``LlamaRMSNorm`` in the model's dtype): y and h to the output dtype, the norm in
    fp32, its result to the dtype before the weight's product. Replaces the Inductor reduction kernel that
    otherwise runs after every o and down projection (docs/design.md, "Grouped launches and fusions").

    ZERO: programs M and on zero z_ptr[0, Z_N) a BN at a time, the sums of a gate/up launch that the GEMV grid
    before this one read as its x (``X_SWIGLU``): once that grid has completed, nothing reads them."""
    if ZERO:
        if tl.program_id(0) >= M:
            if PDL:
                tl.extra.cuda.gdc_wait()
            offs_z = (tl.program_id(0) - M) * BN + tl.arange(0, BN)
            tl.store(z_ptr + offs_z, tl.zeros((BN,), dtype=tl.float32), mask=offs_z < Z_N)
        else:
            add_rmsnorm_row(ws_ptr, b_ptr, res_ptr, nw_ptr, h_ptr, out_ptr, N, ws_width, stride_res, stride_h,
                            stride_out, eps, BN, HAS_BIAS, PDL)
    else:
        add_rmsnorm_row(ws_ptr, b_ptr, res_ptr, nw_ptr, h_ptr, out_ptr, N, ws_width, stride_res, stride_h,
                        stride_out, eps, BN, HAS_BIAS, PDL)


@triton.jit
def add_rmsnorm_row(ws_ptr, b_ptr, res_ptr, nw_ptr, h_ptr, out_ptr, N, ws_width, stride_res, stride_h, stride_out,
                    eps, BN: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    """Row ``program_id(0)`` of ``finish_add_rmsnorm_kernel``."""
    row = tl.program_id(0)
    offs = tl.arange(0, BN)
    ok = offs < N
    out_ty = h_ptr.dtype.element_ty
    # the op's inputs (residual, norm weight, bias) were written before its GEMV grid waited, so they are
    # complete when this launch starts (``pdl.py``): requested before the wait, off the critical path
    res = tl.load(res_ptr + row * stride_res + offs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    nw = tl.load(nw_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    ws = ws_ptr + row * ws_width + offs
    y = tl.load(ws, mask=ok, other=0.0, cache_modifier=".cg")
    # every warp has read its sums before any zeroes them: the store's layout need not be the load's, so another
    # warp may own an element's store (without the barrier, 4 warps lost some sums on the H100)
    tl.debug_barrier()
    tl.store(ws, tl.zeros((BN,), dtype=tl.float32), mask=ok)
    if HAS_BIAS:
        y += bias
    h = (res + y.to(out_ty).to(tl.float32)).to(out_ty)
    hf = h.to(tl.float32)  # 0 past N
    r = 1.0 / tl.sqrt_rn(tl.sum(hf * hf, axis=0) / N + eps)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
    tl.store(out_ptr + row * stride_out + offs, (nw * (hf * r).to(out_ty).to(tl.float32)).to(out_ty), mask=ok)


@triton.jit
def normed_rotated(y, y_rot, sign, cos, sin, nw, nw_rot, eps, D: tl.constexpr, out_ty: tl.constexpr,
                   HAS_NORM: tl.constexpr):
    """Rows of one head's values y [R, D] (y_rot: the same at columns (d + D/2) mod D; both in ``out_ty``),
    normalised (HAS_NORM: Qwen3's per-head RMSNorm, weights nw / nw_rot [D]) and rotated (``y * cos +
    rotate_half(y) * sin``, ``sign`` -1 on the first half), rounded where eager rounds (``reference_qkv_rope_``)."""
    if HAS_NORM:  # w * (y.float() * rsqrt(mean(y²) + eps)).to(dtype), the head's statistic for both halves
        yf = y.to(tl.float32)
        r = 1.0 / tl.sqrt_rn(tl.sum(yf * yf, axis=1) / D + eps)
        y = (nw[None, :] * (yf * r[:, None]).to(out_ty).to(tl.float32)).to(out_ty)
        y_rot = (nw_rot[None, :] * (y_rot.to(tl.float32) * r[:, None]).to(out_ty).to(tl.float32)).to(out_ty)
    rot = y_rot.to(tl.float32) * sign[None, :]
    return ((y.to(tl.float32) * cos).to(out_ty).to(tl.float32) + (rot * sin).to(out_ty).to(tl.float32)).to(out_ty)


@triton.jit
def finish_qkv_rope_kernel(ws_ptr, bq_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, qn_ptr,
                           kn_ptr, eps, M, ws_width, K_COL0, V_COL0, HQ, HKV, stride_cb, stride_sb, stride_qb,
                           stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                           D: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
                           PDL: tl.constexpr):
    """The split-K epilogue of a grouped q/k/v launch that also does what the graph did next: one program per head
    (q heads, then k heads, then v heads) reads the head's D sums of every row, zeroes them, adds the bias,
    normalises q and k (HAS_NORM: Qwen3's per-head RMSNorm), rotates them (``q * cos + rotate_half(q) * sin``) and
    writes q to ``q_ptr`` [B, HQ, 1, D] and k, v into the static cache's row ``pos`` (replacing Inductor's norm and
    RoPE kernel and the two ``index_copy_``).

    Rounds where eager rounds (``reference_qkv_rope_``): y, the norm's two products, each RoPE product and the sum
    to the output dtype. The half rotation reads the head's sums a second time at columns (d + D/2) mod D, so a
    program only reads sums it zeroes itself; a barrier keeps every warp's reads before any warp's zeroing."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rot_d = (offs_d + D // 2) % D
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    out_ty = q_ptr.dtype.element_ty
    is_v = pid >= HQ + HKV
    if pid < HQ:
        head = pid
        col = pid * D
        b_ptr = bq_ptr
        n_ptr = qn_ptr
    elif pid < HQ + HKV:
        head = pid - HQ
        col = K_COL0 + head * D
        b_ptr = bk_ptr
        n_ptr = kn_ptr
    else:
        head = pid - HQ - HKV
        col = V_COL0 + head * D
        b_ptr = bv_ptr
        n_ptr = qn_ptr  # read, not used: v has no norm
    # the op's inputs (cos, sin, the position, the biases, the norm weights) were written before its GEMV grid
    # waited: read them before this launch's wait (pdl.py)
    pos = tl.load(pos_ptr)
    cos = tl.load(cos_ptr + offs_m[:, None] * stride_cb + offs_d[None, :], mask=mask, other=0.0,
                  cache_modifier=".cg").to(tl.float32)
    sin = tl.load(sin_ptr + offs_m[:, None] * stride_sb + offs_d[None, :], mask=mask, other=0.0,
                  cache_modifier=".cg").to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + head * D + offs_d, cache_modifier=".cg").to(tl.float32)
        bias_rot = tl.load(b_ptr + head * D + rot_d, cache_modifier=".cg").to(tl.float32)
    nw, nw_rot = None, None
    if HAS_NORM:
        nw = tl.load(n_ptr + offs_d, cache_modifier=".cg").to(tl.float32)
        nw_rot = tl.load(n_ptr + rot_d, cache_modifier=".cg").to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    row = ws_ptr + offs_m[:, None] * ws_width + col
    y = tl.load(row + offs_d[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    y_rot = tl.load(row + rot_d[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    tl.debug_barrier()
    tl.store(row + offs_d[None, :], tl.zeros((BM, D), dtype=tl.float32), mask=mask)
    if HAS_BIAS:
        y += bias[None, :]
        y_rot += bias_rot[None, :]
    y = y.to(out_ty)
    y_rot = y_rot.to(out_ty)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if is_v:
        tl.store(vc_ptr + offs_m[:, None] * stride_vb + head * stride_vh + pos * stride_vl + offs_d[None, :], y,
                 mask=mask)
    else:
        e = normed_rotated(y, y_rot, sign, cos, sin, nw, nw_rot, eps, D, out_ty, HAS_NORM)
        if pid < HQ:
            tl.store(q_ptr + offs_m[:, None] * stride_qb + head * D + offs_d[None, :], e, mask=mask)
        else:
            tl.store(kc_ptr + offs_m[:, None] * stride_kb + head * stride_kh + pos * stride_kl + offs_d[None, :], e,
                     mask=mask)
