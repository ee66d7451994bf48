"""Benchmark of the Triton sparse GEMV on Llama-3-8B shapes, against cuBLAS dense and the bandwidth roofline.

    python examples/bench_kernels.py [--quick] [--sweep] [--out examples/results/kernels_<gpu>.md]
    python examples/bench_kernels.py --batches 1,2,4,8,16 --batch-only   # per-row vs shared masks, break-even table

Each figure is µs per call inside a CUDA graph of many calls over rotating weight copies (together larger than
L2), so neither launch overhead nor cache hits flatter it. roofline = bytes of the weight rows that some row of
x needs / read bandwidth measured in this same run. The table is written as markdown with date, GPU, versions.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import (
    add_rule_arguments,
    apply_rule_arguments,
    default_out,
    dependent_launches,
    graph_time_us,
    read_bandwidth,
)
from teal_fx.kernels import sparse_gemv as sg
from teal_fx.kernels.quantize import INT4_GROUP, dequantize, quantize_int4, quantize_int8
from teal_fx.kernels.reference import reference_sparse_linear
from teal_fx.kernels.sparse_gemv_config import make_config, shape_class

QUANTIZE = {"int8": quantize_int8, "int4": quantize_int4}

SHAPES = {  # name: (N, K)
    "q/o 4096x4096": (4096, 4096),
    "k/v 1024x4096": (1024, 4096),
    "qkv 6144x4096": (6144, 4096),
    "gate/up 14336x4096": (14336, 4096),
    "gate+up 28672x4096": (28672, 4096),
    "down 4096x14336": (4096, 14336),
}
LM_HEAD_SHAPE = {"lm_head 128256x4096": (128256, 4096)}  # Llama-3's output head (quantized): sweeps only, at 0%
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.9)


def make_case(N: int, K: int, M: int, sparsity: float, dtype, l2_bytes: int, shared: bool = False):
    """Rotating weights (> L2), x, the threshold at ``sparsity`` (of each row's |x|, or with ``shared`` of the rows'
    mean |x|) and the fraction of weight rows some row needs."""
    copies = max(2, math.ceil(3 * l2_bytes / (N * K * 2)))
    ws_row = [torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5 for _ in range(copies)]
    ws_col = [w.t().contiguous().t() for w in ws_row]  # the layout teal gives matched weights
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    a = x.float().abs()
    stat = a.mean(0) if shared else a.flatten()
    t = float(torch.quantile(stat, sparsity)) if sparsity > 0 else 0.0
    needed = float((stat > t).float().mean() if shared else (a > t).any(0).float().mean())
    return ws_row, ws_col, x, t, needed


def check(x, w, t, y, shared: bool = False) -> float:
    ref = reference_sparse_linear(x.double(), w.double(), None, t, shared=shared)
    return float((y.double() - ref).norm() / ref.norm())


def time_sparse(x, ws_col, t, config, sparsity, calls: int, shared: bool = False) -> tuple[float, float]:
    """(µs per call, relative error) of the sparse GEMV over the rotating weights. The expected sparsity picks
    the launch config when ``config`` is None, as the plan's sparsity does in the backend."""
    y = torch.empty(x.shape[0], ws_col[0].shape[0], dtype=x.dtype, device="cuda")
    err = check(x, ws_col[0], t, sg.sparse_gemv(x, ws_col[0], None, t, config=config, sparsity=sparsity,
                                                shared=shared), shared)
    us = graph_time_us([lambda i=i: sg.sparse_gemv(x, ws_col[i % len(ws_col)], None, t, config=config, out=y,
                                                   sparsity=sparsity, shared=shared) for i in range(calls)])
    return us, err


def bench_shape(N, K, M, sparsity, dtype, bw, l2, config=None, calls: int = 32) -> dict:
    """µs of the sparse GEMV (with dependent launches, as the backend runs it on Hopper, and without), cuBLAS
    dense, the roofline."""
    ws_row, ws_col, x, t, needed = make_case(N, K, M, sparsity, dtype, l2)
    sparse, err = time_sparse(x, ws_col, t, config, sparsity, calls)
    with dependent_launches(False):
        plain, _ = time_sparse(x, ws_col, t, config, sparsity, calls)
    dense = graph_time_us([lambda i=i: F.linear(x, ws_row[i % len(ws_row)]) for i in range(calls)])
    roof = needed * N * K * x.element_size() / bw * 1e6
    return dict(us=sparse, plain_us=plain, dense_us=dense, roof_us=roof, frac=roof / sparse, speedup=dense / sparse,
                err=err)


def bench_batch(N: int, K: int, M: int, sparsity: float, shared: bool, bw: float, l2: int, calls: int = 32) -> dict:
    """M rows against one [N, K] bf16 weight: the sparse GEMV with one mask per row (the union of the rows' masks is
    read) or one shared by the batch (the rows' mean |x|, ``shared``), against cuBLAS on the row-major weight and on
    the column-major one teal stores (the dense path the ops dispatch to where the kernel cannot win)."""
    ws_row, ws_col, x, _, _ = make_case(N, K, M, 0.0, torch.bfloat16, l2)
    stat = x.float().abs().mean(0) if shared else x.float().abs().flatten()
    t = float(torch.quantile(stat, sparsity)) if sparsity > 0 else 0.0
    keep = (x.float().abs().mean(0) > t) if shared else (x.float().abs() > t).any(0)
    y = torch.empty(M, N, dtype=x.dtype, device="cuda")
    got = sg.sparse_gemv(x, ws_col[0], None, t, sparsity=sparsity, shared=shared)
    ref = reference_sparse_linear(x.double(), ws_col[0].double(), None, t, shared=shared)
    err = float((got.double() - ref).norm() / ref.norm())
    us = graph_time_us([lambda i=i: sg.sparse_gemv(x, ws_col[i % len(ws_col)], None, t, out=y, sparsity=sparsity,
                                                   shared=shared) for i in range(calls)])
    dense = graph_time_us([lambda i=i: F.linear(x, ws_row[i % len(ws_row)]) for i in range(calls)])
    dense_col = graph_time_us([lambda i=i: F.linear(x, ws_col[i % len(ws_col)]) for i in range(calls)])
    kept = float(keep.float().mean())
    roof = kept * N * K * 2 / bw * 1e6
    return dict(us=us, dense_us=dense, dense_col_us=dense_col, kept=kept, roof_us=roof, err=err)


BATCH_SHAPES = ("qkv 6144x4096", "q/o 4096x4096", "gate+up 28672x4096", "down 4096x14336")


