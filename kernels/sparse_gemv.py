"""Triton sparse GEMV: y = (x ⊙ 1[|x| > t]) Wᵀ + b for 1 to 8 rows, W stored column-major.

Kernel, launcher, reference and config choice side by side (the tests are in tests/test_sparse_gemv.py, the
benchmark in examples/bench_kernels.py, the performance notes in NOTES.md).

Layout: with W column-major (strides (1, N)), input k's weights are one contiguous row of N values, so a zero
x[k] skips one contiguous stretch of memory. The kernel takes W's strides, so a row-major W also works (slowly).

Parallelism (split-K without a memset): the grid is (N tiles) x (K splits), programs are short (a few [BK, BN]
tiles each). Each adds its fp32 partial into a workspace with atomics and bumps a per-N-tile counter; the program
that arrives last reads the sum back and zeroes the workspace, adds the bias, writes y in
its dtype and resets the counter. So: one launch, no output-zeroing memset, the epilogue cost independent of the
split (NOTES.md, v3). Where launches overlap (programmatic dependent launch, below), that epilogue runs as a second,
tiny launch instead (``_finish_kernel``): the kernel boundary orders the partials, which saves the fence, counter and
read-back round trips at the end of the grid, about 1 µs per GEMV (NOTES.md, v11). For a block's o and down projections
that launch also adds the residual and applies the RMSNorm after them (``_finish_add_rmsnorm_kernel``, one program per
row holding every column; NOTES.md, v15). The fp32 sum order varies
between runs (not bit-reproducible); under ``torch.use_deterministic_algorithms(True)`` the ops do not launch it
(``supports``).
Rows: every row keeps its own mask; a weight row is read once if any row needs it.
Loops (one row, ``_in_thread_partial``): each thread owns whole columns of a tile, so a tile's sum stays in the
thread; the loop walks every input of the split, masking the rows not needed, or, where the plan's sparsity is high
enough for it to be faster (``compact_from``: 70% on the MLP shapes, 85% on the attention ones), only the surviving
inputs, packed first: a loop over every input pays a memory round trip per tile however few rows it keeps, so at 90%
it cost 4x its data (NOTES.md, v5, v17). Below that the masked loop is faster, even with the packing free (v18).
2-4 rows use the in-thread layout too (``_in_thread_rows_partial``), 5-8 rows the tensor cores (rows padded to 16),
small N the [BK, BN] tiles.
Groups: up to three linears that share x (q/k/v, gate/up) run as one launch (``sparse_gemv_group``): their N tiles
form one grid, each segment with its own weight, bias, output and threshold (NOTES.md, v4).
On Hopper and newer, launches use programmatic dependent launch (``pdl.py``), so each overlaps the tail of the kernel
before it.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from teal_fx.kernels import pdl
from teal_fx.kernels.workspace import Workspace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional extra on CPU
    HAS_TRITON = False

MAX_ROWS = 8
MAX_SEGMENTS = 3  # linears sharing one input in a grouped launch (q, k, v)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference_sparse_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """float64 reference of what the kernel computes (x: [M, K], weight: [N, K])."""
    x64 = x.double()
    y = torch.where(x.abs().float() > threshold, x64, 0.0) @ weight.double().t()
    return y + bias.double() if bias is not None else y


if HAS_TRITON:

    @triton.jit
    def _load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N: tl.constexpr):
        """The [BK, BN] weight tile with the rows no input needs left unread (zero)."""
        if EVEN_N:  # the mask must be constant along N for 16-byte loads: no N bound check when tiles divide N
            mask = need[:, None]
        else:
            mask = need[:, None] & n_ok[None, :]
        return tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask, other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _silu_times_up(gate, up, out_ty: tl.constexpr):
        """silu(gate) * up from the fp32 sums, rounded to ``out_ty`` after each op as eager ``F.silu(gate) * up`` is."""
        gate = gate.to(out_ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
        return act * up.to(out_ty).to(tl.float32)

    @triton.jit
    def _in_thread_partial(x_ptr, w_ptr, idx_ptr, xv_ptr, k_lo, k_hi, threshold, offs_n, n_ok, stride_wk, stride_wn,
                           BK: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr,
                           PACK: tl.constexpr):
        """Σ_k x_k W[k, offs_n] over the inputs of [k_lo, k_hi) that survive the threshold (one row of x).

        With BN = 256 * num_warps every thread holds whole columns of a [BK, BN] tile (8 columns x BK rows), so the
        sum over the tile's rows stays inside the thread: the accumulator is 8 registers and the rest can hold a
        whole tile's loads in flight (the [BK, BN] accumulator of the other loop leaves ptxas room for half a tile).

        PACK: the survivors' indices and values are packed first (a prefix sum over the chunk, stored to a scratch
        slot that every program of this K split and segment shares: they all write the same values), then the loop
        runs over full tiles of needed weight rows only: at 90% a tenth of the iterations, where a loop over all
        rows pays a memory round trip per tile however few rows it keeps (NOTES.md, v5). Without PACK the loop
        walks every input and masks the rows not needed.
        """
        acc = tl.zeros((BN,), dtype=tl.float32)
        if PACK:
            offs = k_lo + tl.arange(0, CHUNK)
            x = tl.load(x_ptr + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
            keep = tl.abs(x) > threshold
            slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
            n_keep = tl.sum(keep.to(tl.int32), axis=0)
            tl.store(idx_ptr + slot, offs, mask=keep)
            tl.store(xv_ptr + slot, x, mask=keep)
            tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier
            j = tl.arange(0, BK)
            ok = j < n_keep
            k = tl.load(idx_ptr + j, mask=ok, other=0)
            xv = tl.load(xv_ptr + j, mask=ok, other=0.0)
            for j0 in range(0, n_keep, BK):
                w = _load_needed_rows(w_ptr, k, offs_n, ok, n_ok, stride_wk, stride_wn, EVEN_N)
                jn = j0 + BK + tl.arange(0, BK)  # the next tile's indices are requested before this tile's FMAs
                ok_next = jn < n_keep
                k_next = tl.load(idx_ptr + jn, mask=ok_next, other=0)
                xv_next = tl.load(xv_ptr + jn, mask=ok_next, other=0.0)
                acc += tl.sum(xv[:, None] * w.to(tl.float32), axis=0)
                k, xv, ok = k_next, xv_next, ok_next
        else:
            offs_k = k_lo + tl.arange(0, BK)
            x = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                offs_k = k0 + tl.arange(0, BK)
                keep = tl.abs(x) > threshold  # x past k_hi is 0: never kept (t >= 0)
                w = _load_needed_rows(w_ptr, offs_k, offs_n, keep, n_ok, stride_wk, stride_wn, EVEN_N)
                nxt = offs_k + BK
                x_next = tl.load(x_ptr + nxt, mask=nxt < k_hi, other=0.0).to(tl.float32)
                acc += tl.sum(tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32), axis=0)
                x = x_next
        return acc

    @triton.jit
    def _in_thread_rows_partial(x_ptr, w_ptr, k_lo, k_hi, threshold, offs_m, m_ok, stride_xm, offs_n, n_ok,
                                stride_wk, stride_wn, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                                EVEN_N: tl.constexpr):
        """[BM, BN] partial sums for 2-8 rows in the in-thread layout: each row keeps its own mask, a weight row is
        read when some row needs it, and the [BM, BK] x [BK, BN] product is summed over K inside each thread (CUDA
        cores; the tensor-core path pads the rows to 16 and stages the tiles through shared memory)."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        offs_k = k_lo + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0).to(tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            keep = tl.abs(x) > threshold  # padded rows and inputs past k_hi are 0: never kept (t >= 0)
            need = tl.max(keep.to(tl.int32), axis=0) > 0
            w = _load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N)
            nxt = offs_k + BK
            x_next = tl.load(x_ptr + offs_m[:, None] * stride_xm + nxt[None, :],
                             mask=m_ok[:, None] & (nxt < k_hi)[None, :], other=0.0).to(tl.float32)
            xs = tl.where(keep, x, 0.0)
            acc += tl.sum(xs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
            x = x_next
        return acc

    # A grouped launch swaps scalars per segment inside a runtime `if`; both branches must have the same type, so
    # a swapped value may never be 1 (Triton turns an argument equal to 1 into a compile-time constant). The
    # launcher groups only column-major weights (stride_wn == 1 in every segment, so it is never swapped) with
    # N >= 16. Never disable specialisation of the strides: the "divisible by 16" hint on stride_wk is what
    # makes the weight loads 16 bytes wide (without it the kernel ran 6x slower, NOTES.md).
    @triton.jit
    def _sparse_gemv_kernel(
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
        # split-K sums finished by a second launch (``_finish_kernel``) instead of this grid's last arriver
        APART: tl.constexpr = False,
    ):
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
                else:
                    pn = pn_all - TILES1
                    col0 = TILES1 * BN
                    seg = 1
                    w_ptr, b_ptr, y_ptr, N, threshold = w1_ptr, b1_ptr, y1_ptr, N1, threshold1
                    stride_wk, stride_ym = stride_wk1, stride_ym1
        offs_n = pn * BN + tl.arange(0, BN)
        offs_m = tl.arange(0, BM)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_lo = pk * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        if USE_DOT:
            # rows padded to BM >= 16: a skinny matmul on tensor cores, weight rows masked by "any row needs it"
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_ok = offs_k < k_hi
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                keep = tl.abs(x.to(tl.float32)) > threshold
                xs = tl.where(keep, x, 0.0)
                need = tl.max(keep.to(tl.int32), axis=0) > 0
                w = _load_needed_rows(w_ptr, offs_k, offs_n, need, n_ok, stride_wk, stride_wn, EVEN_N)
                if UPCAST:  # the CPU interpreter mis-computes bf16 dots; the GPU never takes this branch
                    acc = tl.dot(xs.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                elif IEEE:
                    acc = tl.dot(xs, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xs, w, acc)
        elif IN_THREAD and BM > 1:
            acc = _in_thread_rows_partial(x_ptr, w_ptr, k_lo, k_hi, threshold, offs_m, m_ok, stride_xm, offs_n, n_ok,
                                          stride_wk, stride_wn, BM, BK, BN, EVEN_N)
        elif IN_THREAD:
            slot = (seg * SPLIT_K + pk) * CHUNK
            acc = tl.reshape(_in_thread_partial(x_ptr, w_ptr, idx_ptr + slot, xv_ptr + slot, k_lo, k_hi, threshold,
                                                offs_n, n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, COMPACT),
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
                w = _load_needed_rows(w_ptr, offs_k, offs_n, keep, n_ok, stride_wk, stride_wn, EVEN_N)
                nxt = offs_k + BK
                x_next = tl.load(x_ptr + nxt, mask=nxt < k_hi, other=0.0).to(tl.float32)
                acc2 += tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32)
                x = x_next
            acc = tl.reshape(tl.sum(acc2, axis=0), (1, BN))

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
                        total = _silu_times_up(gate, up, out_ty)
                    else:
                        total = tl.atomic_add(ws_ptr + ws_offs, zero, mask=y_mask, sem="relaxed")
                        tl.store(ws_ptr + ws_offs, zero, mask=y_mask)
                        if HAS_BIAS:
                            total += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
                    tl.atomic_xchg(counter, 0)

    @triton.jit
    def _finish_kernel(
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
        per N tile, about 1 µs more per launch on the H100 (NOTES.md, v11)."""
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
            total = _silu_times_up(total, up, y_ptr.dtype.element_ty)
        else:
            tl.store(ws_ptr + ws_offs, zero, mask=mask)
            if HAS_BIAS:
                total += bias[None, :]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], total.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _finish_add_rmsnorm_kernel(ws_ptr, b_ptr, res_ptr, nw_ptr, h_ptr, out_ptr, N, ws_width, stride_res, stride_h,
                                   stride_out, eps, BN: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        """The split-K epilogue of a linear followed by a residual add and an RMSNorm (Llama's), one program per row
        holding all N columns: y = sums (+ bias), h = residual + y, out = norm_weight * (h * rsqrt(mean(h²) + eps)).

        Rounds where eager rounds (``LlamaRMSNorm`` in the model's dtype): y and h to the output dtype, the norm in
        fp32, its result to the dtype before the weight's product. Replaces the Inductor reduction kernel that
        otherwise runs after every o and down projection (NOTES.md, v15)."""
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


def interpreter_upcasts(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast bf16 operands of ``tl.dot``: the CPU interpreter mis-computes bf16 dots."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def make_config(N: int, K: int, *, BN: int, BK: int, iters: int, use_dot: bool, num_warps: int = 4,
                num_stages: int = 2, compact: bool = False, in_thread: bool = False) -> dict:
    """A launch config: [BK, BN] tiles, each program covering ``iters`` of them along K (so K is split in
    ceil(K / (BK * iters)) parts). ``in_thread`` sums each tile inside the threads (BN should be 256 * num_warps;
    up to 8 rows, 2-4 in practice), ``compact`` (one row; implies it) loops over the packed surviving inputs only."""
    BN = min(BN, max(16, _next_pow2(N)))
    k_per = BK * iters
    return dict(BN=BN, BK=BK, SPLIT_K=-(-K // k_per), K_PER_SPLIT=k_per, USE_DOT=use_dot,
                num_warps=num_warps, num_stages=num_stages, IN_THREAD=(in_thread or compact) and not use_dot,
                COMPACT=compact and not use_dot, CHUNK=_next_pow2(k_per))


def _mlp_sized(N: int, K: int) -> bool:
    """Whether a one-warp grid of 256 x 16 tiles has >= 8000 of them: the MLP shapes (gate/up, down, gate+up) but
    not the attention ones (4096x4096, q+k+v), which the sweeps tile differently."""
    return (N // 256) * (K // 16) >= 8000


def compact_from(N: int, K: int) -> float:
    """The expected sparsity from which one row loops over the packed survivors only: where the rows it skips repay
    the packing's fixed cost (x, a scan, a scratch round trip). Timed both loops per shape with dependent launches
    (examples/probe_compact_crossover.py, NOTES v17): on the MLP shapes the masked loop is faster up to 0.65 and even
    at 0.7; on the attention shapes (fewer programs) up to 0.8, the packed loop ahead only at 0.9."""
    return 0.7 if _mlp_sized(N, K) else 0.85


def choose_config(M: int, N: int, K: int, device: torch.device, sparsity: Optional[float] = None) -> dict:
    """Tile sizes, loop and split-K for a shape (from the sweeps in NOTES.md). ``sparsity``: the fraction of inputs
    the threshold is expected to drop (None or < 0: unknown)."""
    if M == 1 and N >= 2048:  # below that (a lone k/v projection, small models) the in-thread loops had too few programs
        if sparsity is not None and sparsity >= compact_from(N, K):
            # packed survivors: 4 warps, ~450 programs each packing 64-256 inputs
            BN = min(1024, _next_pow2(N))
            k_per = min(256, max(64, _next_pow2(K * (-(-N // BN)) // 448)))
            return make_config(N, K, BN=BN, BK=16, iters=k_per // 16, use_dot=False, num_warps=BN // 256,
                               num_stages=1, compact=True)
        # every input, masked: one warp per 256 columns (~1000-1800 programs). The MLP shapes: 8 tiles of 16 rows a
        # program; the attention shapes (4096x4096, q+k+v): 2 tiles of 32 rows, 3-8% faster there at 0-50% and no
        # gain on the MLP shapes (sweep, NOTES v10)
        if _mlp_sized(N, K):
            return make_config(N, K, BN=256, BK=16, iters=8, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
        return make_config(N, K, BN=256, BK=32, iters=2, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
    if M <= 4 and N >= 2048:
        # 2-4 rows in the same layout, summed on CUDA cores: 16 tiles per program on the MLP shapes, 4 on 4096²
        # (sweeps at 50%: 0.85-0.87 of roofline on the MLP shapes vs 0.79-0.83 for the tensor-core path; NOTES v7)
        iters = 16 if _mlp_sized(N, K) else 4
        return make_config(N, K, BN=256, BK=16, iters=iters, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
    if N >= 2048:
        # 5-8 rows: tensor cores, 32-row tiles, 16 per program; 256 columns and a 4-stage pipeline on 4096² (sweep
        # at 8 and 6 rows, 50%: 7-13% faster than the small-shape rule below; NOTES v7)
        small = N * K <= 4096 * 4096
        return make_config(N, K, BN=256 if small else 128, BK=32, iters=16, use_dot=True, num_warps=4,
                           num_stages=4 if small else 3)
    BN, BK = 128, 64
    n_tiles = -(-N // BN)
    # about 450-500 programs did best in the v3 sweeps on the H100 (NOTES.md): 16 tiles per program on the MLP
    # shapes, 4 on 4096x4096, 2 on the small k/v projections
    iters = max(2, min(16, round(K * n_tiles / (BK * 480))))
    return make_config(N, K, BN=BN, BK=BK, iters=iters, use_dot=M > 1, num_warps=4, num_stages=2 if M == 1 else 3)


# ``ws`` the fp32 split-K accumulator and ``cnt`` the arrival counters (zero between launches), ``idx``/``xv`` the
# packed indices and values of the surviving inputs (compacted loop; written before read). The teal backend reserves
# it at compile time (``reserve_workspace``), before any CUDA graph is captured.
_WORKSPACE = Workspace("teal sparse GEMV (reserve_workspace)",
                       dtypes={"ws": torch.float32, "cnt": torch.int32, "idx": torch.int32, "xv": torch.float32},
                       min_sizes={"ws": 1 << 20, "cnt": 1 << 14, "idx": 1 << 16, "xv": 1 << 16})


def reserve_workspace(device: torch.device, max_n: int, max_k: int) -> None:
    """Allocate the scratch for launches over weights of up to ``max_n`` outputs and ``max_k`` inputs (a grouped
    launch spans up to MAX_SEGMENTS of them, each padded to a tile) and up to 16 padded rows."""
    width = MAX_SEGMENTS * (max_n + 256)
    packed = MAX_SEGMENTS * 2 * (max_k + 4096)  # SPLIT_K * CHUNK < 2 * (K + K_PER_SPLIT); choose_config: K_PER_SPLIT <= 1024
    _WORKSPACE.reserve(torch.device(device), ws=16 * width, cnt=width // 16 + 1, idx=packed, xv=packed)


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether the ops may launch the kernel for these operands (else they run their reference)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        HAS_TRITON
        and x.is_cuda
        and weight.is_cuda
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and 1 <= rows <= MAX_ROWS
        and not _deterministic_requested()
    )


_warned_deterministic = False


def _deterministic_requested() -> bool:
    """``torch.use_deterministic_algorithms(True)``: the kernel's split-K sums meet through fp32 atomics in a varying
    order, so, as PyTorch's own ops with a deterministic alternative do, the ops then take theirs (the masked
    input through ``F.linear``: same result up to rounding, no decode speedup), and say so once."""
    global _warned_deterministic
    if not torch.are_deterministic_algorithms_enabled():
        return False
    if not _warned_deterministic:
        _warned_deterministic = True
        warnings.warn("teal: torch.use_deterministic_algorithms is on, so the sparse linears run their deterministic "
                      "reference (masked input, dense F.linear) instead of the Triton sparse GEMV, whose split-K sums "
                      "use fp32 atomics: results are reproducible, decoding is not faster", stacklevel=2)
    return True


def sparse_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, config: Optional[dict] = None,
                out: Optional[Tensor] = None, sparsity: Optional[float] = None) -> Tensor:
    """Launch the kernel. x: [..., K] with at most 8 rows; weight: [N, K], ideally column-major (stride (1, N)).
    ``sparsity`` (expected fraction of inputs dropped, or None) only picks the launch config."""
    return sparse_gemv_group(x, [weight], [bias], [threshold], config=config, outs=None if out is None else [out],
                             sparsity=sparsity)[0]


def _groupable(w: Tensor) -> bool:
    """A weight a grouped launch takes: the kernel swaps stride_wk (and N) per segment inside a runtime ``if``, and
    Triton makes an argument equal to 1 a constant, which the other branch cannot redefine. Column-major
    (stride_wn == 1, never swapped) with N >= 16 and stride_wk != 1 (a [N, 1] weight can have stride (1, 1))."""
    return w.stride(0) == 1 and w.stride(1) != 1 and w.shape[0] >= 16


def can_fuse_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor) -> bool:
    """Whether ``sparse_gemv_swiglu`` takes these (one grouped launch: column-major weights of one shape and dtype,
    the input's; the device is the caller's check, ``supports``)."""
    return (w_gate.shape == w_up.shape and w_gate.dim() == 2 and w_gate.shape[1] == x.shape[-1]
            and w_gate.dtype == w_up.dtype == x.dtype and x.dtype in DTYPES
            and _groupable(w_gate) and _groupable(w_up)
            and 1 <= x.numel() // max(1, x.shape[-1]) <= MAX_ROWS)


def sparse_gemv_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float,
                       config: Optional[dict] = None, out: Optional[Tensor] = None,
                       sparsity: Optional[float] = None) -> Tensor:
    """silu(x_g W_gateᵀ) * (x_u W_upᵀ), x_g/x_u = x masked by t_gate/t_up, in one launch (see ``can_fuse_swiglu``).

    The gate/up group launch whose last program per column tile forms the product from the two fp32 sums, rounding
    after each op as eager ``F.silu(gate) * up`` does: the SiLU kernel between the MLP's launches goes away."""
    if not can_fuse_swiglu(x, w_gate, w_up):
        raise ValueError("sparse_gemv_swiglu: needs column-major gate and up weights of one shape (see can_fuse_swiglu)")
    if out is None:
        out = torch.empty((x.reshape(-1, x.shape[-1]).shape[0], w_gate.shape[0]), dtype=x.dtype, device=x.device)
    return sparse_gemv_group(x, [w_gate, w_up], [None, None], [t_gate, t_up], config=config, outs=[out, out],
                             sparsity=sparsity, _gated=True)[0]


MAX_NORM_WIDTH = 16384  # the add + RMSNorm finish holds a row's N columns in one program


def can_fuse_add_rmsnorm(x: Tensor, weight: Tensor, residual: Tensor, norm_weight: Tensor) -> bool:
    """Whether ``sparse_gemv_add_rmsnorm`` takes these: the residual has the linear's output shape, the norm weight
    is [N], both in the input's dtype, N at most ``MAX_NORM_WIDTH`` (the device is the caller's check, ``supports``)."""
    N = weight.shape[0]
    return (weight.dim() == 2 and N <= MAX_NORM_WIDTH and residual.shape == (*x.shape[:-1], N)
            and norm_weight.shape == (N,) and residual.dtype == norm_weight.dtype == x.dtype
            and residual.device == x.device == norm_weight.device)


def sparse_gemv_add_rmsnorm(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, residual: Tensor,
                            norm_weight: Tensor, eps: float, config: Optional[dict] = None,
                            sparsity: Optional[float] = None,
                            outs: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """h = residual + (x ⊙ 1[|x| > t]) Wᵀ (+ b) and out = RMSNorm(h) · norm_weight (Llama's, eager rounding), in two
    launches: the GEMV grid, then one program per row that finishes the split-K sums, adds, normalises and writes
    both (see ``can_fuse_add_rmsnorm``). Returns (h, out), written into ``outs`` ([rows, N] each) if given."""
    if not can_fuse_add_rmsnorm(x, weight, residual, norm_weight):
        raise ValueError("sparse_gemv_add_rmsnorm: needs a residual of the output's shape and a [N] norm weight, in "
                         f"the input's dtype, N <= {MAX_NORM_WIDTH} (see can_fuse_add_rmsnorm)")
    rows = x.numel() // x.shape[-1]
    h, out = outs if outs is not None else [torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)
                                            for _ in range(2)]
    sparse_gemv_group(x, [weight], [bias], [threshold], config=config, outs=[h], sparsity=sparsity,
                      _norm=(residual.reshape(rows, -1).contiguous(), norm_weight.contiguous(), float(eps), out))
    shape = residual.shape
    return h.reshape(shape), out.reshape(shape)


def sparse_gemv_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                      thresholds: Sequence[float], config: Optional[dict] = None,
                      outs: Optional[Sequence[Tensor]] = None, sparsity: Optional[float] = None,
                      _gated: bool = False, _norm: Optional[tuple] = None) -> list[Tensor]:
    """One launch for up to three linears that share the input ``x`` (q/k/v, gate/up): y_i = (x ⊙ 1[|x| > t_i]) W_iᵀ + b_i.

    The segments' N tiles form one grid, so the small k/v projections ride along with q instead of paying a
    launch and a ramp each. A weight row of segment i is read when some row of x exceeds t_i at that input.
    (``_gated``: the SwiGLU epilogue of ``sparse_gemv_swiglu``; ``_norm``: (residual, norm weight, eps, out), the
    add + RMSNorm finish of ``sparse_gemv_add_rmsnorm``, ``outs`` then holding h. Both check their arguments.)
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton sparse GEMV needs triton")
    nseg = len(weights)
    if not 1 <= nseg <= MAX_SEGMENTS or len(biases) != nseg or len(thresholds) != nseg:
        raise ValueError(f"sparse_gemv_group takes 1 to {MAX_SEGMENTS} weights with as many biases and thresholds")
    if len({b is None for b in biases}) > 1:
        raise ValueError("sparse_gemv_group: either every segment has a bias or none has")
    if nseg > 1 and not all(_groupable(w) for w in weights):
        # the kernel swaps only stride_wk per segment, and no swapped scalar may be 1 (see the kernel): launch apart
        return [sparse_gemv_group(x, [w], [b], [t], config=config, outs=None if o is None else [o], sparsity=sparsity)[0]
                for w, b, t, o in zip(weights, biases, thresholds, outs if outs is not None else [None] * nseg)]
    K = x.shape[-1]
    if any(w.shape[1] != K for w in weights):
        raise ValueError("sparse_gemv_group: every weight must take the input's width")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"sparse_gemv takes 1 to {MAX_ROWS} rows, got {M}")
    Ns = [w.shape[0] for w in weights]
    cfg = dict(config) if config else choose_config(M, sum(Ns), K, x.device, sparsity)
    BN = cfg["BN"]
    if cfg["USE_DOT"]:
        BM = max(16, _next_pow2(M))
    elif cfg.get("IN_THREAD") and not cfg.get("COMPACT"):
        BM = _next_pow2(M)
    elif M == 1:
        BM = 1
    else:
        raise ValueError("the [BK, BN] tile loop and the packed loop take one row; batches take USE_DOT or IN_THREAD")
    ys = list(outs) if outs is not None else [torch.empty((M, N), dtype=x.dtype, device=x.device) for N in Ns]
    tiles = [-(-N // BN) for N in Ns]
    total_tiles = sum(tiles)
    packed = nseg * cfg["SPLIT_K"] * cfg["CHUNK"] if cfg.get("COMPACT") else 1  # a CHUNK slot per K split and segment
    ws, cnt, idx, xv = _WORKSPACE.get(x.device, ws=BM * total_tiles * BN, cnt=total_tiles, idx=packed, xv=packed)
    has_bias = biases[0] is not None
    seg = []
    for i in range(nseg):
        w, y = weights[i], ys[i]
        # t < 0 keeps every input, as t = 0 does up to exact zeros (which add nothing); the kernel relies on t >= 0
        # to never keep the zero-padded inputs past the end of a split, so clamp
        seg.append(dict(w=w, b=biases[i] if has_bias else x2, y=y, N=Ns[i], t=max(float(thresholds[i]), 0.0),
                        swn=w.stride(0), swk=w.stride(1), sym=y.stride(0)))
    extra = {}
    for i in (1, 2):
        if i < nseg:
            d = seg[i]
            extra.update({f"w{i}_ptr": d["w"], f"b{i}_ptr": d["b"], f"y{i}_ptr": d["y"], f"N{i}": d["N"],
                          f"threshold{i}": d["t"], f"stride_wk{i}": d["swk"], f"stride_ym{i}": d["sym"]})
    if nseg > 1:
        extra.update(TILES1=tiles[0], TILES2=tiles[0] + (tiles[1] if nseg > 2 else 0), N_TOTAL=total_tiles * BN)
    s0 = seg[0]
    use_pdl = pdl.enabled(x.device)
    # the split-K epilogue as a second launch where launches overlap (PDL): ~1 µs less per GEMV than the grid's own
    # last arriver (NOTES.md, v11). Not for the tensor-core path, which does not let the next launch start early.
    apart = bool(cfg.get("APART", use_pdl)) and (cfg["SPLIT_K"] > 1 or _gated) and not cfg["USE_DOT"]
    apart = apart or _norm is not None  # the norm needs every column's sum: only a launch after the grid has them
    _sparse_gemv_kernel[(total_tiles, cfg["SPLIT_K"])](
        x2, s0["w"], s0["b"], s0["y"], ws, cnt, idx, xv,
        M, s0["N"], K, s0["t"],
        x2.stride(0), s0["swn"], s0["swk"], s0["sym"],
        cfg["K_PER_SPLIT"],
        SPLIT_K=cfg["SPLIT_K"], BM=BM, BN=BN, BK=cfg["BK"], HAS_BIAS=has_bias,
        USE_DOT=cfg["USE_DOT"], IEEE=x.dtype == torch.float32,
        UPCAST=interpreter_upcasts(x.dtype),
        EVEN_N=all(N % BN == 0 for N in Ns), EVEN_K=K % cfg["K_PER_SPLIT"] == 0,
        IN_THREAD=cfg.get("IN_THREAD", False), COMPACT=cfg.get("COMPACT", False), CHUNK=cfg.get("CHUNK", 1),
        NSEG=nseg, GATED=_gated, PDL=use_pdl, APART=apart, num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 2), **extra, **({"launch_pdl": True} if use_pdl else {}),
    )
    if _norm is not None:
        residual, norm_weight, eps, out = _norm
        BN_ROW = _next_pow2(s0["N"])
        _finish_add_rmsnorm_kernel[(M,)](
            ws, s0["b"], residual, norm_weight, s0["y"], out, s0["N"], s0["N"], residual.stride(0), s0["sym"],
            out.stride(0), eps, BN=BN_ROW, HAS_BIAS=has_bias, PDL=use_pdl, num_warps=min(8, max(1, BN_ROW // 1024)),
            **({"launch_pdl": True} if use_pdl else {}),
        )
    elif apart:
        finish = {k: extra[k] for k in ("y1_ptr", "b1_ptr", "N1", "stride_ym1", "y2_ptr", "b2_ptr", "N2", "stride_ym2",
                                        "TILES1", "TILES2") if k in extra}
        _finish_kernel[(tiles[0] if _gated else total_tiles,)](
            ws, s0["y"], s0["b"], M, s0["N"], total_tiles * BN if nseg > 1 else s0["N"], s0["sym"], **finish,
            # one warp whatever BN: with 4 warps, [1, 1024] tiles stored as bf16 came out wrong on the H100 (Triton
            # 3.6; 1 warp exact at every BN tried, tests/test_gpu.py); most likely the read-then-zero race between
            # warps that _finish_add_rmsnorm_kernel closes with a barrier (NOTES.md v15)
            NSEG=nseg, BM=BM, BN=BN, HAS_BIAS=has_bias, GATED=_gated, PDL=use_pdl, num_warps=1,
            **({"launch_pdl": True} if use_pdl else {}),
        )
    return [y.reshape(*x.shape[:-1], N) for y, N in zip(ys, Ns)]
