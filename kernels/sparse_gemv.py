"""Triton sparse GEMV: y = (x ⊙ 1[|x| > t]) Wᵀ + b for 1 to 8 rows, W stored column-major.

Kernel, launcher, reference and config choice side by side (the tests are in tests/test_sparse_gemv.py, the
benchmark in examples/bench_kernels.py, the performance notes in NOTES.md).

Layout: with W column-major (strides (1, N)), input k's weights are one contiguous row of N values, so a zero
x[k] skips one contiguous stretch of memory. The kernel takes W's strides, so a row-major W also works (slowly).

Parallelism (split-K without a memset): the grid is (N tiles) x (K splits). Each program reduces its K range into
an fp32 partial tile, stores it to a workspace and bumps a per-N-tile counter; the program that arrives last sums
the partials in a fixed order (deterministic), adds the bias, writes y in its dtype, and resets the counter to 0
for the next launch. So there is one launch, no output-zeroing memset, and no atomics on the output.
Rows: every row keeps its own mask; a weight row is read once if any row needs it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional extra on CPU
    HAS_TRITON = False

MAX_ROWS = 8
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference_sparse_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """float64 reference of what the kernel computes (x: [M, K], weight: [N, K])."""
    x64 = x.double()
    y = torch.where(x64.abs() > threshold, x64, 0.0) @ weight.double().t()
    return y + bias.double() if bias is not None else y


if HAS_TRITON:

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, threshold,
        stride_xm, stride_wn, stride_wk, stride_ym,
        K_PER_SPLIT,
        SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        offs_n = pn * BN + tl.arange(0, BN)
        offs_m = tl.arange(0, BM)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_lo = pk * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < k_hi
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            keep = tl.abs(x.to(tl.float32)) > threshold
            xs = tl.where(keep, x.to(tl.float32), 0.0)
            row_needed = tl.max(keep.to(tl.int32), axis=0) > 0  # any row of x needs weight row k
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=row_needed[:, None] & n_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            if BM == 1:
                acc += tl.sum(tl.reshape(xs, (BK, 1)) * w, axis=0)[None, :]
            else:
                acc += tl.sum(xs[:, :, None] * w[None, :, :], axis=1)

        y_offs = offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            ws_offs = (pk * BM + offs_m[:, None]) * N + offs_n[None, :]
            tl.store(ws_ptr + ws_offs, acc, mask=y_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pn, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BM, BN), dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    total += tl.load(ws_ptr + (s * BM + offs_m[:, None]) * N + offs_n[None, :], mask=y_mask,
                                     other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
                tl.atomic_xchg(cnt_ptr + pn, 0)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes and split-K for a shape: enough programs to fill the GPU several times over."""
    BN = 256 if N >= 2048 else max(32, _next_pow2(min(N, 256)))
    BK = 64 if M <= 2 else 32
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    n_tiles = -(-N // BN)
    split = max(1, min(-(-K // BK), round(4 * sms / n_tiles)))
    k_per = -(-(-(-K // split)) // BK) * BK
    split = -(-K // k_per)
    return dict(BN=BN, BK=BK, SPLIT_K=split, K_PER_SPLIT=k_per, num_warps=4)


class _Workspace:
    """Per-device scratch: fp32 partials and self-resetting arrival counters (zeroed once, at allocation)."""

    def __init__(self) -> None:
        self.bufs: dict = {}

    def get(self, device: torch.device, partials: int, tiles: int) -> tuple[Tensor, Tensor]:
        key = (device, "ws")
        ws = self.bufs.get(key)
        if ws is None or ws.numel() < partials:
            ws = torch.empty(max(partials, 1 << 20), dtype=torch.float32, device=device)
            self.bufs[key] = ws
        ckey = (device, "cnt")
        cnt = self.bufs.get(ckey)
        if cnt is None or cnt.numel() < tiles:
            cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
            self.bufs[ckey] = cnt
        return ws, cnt


_WORKSPACE = _Workspace()


def supports(x: Tensor, weight: Tensor) -> bool:
    rows = x.numel() // max(1, x.shape[-1])
    return (
        HAS_TRITON
        and x.is_cuda
        and weight.is_cuda
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and 1 <= rows <= MAX_ROWS
    )


def sparse_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, config: Optional[dict] = None,
                out: Optional[Tensor] = None) -> Tensor:
    """Launch the kernel. x: [..., K] with at most 8 rows; weight: [N, K], ideally column-major (stride (1, N))."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton sparse GEMV needs triton")
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"sparse_gemv takes 1 to {MAX_ROWS} rows, got {M}")
    cfg = dict(config) if config else choose_config(M, N, K, x.device)
    BM = _next_pow2(M)
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    n_tiles = -(-N // cfg["BN"])
    ws, cnt = _WORKSPACE.get(x.device, cfg["SPLIT_K"] * BM * N, n_tiles)
    grid = (n_tiles, cfg["SPLIT_K"])
    _sparse_gemv_kernel[grid](
        x2, weight, bias if bias is not None else x2, y, ws, cnt,
        M, N, K, float(threshold),
        x2.stride(0), weight.stride(0), weight.stride(1), y.stride(0),
        cfg["K_PER_SPLIT"],
        SPLIT_K=cfg["SPLIT_K"], BM=BM, BN=cfg["BN"], BK=cfg["BK"], HAS_BIAS=bias is not None,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return y.reshape(*x.shape[:-1], N)