def batch_section(rows_list, sparsities, bw, l2) -> list[str]:
    """The batch rows (issue 26): per-row and shared masks at each batch size and sparsity on the block's launch
    shapes, and per batch size and mask the kept fraction below which the kernel beats cuBLAS (the dispatch rule's
    figures, kernels/sparse_gemv_config.py)."""
    lines = ["## Batches: one mask per row vs one shared by the batch", "",
             "- x: random rows; per row: each row's own threshold at the sparsity, the union of the rows' masks is "
             "read; shared: the threshold of the rows' mean |x|; kept = fraction of weight rows read",
             "- dense: cuBLAS on the row-major weight (Inductor dense) / on the column-major weight teal stores",
             "",
             "| shape (N x K) | batch | mask | sparsity | kept | teal µs | cuBLAS µs | cuBLAS col-major µs | "
             "teal vs cuBLAS | share of roofline | rel. error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = []
    for name in BATCH_SHAPES:
        N, K = SHAPES[name]
        for M in rows_list:
            for shared in (False, True):
                if (not shared and M > sg.MAX_ROWS) or (shared and M == 1):
                    continue
                for s in sparsities:
                    r = bench_batch(N, K, M, s, shared, bw, l2)
                    mask = "shared" if shared else "per row"
                    results.append((name, M, mask, s, r))
                    print(f"batch {name:20s} M={M:2d} {mask:7s} s={s:.2f} kept {r['kept']:.2f}  {r['us']:7.2f} us  "
                          f"cuBLAS {r['dense_us']:7.2f} / col {r['dense_col_us']:7.2f}  x{r['dense_us'] / r['us']:.2f}"
                          f"  err {r['err']:.1e}", flush=True)
                    lines.append(f"| {name} | {M} | {mask} | {s:.2f} | {r['kept']:.2f} | {r['us']:.1f} | "
                                 f"{r['dense_us']:.1f} | {r['dense_col_us']:.1f} | {r['dense_us'] / r['us']:.2f} | "
                                 f"{r['roof_us'] / r['us']:.2f} | {r['err']:.1e} |")
    lines += ["", "Break-even kept fraction (the kept fraction at which teal's µs meets cuBLAS row-major's, linear "
              "between measured points; the smallest over the shapes, and over each shape class of the dispatch rule "
              "(`sparse_gemv_config.BREAK_EVEN_KEPT`); '>1': teal faster even reading every row):", "",
              "| batch | mask | break-even kept fraction | attention | mlp | per shape |",
              "| --- | --- | --- | --- | --- | --- |"]
    for M in rows_list:
        for mask in ("per row", "shared"):
            per_shape = {}
            for name in BATCH_SHAPES:
                pts = sorted((r["kept"], r["us"] / r["dense_us"]) for n, m, k, _, r in results
                             if n == name and m == M and k == mask)
                if pts:
                    per_shape[name] = break_even(pts)
            if per_shape:
                by_class = {c: min((v for n, v in per_shape.items() if shape_class(*SHAPES[n]) == c), default=None)
                            for c in ("attention", "mlp")}
                lines.append(f"| {M} | {mask} | {min(per_shape.values()):.2f} | "
                             + " | ".join("-" if v is None else f"{v:.2f}" for v in by_class.values()) + " | "
                             + ", ".join(f"{n.split()[0]} {v:.2f}" for n, v in per_shape.items()) + " |")
    return lines + [""]


def break_even(points: list[tuple[float, float]]) -> float:
    """The kept fraction below which teal beats cuBLAS, from (kept, teal time / cuBLAS time) points sorted by kept:
    0 if teal is slower at every point, 2 (beyond any kept fraction) if faster at every point, else the first
    crossing of 1, linear between the two points around it."""
    ratios = [r for _, r in points]
    if all(r >= 1.0 for r in ratios):
        return 0.0
    if all(r < 1.0 for r in ratios):
        return 2.0
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if r0 < 1.0 <= r1:
            return k0 + (1.0 - r0) * (k1 - k0) / (r1 - r0)
    return points[0][0]  # faster only at the low end's first point and beyond its last crossing: be conservative


# one Llama-3-8B block: its seven linears (N, K) in the order q, k, v, o, gate, up, down, and the backend's four
# launches (q+k+v, o, gate+up, down)
BLOCK_LINEARS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
BLOCK_GROUPS = [[0, 1, 2], [3], [4, 5], [6]]


def block_weights(shapes, layers: int, dtype, fmt, device: str = "cuda", generator=None) -> list:
    """Each layer's (weight, scales) for the linears of ``shapes``: column-major floats (scales None), or int8/int4
    (kernels/quantize.py). Random, scaled by 1/sqrt(K)."""
    out = []
    for _ in range(layers):
        ws = [(torch.randn(N, K, generator=generator, device=device) / K**0.5).to(dtype) for N, K in shapes]
        out.append([QUANTIZE[fmt](w) for w in ws] if fmt else [(w.t().contiguous().t(), None) for w in ws])
    return out


def bench_block(sparsity: float, dtype, bw: float, l2: int, layers: int = 4, grouped: bool = True,
                fmt=None, x_int8: bool = False, mlp: str = "swiglu") -> dict:
    """One Llama-3-8B block at ``sparsity`` as the backend issues it: grouped, 4 launches (q+k+v, o, gate+up with
    silu(gate) * up formed in the launch, down; passes/group_shared_input.py, passes/fuse_swiglu.py), or one launch
    per linear (7). Each input has its own threshold; each launch takes the launcher's config. ``fmt``: int8/int4
    weights (kernels/quantize.py); ``x_int8``: x rounded to int8, dp4a products (a plan's activations="int8").
    ``mlp`` (grouped): "swiglu" as above; "add_rmsnorm": down with the residual add + RMSNorm finish, as the backend
    issues it after fuse_add_rmsnorm; "folded": gate/up and down as one ``sparse_gemv_mlp_add_rmsnorm`` (the backend's
    fold_swiglu: the SwiGLU finish folded into down); in both, down reads the layer's silu(gate) * up with its
    threshold at that input's quantile (the same rows kept either way). µs per block, however many launches."""
    shapes = BLOCK_LINEARS
    launches = BLOCK_GROUPS if grouped else [[j] for j in range(len(shapes))]
    per_layer = block_weights(shapes, layers, dtype, fmt)
    layer_ws = [[q for q, _ in pairs] for pairs in per_layer]
    layer_ss = [[sc for _, sc in pairs] for pairs in per_layer]
    # one input per launch (members of a group share it), a threshold per linear
    x_of = {}
    for group in launches:
        x = torch.randn(1, shapes[group[0]][1], dtype=dtype, device="cuda")
        for j in group:
            x_of[j] = x
    ts = [float(torch.quantile(x_of[j].float().abs().flatten(), sparsity)) for j in range(len(shapes))]
    outs = [torch.empty(1, N, dtype=dtype, device="cuda") for N, _ in shapes]
    res, nw = torch.randn(1, 4096, dtype=dtype, device="cuda"), torch.rand(4096, dtype=dtype, device="cuda") + 0.5
    calls = []
    for ws, ss in zip(layer_ws, layer_ss):
        if mlp != "swiglu":  # down reads this layer's silu(gate) * up, either way: its threshold is that input's
            act = sg.sparse_gemv_swiglu(x_of[4], ws[4], ws[5], ts[4], ts[5], sparsity=sparsity, scales_gate=ss[4],
                                        scales_up=ss[5])
            t_down = float(torch.quantile(act.float().abs().flatten(), sparsity))
        for group in launches:
            if group == [4, 5] and mlp == "folded":  # gate, up and down: the SwiGLU finish folded into down
                calls.append(lambda ws=ws, ss=ss, td=t_down: sg.sparse_gemv_mlp_add_rmsnorm(
                    x_of[4], ws[4], ws[5], ws[6], ts[4], ts[5], td, res, nw, 1e-5,
                    sparsities=(sparsity, sparsity), scales=(ss[4], ss[5], ss[6])))
                continue
            if group == [6] and mlp == "folded":
                continue
            if group == [6] and mlp == "add_rmsnorm":  # down over the SwiGLU launch's output, as the backend runs it
                calls.append(lambda ws=ws, ss=ss, td=t_down: sg.sparse_gemv_add_rmsnorm(
                    outs[4], ws[6], None, td, res, nw, 1e-5, sparsity=sparsity, scales=ss[6], x_int8=x_int8))
                continue
            if group == [4, 5]:  # gate, up: the SwiGLU launch
                calls.append(lambda ws=ws, ss=ss: sg.sparse_gemv_swiglu(
                    x_of[4], ws[4], ws[5], ts[4], ts[5], out=outs[4], sparsity=sparsity, scales_gate=ss[4],
                    scales_up=ss[5], x_int8=x_int8))
                continue
            calls.append(lambda ws=ws, ss=ss, g=group: sg.sparse_gemv_group(
                x_of[g[0]], [ws[j] for j in g], [None] * len(g), [ts[j] for j in g], outs=[outs[j] for j in g],
                sparsity=sparsity, scales=[ss[j] for j in g], x_int8=x_int8))
    us = graph_time_us(calls) * len(calls) / layers
    per_weight = {None: 2, "int8": 1, "int4": 0.5}[fmt]
    roof = sum((1 - sparsity) * N * K * per_weight for N, K in shapes) / bw * 1e6
    return dict(us=us, roof_us=roof)


_DENSE_US: dict = {}


def bench_quantized(N: int, K: int, M: int, sparsity: float, fmt: str, bw: float, l2: int, config=None,
                    calls: int = 32, x_int8: bool = False) -> dict:
    """µs of the sparse GEMV over ``fmt`` weights (bf16 x; ``x_int8``: rounded to int8, dp4a products), cuBLAS bf16
    dense on the same shape, and the format's roofline: the needed weight rows' bytes (1 or 1/2 byte a weight) plus
    the scales. The error is against fp64 of the kernel's own math (with x_int8: x on its int8 grid)."""
    w = (torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K**0.5)
    q, sc = QUANTIZE[fmt](w)
    copies = max(2, math.ceil(3 * l2 / (q.numel() * q.element_size())))
    qs = [q] + [q.clone() for _ in range(copies - 1)]  # clone keeps the column-major strides
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    t = float(torch.quantile(x.float().abs().flatten(), sparsity)) if sparsity > 0 else 0.0
    needed = float((x.abs() > t).any(0).float().mean())
    y = torch.empty(M, N, dtype=x.dtype, device="cuda")
    got = sg.sparse_gemv(x, q, None, t, config=config, sparsity=sparsity, scales=sc, x_int8=x_int8)
    ref = reference_sparse_linear(x.double(), dequantize(q, sc, torch.float64), None, t, x_int8=x_int8)
    err = float((got.double() - ref).norm() / ref.norm())
    us = graph_time_us([lambda i=i: sg.sparse_gemv(x, qs[i % len(qs)], None, t, config=config, out=y,
                                                   sparsity=sparsity, scales=sc, x_int8=x_int8) for i in range(calls)])
    if (N, K, M) not in _DENSE_US:  # cuBLAS on the same shape, once per shape (a sweep times many configs)
        ws_row = [w] + [torch.randn_like(w) for _ in range(max(2, math.ceil(3 * l2 / (N * K * 2))) - 1)]
        _DENSE_US[N, K, M] = graph_time_us([lambda i=i: F.linear(x, ws_row[i % len(ws_row)]) for i in range(calls)])
    dense = _DENSE_US[N, K, M]
    scale_bytes = N * 2 if fmt == "int8" else -(-K // INT4_GROUP) * N * 2
    roof = (needed * q.numel() * q.element_size() + scale_bytes) / bw * 1e6
    return dict(us=us, dense_us=dense, roof_us=roof, frac=roof / us, speedup=dense / us, err=err)


# int8/int4 weights (--sweep-weights): the in-thread loops with 16 bytes of a row per thread, over every input
SWEEP_QUANTIZED = {
    fmt: [dict(BN=cols * nw, BK=bk, iters=kps // bk, use_dot=False, num_warps=nw, num_stages=1, in_thread=True)
          for nw in (1, 2) for bk in bks for kps in (64, 128, 256)]
    for fmt, cols, bks in (("int8", 512, (16, 32)), ("int4", 1024, (8, 16, 32)))
}
# ... 8 bytes a thread for int8 (twice the warps on the attention shapes, half the work per thread)
SWEEP_QUANTIZED["int8"] += [dict(BN=256, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
                            for bk, it in ((32, 2), (16, 4), (32, 4))]
# int8 may also loop over the packed survivors only, on CUDA cores or gathered into tensor-core tiles (packed_dot, the
# next tile prefetched by hand; fp16 operands with half_dot), or take the tensor cores over every input (rows padded
# to 16). The tensor-core loops lost to the CUDA cores by 1.2-2x on the H200 (docs/perf-log.md v26): their best kept.
SWEEP_QUANTIZED["int8"] += [dict(BN=bn, BK=16, iters=kps // 16, use_dot=False, num_warps=bn // 512, num_stages=1,
                                 compact=True) for bn in (1024, 2048) for kps in (64, 128, 256)]
SWEEP_QUANTIZED["int8"] += [dict(BN=256, BK=32, iters=it, use_dot=True, half_dot=True, num_warps=4, num_stages=st)
                            for it, st in ((4, 2), (8, 3))]
SWEEP_QUANTIZED["int8"] += [dict(BN=bn, BK=bk, iters=16, use_dot=True, packed_dot=True, half_dot=h, num_warps=4,
                                 num_stages=1) for h in (True, False) for bn, bk in ((256, 32), (128, 32), (256, 64))]
# ... 8 bytes a thread for int4 (exact sums 11.5 µs on 4096² at 50%, fp16 sums 7.6: --sweep-weights-math; perf-log v28)
SWEEP_QUANTIZED["int4"] += [dict(BN=512, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
                            for bk, it in ((16, 4), (8, 8))]
# int4 over the packed survivors on CUDA cores: a program's inputs within one scale group (its sum scaled once)
SWEEP_QUANTIZED["int4"] += [dict(BN=1024 * nw, BK=16, iters=it, use_dot=False, num_warps=nw, num_stages=1,
                                 compact=True) for nw in (1, 2) for it in (4, 8)]
# int4 on tensor cores (nibbles converted four to two registers), over every input or the packed survivors: a
# program's inputs within one scale group
SWEEP_QUANTIZED["int4"] += [dict(BN=bn, BK=32, iters=kp // 32, use_dot=True, packed_dot=pk, num_warps=4,
                                 num_stages=1 if pk else 3)
                            for pk in (False, True) for bn in (128, 256) for kp in (64, 128)]

# --sweep-weights-math: the one-row masked in-thread loops with each way of summing a tile (``weight_math``: 0 exact
# fp32, 1 fp32 with the conversion's offset removed per tile, 2 fp16 products; docs/perf-log.md v28)
SWEEP_WEIGHT_MATH = {
    fmt: [dict(BN=bn, BK=bk, iters=it, use_dot=False, num_warps=nw, num_stages=1, in_thread=True, weight_math=wm)
          for wm in (0, 1, 2) for bn, bk, it, nw in tiles]
    for fmt, tiles in (("int8", ((256, 32, 2, 1), (256, 32, 4, 1), (256, 16, 4, 1), (256, 16, 8, 1), (512, 32, 2, 2),
                                 (512, 16, 4, 1))),
                       ("int4", ((1024, 16, 4, 1), (1024, 16, 8, 1), (512, 16, 4, 1), (512, 16, 8, 1), (512, 8, 8, 1),
                                 (1024, 8, 8, 1))))
}

# ... the packed loop with fp16 tile sums (compact, weight_math 2): the masked loop's math on the survivors only (SASS,
# sm_90: ~1.8 instructions a dense weight at 50% in the loop, against the masked loop's ~3.0; perf-log v36)
SWEEP_WEIGHT_MATH["int8"] += [dict(BN=bn, BK=bk, iters=it, use_dot=False, num_warps=nw, num_stages=1, compact=True,
                                   weight_math=2)
                              for bn, bk, it, nw in ((1024, 16, 4, 2), (1024, 8, 8, 2), (1024, 16, 8, 2), (512, 16, 4, 1),
                                                     (2048, 16, 4, 4))]
SWEEP_WEIGHT_MATH["int4"] += [dict(BN=bn, BK=16, iters=it, use_dot=False, num_warps=nw, num_stages=1, compact=True,
                                   weight_math=2)  # a program's inputs in one scale group, or 2-4 whole groups
                              for bn, it, nw in ((1024, 4, 1), (2048, 4, 2), (1024, 8, 1), (2048, 8, 2), (1024, 16, 1),
                                                 (2048, 16, 2), (1024, 32, 1), (2048, 32, 2))]
# ... and int4's nibbles as subnormal halves (weight_math 4: masks instead of permutes; SASS, sm_90: the packed rule
# tile 1649 -> 1032 instructions, the attention shapes' masked 256 x 32 x 2 1002 -> 786; perf-log v43), on the
# rule's tiles and their neighbours
SWEEP_WEIGHT_MATH["int4"] += [dict(BN=bn, BK=16, iters=it, use_dot=False, num_warps=nw, num_stages=1, compact=True,
                                   weight_math=4)
                              for bn, it, nw in ((1024, 4, 1), (2048, 4, 2), (1024, 8, 1), (2048, 8, 2), (4096, 8, 4))]
SWEEP_WEIGHT_MATH["int4"] += [dict(BN=bn, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True,
                                   weight_math=4) for bn, bk, it in ((256, 32, 2), (512, 16, 4), (1024, 16, 4))]
# ... and int8's q + 128 as subnormal halves (the rule's 256 x 32 x 2: 788 -> 677 instructions a tile)
SWEEP_WEIGHT_MATH["int8"] += [dict(BN=bn, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True,
                                   weight_math=4) for bn, bk, it in ((256, 32, 2), (256, 32, 4), (512, 16, 4))]
# ... and the rules' masked 256-column warps two or four to a program: a half or a quarter of the programs, where a
# launch of ~1500 one-warp programs costs ~5-6 µs with no row kept (H100, docs/perf-log.md v48)
for _fmt in ("int8", "int4"):
    for _wm, _nw, _it in itertools.product((2, 4), (2, 4), (2, 4)):
        _p = dict(BN=256 * _nw, BK=32, iters=_it, use_dot=False, num_warps=_nw, num_stages=1, in_thread=True,
                  weight_math=_wm)
        if _p not in SWEEP_WEIGHT_MATH[_fmt]:  # int8's 512 x 32 x 2 with 2 warps is swept above
            SWEEP_WEIGHT_MATH[_fmt].append(_p)

# ... and x rounded to int8 (weight_math 3, dp4a; timed with x_int8): 8 or 16 bytes of a row a thread, a program's
# inputs whole tiles of 32 (docs/perf-log.md v32)
for _fmt, _tiles in (("int8", ((512, 8, 8), (512, 16, 4), (256, 32, 2), (512, 32, 2), (1024, 16, 4))),
                     ("int4", ((1024, 32, 2), (1024, 16, 4), (1024, 8, 8), (512, 32, 2), (512, 16, 4)))):
    SWEEP_WEIGHT_MATH[_fmt] += [dict(BN=bn, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True,
                                     weight_math=3) for bn, bk, it in _tiles]

# --sweep-shared: a batch with one mask (2-16 rows, padded to 16 on tensor cores): every input walked with the weight
# rows no row needs left unread (x requested a tile ahead of the mask it sets), the packed survivors gathered (their
# indices a tile ahead), or (up to 8 rows) the in-thread rows loop on CUDA cores (docs/perf-log.md v29)
SWEEP_SHARED = (
    [dict(BN=bn, BK=bk, iters=it, use_dot=True, num_warps=4, num_stages=st)
     for bn in (128, 256) for bk in (32, 64) for it in (4, 8, 16) for st in (2, 3, 4)
     if not (bn == 256 and bk == 64 and st == 4)]  # out of shared memory
    + [dict(BN=512, BK=16, iters=it, use_dot=True, num_warps=nw, num_stages=3) for it in (8, 16) for nw in (4, 8)]
    # the packed loop (x columns packed with the indices; perf-log v29), tiles screened on SASS: none spills
    + [dict(BN=bn, BK=bk, iters=it, use_dot=True, num_warps=nw, num_stages=st, packed_dot=True)
       for bn, nw in ((128, 4), (256, 4), (256, 8), (512, 8)) for bk in (32, 64) for it in (8, 16) for st in (3, 4)]
    # ... and longer programs for the MLP shapes (v30: the largest tiles swept did best)
    + [dict(BN=bn, BK=64, iters=32, use_dot=True, num_warps=nw, num_stages=3, packed_dot=True)
       for bn, nw in ((256, 4), (512, 8))]
    + [dict(BN=256, BK=128, iters=it, use_dot=True, num_warps=8, num_stages=st, packed_dot=True)
       for it in (8, 16) for st in (2, 3)]
    + [dict(BN=256, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
       for bk in (8, 16) for it in (8, 16)]
)

SWEEP = (  # loop over every input, [BK, BN] FMAs reduced after the loop ...
    [dict(BN=128, BK=64, iters=it, use_dot=False, num_warps=4, num_stages=1) for it in (4, 8, 16)]
    # ... the same with BN = 256 * num_warps, so the sum over BK stays in-thread, over every input or (compact)
    # over the packed surviving inputs only
    + [dict(BN=256 * nw, BK=16, iters=kps // 16, use_dot=False, num_warps=nw, num_stages=1, compact=c, in_thread=True)
       for c in (False, True) for nw in (1, 2, 4) for kps in (64, 128, 256)]
    # ... shorter programs (more of them) for the small shapes
    + [dict(BN=256, BK=16, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True) for it in (1, 2)]
    # ... 32-row tiles (a thread issues a tile's 32 loads at once; 162 registers), and 8-row tiles for
    # batches (a thread sums rows x 8 inputs x 8 columns: half the registers of 16 inputs)
    + [dict(BN=256, BK=bk, iters=it, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
       for bk, its in ((32, (1, 2, 4, 8)), (8, (8, 16))) for it in its]
    # ... and the tensor-core path (rows padded to 16), whose weight tiles Triton stages through shared memory
    + [dict(BN=128, BK=32, iters=it, use_dot=True, num_warps=4, num_stages=3) for it in (8, 16)]
)
# batches (--sweep-batch > 1): the one-warp in-thread loops above, and a grid of tensor-core tiles
SWEEP_BATCH = (
    [p for p in SWEEP if p.get("in_thread") and not p.get("compact") and p["num_warps"] == 1]
    + [dict(BN=bn, BK=bk, iters=it, use_dot=True, num_warps=nw, num_stages=st)
       for bn in (64, 128, 256) for bk in (32, 64) for it in (4, 8, 16) for nw in (4, 8) for st in (3, 4)
       if not (bn == 256 and bk == 64 and st == 4)]  # out of shared memory
)


_PTR_TYPES = {"x_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
              "idx_ptr": "*i32", "xv_ptr": "*fp32", "s_ptr": "*bf16", "g_ptr": "*fp32", "u_ptr": "*fp32"}


def registers(fmt: str, N: int, K: int, cfg, x_swiglu: bool = False) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of the one-row GEMV kernel for ``cfg`` on sm_90, as ptxas reports
    them: compiled here, no GPU needed (Triton's bundled ptxas). One segment, bf16 x, PDL and the apart finish, the
    16-byte divisibility the launcher's tensors have; ``x_swiglu``: x formed from gate/up sums (the folded MLP's
    down launch). Triton's compile API differs between versions: a tool for screening configs before spending
    device time, not a figure of speed."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from teal_fx.kernels import sparse_gemv_triton as jit

    fn = jit.sparse_gemv_kernel
    const = dict(SPLIT_K=cfg.split_k, BM=16 if cfg.use_dot else 1, BN=cfg.block_n, BK=cfg.block_k, HAS_BIAS=False,
                 USE_DOT=cfg.use_dot, IEEE=False, UPCAST=False, EVEN_N=N % cfg.block_n == 0,
                 EVEN_K=K % cfg.k_per_split == 0, IN_THREAD=cfg.in_thread, COMPACT=cfg.compact, CHUNK=cfg.chunk,
                 NSEG=1, GATED=False, PDL=True, APART=True, WFMT={None: 0, "int8": 1, "int4": 2}[fmt], GROUP=INT4_GROUP,
                 HALF_DOT=cfg.half_dot, SHARED=False, ASM=True, WMATH=cfg.weight_math, X_SWIGLU=x_swiglu,
                 X_MERGE=False, NSPLIT=1, G=1, GP=1, D=1, DP=1)
    sig, constexprs, attrs = {}, {}, {}
    for i, prm in enumerate(fn.params):
        n = prm.name
        if prm.is_constexpr:
            sig[n], constexprs[n] = "constexpr", const[n]
        elif n == "stride_wn":  # 1 for a column-major weight, and Triton makes an argument equal to 1 a constant:
            # without it the weight loads come out a byte each (the v26 figures, taken so, were wrong; perf-log v28)
            sig[n], constexprs[n] = "constexpr", 1
        elif n[-5:-4].isdigit() or n[-4:] in ("1_ptr", "2_ptr"):  # the other segments' pointers: None
            sig[n], constexprs[n] = "constexpr", None
        elif n in ("g_ptr", "u_ptr", "stride_gm") and not x_swiglu:
            sig[n], constexprs[n] = "constexpr", None if n.endswith("_ptr") else 0
        elif n in ("acc_ptr", "ml_ptr", "HKV"):  # x merged from an attention's splits: not screened here
            sig[n], constexprs[n] = "constexpr", None if n.endswith("_ptr") else 1
        elif n.endswith("_ptr"):
            sig[n] = {"int8": "*i8", "int4": "*u8"}.get(fmt, "*bf16") if n == "w_ptr" else _PTR_TYPES[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "fp32" if n.startswith("threshold") else "i32"
            if n in ("K", "N", "stride_xm", "stride_wk", "stride_ym", "K_PER_SPLIT", "stride_gm"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # first the ptxas Triton compiles with (it chose the PTX version: a CUDA 13 torch's can be newer than the bundled
    # ptxas, which then refuses it), then the bundled ones, newest first (ptxas-blackwell reads newer PTX versions)
    tools = sorted(bin_dir.glob("ptxas*"), reverse=True)
    try:
        from triton.backends.nvidia import compiler as nvidia

        try:
            tools.insert(0, Path(nvidia.get_ptxas(90).path))  # newer Tritons take the arch
        except TypeError:
            tools.insert(0, Path(nvidia.get_ptxas().path))
    except Exception:  # an older Triton without the helper: the bundled ones
        pass
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        for ptxas in tools:
            out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                 text=True)
            regs = re.search(r"Used (\d+) registers", out.stderr + out.stdout)
            if regs:
                spill = re.search(r"(\d+) bytes spill stores", out.stderr + out.stdout)
                return int(regs.group(1)), int(spill.group(1)) if spill else 0
    finally:
        os.unlink(f.name)
    raise RuntimeError(f"ptxas gave no register count: {(out.stderr + out.stdout)[-300:]}")


def sweep_shape(N: int, K: int, M: int, sparsity: float, bw: float, l2: int, configs: list,
                shared: bool = False) -> list:
    """µs of each launch config on one shape (one weight set for all configs; configs Triton cannot build are
    left out), fastest first."""
    _, ws_col, x, t, needed = make_case(N, K, M, sparsity, torch.bfloat16, l2, shared)
    roof = needed * N * K * 2 / bw * 1e6
    res = []
    for p in configs:
        cfg = make_config(N, K, **p) if p else None  # None: the launcher's own choice for this sparsity
        try:
            us, err = time_sparse(x, ws_col, t, cfg, sparsity, calls=16, shared=shared)
        except Exception as e:  # a config Triton cannot build (e.g. out of shared memory)
            print(f"   skipped {p}: {type(e).__name__}", flush=True)
            continue
        res.append((us, p, cfg, err, roof / us))
    res.sort(key=lambda z: z[0])
    return res


def _format(label: str) -> tuple:
    """--weights entry -> (weight format, x_int8): 'int8', 'int4', or either + '+x8' (a plan's activations="int8")."""
    fmt, _, x = label.partition("+")
    if fmt not in QUANTIZE or x not in ("", "x8"):
        raise SystemExit(f"--weights: {label!r} is not int8, int4, int8+x8 or int4+x8")
    return fmt, x == "x8"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bf16 at 0 and 50%% only")
    ap.add_argument("--sweep", action="store_true", help="search tile configs on the main shapes at 50%%")
    ap.add_argument("--out", help="default: examples/results/kernels_<gpu>.md (kernels_h100.md on an H100)")
    ap.add_argument("--sweep-shapes", default="q/o 4096x4096,gate/up 14336x4096,down 4096x14336")
    ap.add_argument("--sweep-batch", type=int, default=1)
    ap.add_argument("--sweep-shared", action="store_true", help="with --sweep and --sweep-batch > 1: one mask for the "
                    "batch (the rows' mean |x|), the tensor-core loops over every input (masked) and over the packed "
                    "survivors, against cuBLAS")
    ap.add_argument("--sweep-sparsity", default="0.5", help="comma-separated sparsities")
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep (--sweep or --sweep-weights)")
    ap.add_argument("--sweep-kind", choices=("all", "in-thread", "compact", "packed"), default="all",
                    help="sweep only the one-warp loops over every input, only the packed loops (compact), or "
                    "with --sweep-shared only the packed tensor-core loops")
    ap.add_argument("--weights", default="int8,int4",
                    help="quantized formats measured at 0 and 50%% ('' for none; 'int4+x8': x rounded to int8 too)")
    ap.add_argument("--sweep-weights", action="store_true", help="sweep tile configs of the quantized formats")
    ap.add_argument("--sweep-weights-sparsity", type=float, default=0.5)
    ap.add_argument("--sweep-weights-math", action="store_true",
                    help="with --sweep-weights: only the one-row in-thread loops by weight_math (masked: 0-4; packed: "
                    "2, 4)")
    ap.add_argument("--sweep-math-only", default="",
                    help="with --sweep-weights-math: only these weight_math values (comma-separated, e.g. 2,4)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="the bf16/fp16 rows")
    ap.add_argument("--block-mlp", action="store_true", help="the quantized blocks' MLP also with down's add + "
                    "RMSNorm finish, unfolded and folded (fold_swiglu: the SwiGLU finish in the down launch), side "
                    "by side")
    ap.add_argument("--batches", default="", help="batch rows: comma-separated batch sizes (e.g. 1,2,4,8,16), per-row "
                    "and shared masks on the block's launch shapes, and the break-even kept fractions")
    ap.add_argument("--batch-sparsities", default="0,0.25,0.5,0.75")
    ap.add_argument("--batch-only", action="store_true", help="stop after the batch rows")
    ap.add_argument("--registers", action="store_true", help="no GPU needed: the registers and spills ptxas reports "
                    "for each one-row config of --sweep-weights (or --sweep-weights-math; sm_90, the MLP shape "
                    "14336x4096), then stop")
    add_rule_arguments(ap)
    args = ap.parse_args()
    try:
        rule_switches = apply_rule_arguments(args)
    except ValueError as e:
        ap.error(str(e))
    if rule_switches:
        print(f"rule switches: {rule_switches}", flush=True)
    math_only = {int(v) for v in args.sweep_math_only.split(",") if v}
    if args.registers:
        N, K = SHAPES["gate/up 14336x4096"]
        for fmt in [f for f in args.weights.split(",") if f]:
            for p in (SWEEP_WEIGHT_MATH if args.sweep_weights_math else SWEEP_QUANTIZED)[fmt]:
                if math_only and p.get("weight_math") not in math_only:
                    continue
                try:
                    regs, spill = registers(fmt, N, K, make_config(N, K, **p))
                except Exception as e:  # a config this Triton cannot build
                    print(f"{fmt} {p}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                print(f"{fmt} {regs:4d} registers, {spill:6d} bytes spilled  {p}", flush=True)
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    args.out = args.out or default_out("kernels")
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    bw = read_bandwidth()
    print(f"{props.name}: read bandwidth {bw / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB", flush=True)

    if args.sweep and args.sweep_shared:
        for name, sp in [(n, float(v)) for v in args.sweep_sparsity.split(",") for n in args.sweep_shapes.split(",")]:
            N, K = SHAPES[name]
            M = args.sweep_batch
            configs = [p for p in SWEEP_SHARED if p["use_dot"] or M <= 8]  # in-thread rows: up to 8
            if args.sweep_kind == "packed":  # and the masked loop's 256 x 32 tiles, to compare
                configs = [p for p in configs if p.get("packed_dot") or (p["use_dot"] and p["BN"] == 256
                                                                         and p["BK"] == 32 and p["num_stages"] == 3)]
            res = sweep_shape(N, K, M, sp, bw, l2, configs, shared=True)
            ws_row, _, x, _, _ = make_case(N, K, M, 0.0, torch.bfloat16, l2)
            dense = graph_time_us([lambda i=i, x=x, ws=ws_row: F.linear(x, ws[i % len(ws)]) for i in range(16)])
            default = sweep_shape(N, K, M, sp, bw, l2, [None], shared=True)[0][0]
            print(f"sweep shared {name} M={M} @{sp:.0%} bf16 ({len(res)} configs): cuBLAS {dense:.2f} us, "
                  f"default {default:.2f} us; best:", flush=True)
            for loop in ("masked", "packed", "in-thread"):
                for us, p, cfg, err, frac in [z for z in res if loop == ("packed" if z[1].get("packed_dot") else
                                                                          "masked" if z[1]["use_dot"] else
                                                                          "in-thread")][:6]:
                    print(f"   {us:7.2f} us  x{dense / us:.2f} cuBLAS  frac {frac:.2f}  {p}  split={cfg.split_k} "
                          f"err={err:.1e}", flush=True)
        if args.sweep_only:
            return 0
    if args.sweep:
        for name, sp in [(n, float(v)) for v in args.sweep_sparsity.split(",") for n in args.sweep_shapes.split(",")]:
            N, K = SHAPES[name]
            configs = SWEEP if args.sweep_batch == 1 else SWEEP_BATCH
            if args.sweep_kind == "in-thread":
                configs = [p for p in configs if p.get("in_thread") and not p.get("compact") and p["num_warps"] == 1]
            elif args.sweep_kind == "compact":
                configs = [p for p in configs if p.get("compact")]
            res = sweep_shape(N, K, args.sweep_batch, sp, bw, l2, configs)
            print(f"sweep {name} M={args.sweep_batch} @{sp:.0%} bf16 ({len(res)} configs), "
                  f"default {sweep_shape(N, K, args.sweep_batch, sp, bw, l2, [None])[0][0]:.2f} us; best:",
                  flush=True)
            for kind in (lambda p: not p["use_dot"] and not p.get("in_thread"),
                         lambda p: p.get("in_thread") and not p.get("compact"), lambda p: p.get("compact"),
                         lambda p: p["use_dot"]):
                for us, p, cfg, err, frac in [z for z in res if kind(z[1])][:3 if args.sweep_kind == "all" else None]:
                    print(f"   {us:7.2f} us  frac {frac:.2f}  {p}  split={cfg.split_k} err={err:.1e}", flush=True)
        if args.sweep_only:
            return 0

    batch_lines = []
    if args.batches:
        batch_lines = batch_section([int(b) for b in args.batches.split(",")],
                                    [float(v) for v in args.batch_sparsities.split(",")], bw, l2)
        if args.batch_only:
            write_table(args.out, props, l2, bw, batch_lines)
            return 0

    formats = [f for f in args.weights.split(",") if f]
    if args.sweep_weights:
        for fmt in formats:
            for name in args.sweep_shapes.split(","):
                N, K = {**SHAPES, **LM_HEAD_SHAPE}[name]
                res = []
                sweep = SWEEP_WEIGHT_MATH if args.sweep_weights_math else SWEEP_QUANTIZED
                for p in [None, *[p for p in sweep[fmt] if not math_only or p.get("weight_math") in math_only]]:
                    cfg = make_config(N, K, **p) if p else None
                    try:
                        r = bench_quantized(N, K, 1, args.sweep_weights_sparsity, fmt, bw, l2, config=cfg, calls=16,
                                            x_int8=bool(p and p.get("weight_math") == 3))
                    except Exception as e:  # a config Triton cannot build
                        print(f"   skipped {p}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    res.append((r["us"], p, r["frac"], r["err"]))
                res.sort(key=lambda z: z[0])
                print(f"sweep {fmt} {name} M=1 @{args.sweep_weights_sparsity:.0%}, the best 3 of each loop:", flush=True)
                loops = {}
                for z in res:
                    p = z[1] or {}
                    loop = (("packed " if p.get("compact") or p.get("packed_dot") else "masked ")
                            + ("fp16 dot" if p.get("half_dot") else "dot" if p.get("use_dot") else "CUDA cores")
                            + (f" math {p['weight_math']}" if p.get("weight_math") is not None else ""))
                    loops.setdefault("default" if z[1] is None else loop, []).append(z)
                for loop, zs in loops.items():
                    for us, p, frac, err in zs[:3]:
                        print(f"   {us:7.2f} us  frac {frac:.2f}  {loop:18s} {p or ''}  err={err:.1e}", flush=True)
        if args.sweep_only:
            return 0
    qrows = []
    for fmt in formats:
        for name, (N, K) in SHAPES.items():
            for s in (0.0, 0.5):
                wfmt, x8 = _format(fmt)
                r = bench_quantized(N, K, 1, s, wfmt, bw, l2, x_int8=x8)
                qrows.append((fmt, name, 1, s, r))
                print(f"{fmt} {name:20s} M=1 s={s:.2f}  {r['us']:7.2f} us  bf16 dense {r['dense_us']:7.2f}  roof "
                      f"{r['roof_us']:6.2f}  frac {r['frac']:.2f}  x{r['speedup']:.2f}  err {r['err']:.1e}", flush=True)
    qblocks = {(fmt, s): bench_block(s, torch.bfloat16, bw, l2, fmt=_format(fmt)[0], x_int8=_format(fmt)[1])
               for fmt in formats for s in (0.0, 0.5)}
    for (fmt, s), b in qblocks.items():
        print(f"Llama-3-8B block @{s:.0%} {fmt}: {b['us']:.1f} us, roofline {b['roof_us']:.1f} us", flush=True)
    mlp_blocks = []  # A / B / A: unfolded, folded, unfolded again (the spread of two unfolded runs is the noise)
    for fmt in [f for f in formats if not _format(f)[1]] if args.block_mlp else []:
        for s in (0.0, 0.5):
            for mlp in ("add_rmsnorm", "folded", "add_rmsnorm"):
                mlp_blocks.append((fmt, s, mlp, bench_block(s, torch.bfloat16, bw, l2, fmt=fmt, mlp=mlp)["us"]))
                print(f"Llama-3-8B block @{s:.0%} {fmt}, MLP {mlp}: {mlp_blocks[-1][3]:.1f} us", flush=True)

    dtypes = ([torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]) if args.bf16 else []
    sparsities = (0.0, 0.5) if args.quick else SPARSITIES
    rows = []
    for dtype in dtypes:
        for name, (N, K) in SHAPES.items():
            for s in sparsities:
                r = bench_shape(N, K, 1, s, dtype, bw, l2)
                rows.append((str(dtype).split(".")[-1], name, 1, s, r))
                print(f"{rows[-1][0]:8s} {name:20s} M=1 s={s:.2f}  {r['us']:7.2f} us (no PDL {r['plain_us']:7.2f})  "
                      f"dense {r['dense_us']:7.2f}  "
                      f"roof {r['roof_us']:6.2f}  frac {r['frac']:.2f}  x{r['speedup']:.2f}  err {r['err']:.1e}", flush=True)
        if dtype == torch.bfloat16:
            for name in ("q/o 4096x4096", "gate/up 14336x4096", "down 4096x14336"):
                N, K = SHAPES[name]
                for M in (2, 4, 8):
                    r = bench_shape(N, K, M, 0.5, dtype, bw, l2)
                    rows.append(("bfloat16", name, M, 0.5, r))
                    print(f"bfloat16 {name:20s} M={M} s=0.50  {r['us']:7.2f} us (no PDL {r['plain_us']:7.2f})  "
                          f"dense {r['dense_us']:7.2f}  "
                          f"roof {r['roof_us']:6.2f}  frac {r['frac']:.2f}  x{r['speedup']:.2f}  err {r['err']:.1e}", flush=True)
    block = bench_block(0.5, torch.bfloat16, bw, l2, grouped=True)
    block7 = bench_block(0.5, torch.bfloat16, bw, l2, grouped=False)
    with dependent_launches(False):
        block_plain = bench_block(0.5, torch.bfloat16, bw, l2, grouped=True)
    print(f"Llama-3-8B block @50% bf16: grouped (4 launches) {block['us']:.1f} us ({block_plain['us']:.1f} without "
          f"PDL), 7 launches {block7['us']:.1f} us, roofline {block['roof_us']:.1f} us", flush=True)
    if qrows:
        bf16_block = {s: bench_block(s, torch.bfloat16, bw, l2)["us"] for s in (0.0, 0.5)}

    lines = [
        "# Sparse GEMV kernel benchmark",
        "",
        f"- date: {datetime.date.today()}; GPU: {props.name} ({props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB)",
        f"- torch {torch.__version__}, triton {__import__('triton').__version__}, python {platform.python_version()}",
        f"- read bandwidth measured in this run: {bw / 1e12:.2f} TB/s (bf16 sum over 4 GiB)",
        "- µs per call in a CUDA graph of 32 calls over rotating weights (> L2); roofline = bytes of the weight rows "
        "some row of x needs / that bandwidth; dense = F.linear (cuBLAS) on a row-major weight.",
        "- teal µs: launched as the backend launches on Hopper, with programmatic dependent launch (a call's launch "
        "and ramp overlap the previous call's tail; kernels/pdl.py); 'no PDL': the same kernel launched plainly, "
        "as cuBLAS is. Share of roofline and speedup use the first.",
        "",
        "| dtype | shape (N x K) | batch | sparsity | teal µs | teal µs, no PDL | cuBLAS dense µs | roofline µs | "
        "share of roofline | speedup vs dense | rel. error vs fp64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dt, name, M, s, r in rows:
        lines.append(f"| {dt} | {name} | {M} | {s:.2f} | {r['us']:.1f} | {r['plain_us']:.1f} | {r['dense_us']:.1f} | "
                     f"{r['roof_us']:.1f} | {r['frac']:.2f} | {r['speedup']:.2f} | {r['err']:.1e} |")
    lines += ["", f"One Llama-3-8B block at 50%, bf16, grouped as the backend issues it (q+k+v, o, gate+up with "
                  f"silu(gate) * up, down: 4 launches): **{block['us']:.1f} µs** ({block_plain['us']:.1f} µs without "
                  f"PDL); as 7 launches: {block7['us']:.1f} µs (roofline {block['roof_us']:.1f} µs; reference TEAL "
                  f"100.9 µs on the H100 of ANCHORS.md).", ""]
    if qrows:
        lines += ["## Quantized weights (bf16 x; kernels/quantize.py: int8 per output channel, int4 symmetric in "
                  f"groups of {INT4_GROUP} along K; '+x8': x rounded to int8 per 32 inputs, dp4a products)", "",
                  "- roofline: the needed rows' bytes (1 byte a weight for int8, 1/2 for int4) plus the scales, at the "
                  "bandwidth above; 'vs bf16 dense': cuBLAS on the bf16 weight of the same shape",
                  "",
                  "| format | shape (N x K) | batch | sparsity | teal µs | bf16 cuBLAS dense µs | roofline µs | "
                  "share of roofline | speedup vs bf16 dense | rel. error vs fp64 of the dequantized weight (+x8: and of x's "
                  "int8 grid) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for fmt, name, M, s, r in qrows:
            lines.append(f"| {fmt} | {name} | {M} | {s:.2f} | {r['us']:.1f} | {r['dense_us']:.1f} | {r['roof_us']:.1f} | "
                         f"{r['frac']:.2f} | {r['speedup']:.2f} | {r['err']:.1e} |")
        lines += ["", "One Llama-3-8B block, grouped as the backend issues it (4 launches):", "",
                  "| weights | sparsity | µs | roofline µs | share of roofline | vs bf16 block at that sparsity |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for (fmt, s), b in qblocks.items():
            lines.append(f"| {fmt} | {s:.2f} | {b['us']:.1f} | {b['roof_us']:.1f} | {b['roof_us'] / b['us']:.2f} | "
                         f"{bf16_block[s] / b['us']:.2f}x |")
        lines.append("")
    if mlp_blocks:
        lines += ["The block with down's add + RMSNorm finish, its MLP unfolded (swiglu, then down: 4 launches) and "
                  "folded (fold_swiglu: 3), in the order run:", "", "| weights | sparsity | MLP | µs |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {fmt} | {s:.2f} | {mlp} | {us:.1f} |" for fmt, s, mlp, us in mlp_blocks]
        lines.append("")
    lines += batch_lines
    if rule_switches:
        lines += [f"Rule switched for this run: {rule_switches}", ""]
    lines += [f"Command: `{shlex.join(['python', 'examples/bench_kernels.py', *sys.argv[1:]])}`", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


def write_table(path: str, props, l2: int, bw: float, body: list[str]) -> None:
    lines = ["# Sparse GEMV kernel benchmark", "",
             f"- date: {datetime.date.today()}; GPU: {props.name} ({props.multi_processor_count} SMs, L2 "
             f"{l2 / 2**20:.0f} MiB); torch {torch.__version__}, triton {__import__('triton').__version__}",
             f"- read bandwidth measured in this run: {bw / 1e12:.2f} TB/s; µs per call in a CUDA graph of 32 calls "
             "over rotating weights (> L2), teal launched with programmatic dependent launch as the backend does", "",
             *body, f"Command: `{shlex.join(['python', 'examples/bench_kernels.py', *sys.argv[1:]])}`", ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
