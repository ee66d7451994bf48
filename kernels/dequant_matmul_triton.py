"""The prefill GEMM on quantized weights: y = x Wᵀ + b with W int8 or int4 (kernels/quantize.py), each [BK, BN]
weight tile dequantized in registers on its way to the tensor cores, so no float copy of W is ever built.

A plain tiled matmul (the Triton tutorial's), grid (M tiles x N tiles), fp32 accumulator; the weight tiles are read
and converted as the GEMV reads them (every row needed) and the scales applied as the GEMV applies them: int8 once
per column after the loop, int4 per tile of one group.
"""
import triton
import triton.language as tl

from teal_fx.kernels.int_weights_triton import exact_float
from teal_fx.kernels.sparse_gemv_triton import load_needed_rows


@triton.jit
def dequant_matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_wk, stride_sg,
                          stride_ym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                          WFMT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Program (M tile, N tile): x [M, K] (inputs contiguous), W as the GEMV takes it (int8 [N, K] or packed int4
    [N / 2, K], strides (stride_wn, stride_wk)), scales as kernels/quantize.py stores them, y [M, N].

    int4: the low and the high nibbles (even and odd columns) are two products of [BM, BN / 2], stored to alternate
    columns: on the H200 an interleaved int4 tile fed to ``tl.dot`` came out doubled (sparse_gemv.py)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    offs_m = pm * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    if WFMT == 2:
        offs_p = pn * (BN // 2) + tl.arange(0, BN // 2)
        p_ok = offs_p < N // 2
        acc_lo = tl.zeros((BM, BN // 2), dtype=tl.float32)
        acc_hi = tl.zeros((BM, BN // 2), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            p = load_needed_rows(w_ptr, offs_k, offs_p, k_ok, p_ok, stride_wk, stride_wn, False).to(tl.int32)
            lo = exact_float((p & 15) - 8)
            hi = exact_float((p >> 4) - 8)
            srow = s_ptr + (k0 // GROUP) * stride_sg + 2 * offs_p
            s_lo = tl.load(srow, mask=p_ok, other=0.0).to(tl.float32)
            s_hi = tl.load(srow + 1, mask=p_ok, other=0.0).to(tl.float32)
            if UPCAST or IEEE:  # fp32 x, or the CPU interpreter's bf16 dots (computed in fp32)
                xf = x.to(tl.float32)
                acc_lo += tl.dot(xf, lo, input_precision="ieee") * s_lo[None, :]
                acc_hi += tl.dot(xf, hi, input_precision="ieee") * s_hi[None, :]
            else:
                acc_lo += tl.dot(x, lo.to(x_ptr.dtype.element_ty)) * s_lo[None, :]
                acc_hi += tl.dot(x, hi.to(x_ptr.dtype.element_ty)) * s_hi[None, :]
        cols = 2 * offs_p
        if HAS_BIAS:
            acc_lo += tl.load(b_ptr + cols, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            acc_hi += tl.load(b_ptr + cols + 1, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        mask = m_ok[:, None] & p_ok[None, :]
        y = y_ptr + offs_m[:, None] * stride_ym + cols[None, :]
        tl.store(y, acc_lo.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y + 1, acc_hi.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        offs_n = pn * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = exact_float(load_needed_rows(w_ptr, offs_k, offs_n, k_ok, n_ok, stride_wk, stride_wn, False)
                            .to(tl.int32))
            if UPCAST or IEEE:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
