"""The sparse GEMV's launch configuration: a typed value, and the rule that picks it per shape and sparsity.

The rule comes from sweeps on the H100 (docs/design.md, "Sparse GEMV: tiles and loops"); ``make_config`` builds any
other candidate, which the benchmark's sweep and the tests use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from teal_fx.kernels.triton_support import next_pow2

# the fp16 tile sums the one-row rule takes: 2 (integers converted by permutes) or 4 (as subnormal halves: fewer
# instructions, sums ~1.5x coarser; docs/perf-log.md v43). The MLP shapes take 4 (H200 at 50%: int4 packed gate+up
# 14.3 µs against 17.7, down 10.0 / 12.0; int8 masked 256 x 32 x 4 19.4 / 20.2, 12.2 / 12.5; v46); the attention
# shapes too since v52 (H100 at 50%, the same 256 x 32 x 2 tiles: int4 q+k+v 7.07 µs against 7.54, q/o 6.26 / 6.67;
# int8 7.68 / 7.80, 6.81 / 7.03; decode int4 + 50% +2.1%, int8 +1.1%). Kept apart for --tile-math A/B runs
MLP_TILE_MATH = 4
INT4_TILE_MATH = 4
INT8_TILE_MATH = 4


# one wave of int4's int8-x programs: 8 one-warp programs an SM (255 registers each) on 132 SMs (H100, H200)
INT4_X8_WAVE = 8 * 132


@dataclass(frozen=True)
class GemvConfig:
    """How one sparse GEMV launch is tiled: a (N / block_n) x split_k grid, each program ``k_per_split`` inputs."""

    block_n: int  # columns of W per program (BN)
    block_k: int  # inputs per tile (BK)
    split_k: int  # programs along K; their fp32 partials meet in the workspace
    k_per_split: int  # inputs per program: block_k x tiles per program
    use_dot: bool  # tensor cores, rows padded to 16 (5-8 rows)
    num_warps: int
    num_stages: int
    in_thread: bool  # each thread owns whole columns of a tile, so a tile's sum stays in the thread
    compact: bool  # loop over the packed surviving inputs only: one row (implies in_thread), or with use_dot a
    # shared mask's rows or one row (the survivors gathered into tensor-core tiles)
    chunk: int  # the packed loop's scan width, next_pow2(k_per_split)
    apart: Optional[bool] = None  # split-K sums finished by a second launch; None: where launches overlap (PDL)
    half_dot: bool = False  # int8 only, with use_dot: fp16 tensor-core operands (the kernel's HALF_DOT)
    weight_math: int = 0  # int8/int4, one row, masked in-thread loop: 0 exact fp32 sums; 1 fp32 with the conversion's
    # offset removed once per tile; 2 fp16 products and tile sums (the kernel's ``tile_sum``; also over the packed
    # survivors, compact); 3 x quantized to int8 per 32 inputs, int32 dp4a products (``w8a8_partial``: a different
    # result, taken only with the launcher's x_int8); 4 as 2 with the unsigned integers as subnormal halves (masks,
    # no permutes: int4's packed loop ~37% fewer instructions; the rule since v46/v52: docs/perf-log.md v43). (5, a
    # stored row at a time in inline PTX, was timed slower and summed wrong on a GPU: removed, v53.)


def make_config(N: int, K: int, *, BN: int, BK: int, iters: int, use_dot: bool, num_warps: int = 4,
                num_stages: int = 2, compact: bool = False, in_thread: bool = False,
                half_dot: bool = False, packed_dot: bool = False, weight_math: int = 0) -> GemvConfig:
    """[BK, BN] tiles, each program covering ``iters`` of them along K (so K is split in ceil(K / (BK * iters))
    parts). ``in_thread`` sums each tile inside the threads (BN should be 256 * num_warps; up to 8 rows, 2-4 in
    practice), ``compact`` (one row; implies it) loops over the packed surviving inputs only; ``packed_dot`` (with
    ``use_dot``; a shared mask's rows or one row) gathers the packed survivors into tensor-core tiles."""
    k_per = BK * iters
    return GemvConfig(block_n=min(BN, max(16, next_pow2(N))), block_k=BK, split_k=-(-K // k_per), k_per_split=k_per,
                      use_dot=use_dot, num_warps=num_warps, num_stages=num_stages,
                      in_thread=(in_thread or compact) and not use_dot,
                      compact=(compact and not use_dot) or (packed_dot and use_dot),
                      chunk=next_pow2(k_per), half_dot=half_dot and use_dot, weight_math=weight_math)


def _mlp_sized(N: int, K: int) -> bool:
    """Whether a one-warp grid of 256 x 16 tiles has >= 8000 of them: the MLP shapes (gate/up, down, gate+up) but
    not the attention ones (4096x4096, q+k+v), which the sweeps tile differently."""
    return (N // 256) * (K // 16) >= 8000


def tile_math(fmt: str, N: int, K: int) -> int:
    """The fp16 tile sums (``weight_math`` 2 or 4) of one row's rule for ``fmt`` weights of an [N, K] launch."""
    return MLP_TILE_MATH if _mlp_sized(N, K) else INT4_TILE_MATH if fmt == "int4" else INT8_TILE_MATH


def compact_from(N: int, K: int) -> float:
    """The expected sparsity from which one row loops over the packed survivors only: where the rows it skips repay
    the packing's fixed cost (x, a scan, a scratch round trip). Timed per shape with dependent launches: on the MLP
    shapes the masked loop is faster up to 0.65 and even at 0.7; on the attention shapes (fewer programs) up to
    0.8, the packed loop ahead only at 0.9 (docs/design.md, "Sparse GEMV: tiles and loops")."""
    return 0.7 if _mlp_sized(N, K) else 0.85


def int4_packed_from(N: int, K: int) -> float:
    """int4, one row, the MLP shapes: the expected sparsity from which the packed loop with fp16 tile sums beats the
    masked loop. int4's masked loop is bound by issuing its per-nibble instructions, so packing pays far earlier than
    for bf16 (``compact_from``) or int8 (where it never did). Against the masked 256 x 32 tiles with weight_math 4
    (H100 sweep, docs/perf-log.md v47): gate+up ahead at 40% (18.6 vs 19.1 µs), behind at 25% (21.8 vs 20.5); down
    ahead at 50% (11.1 vs 11.6), behind at 40% (12.4 vs 12.1)."""
    return 0.35 if N > K else 0.45


def choose_config(M: int, N: int, K: int, sparsity: Optional[float] = None,
                  weight_format: Optional[str] = None, shared: bool = False, x_int8: bool = False) -> GemvConfig:
    """The launch config for M rows of x against a [N, K] weight (N summed over a grouped launch's segments).
    ``sparsity``: the fraction of inputs the threshold is expected to drop (None or < 0: unknown);
    ``weight_format``: None (float, as x), "int8" or "int4" (kernels/quantize.py); ``shared``: one mask for the
    M rows (a plan's batch_mask="shared"); ``x_int8``: x quantized to int8 (one row, int8/int4 weights)."""
    if x_int8:
        if weight_format is None or M != 1:
            raise ValueError("x_int8 takes one row against int8/int4 weights")
        mlp = _mlp_sized(N, K)
        # the masked dp4a loop (``w8a8_partial``), 16 bytes of a row a thread except int8 on the attention shapes (8).
        # H200 (docs/perf-log.md v32, v33): int4 gate/up 11.0 µs at 50% (its fp-x rule 13.3), q+k+v 7.0 (9.2). 4 tiles
        # a program where 2 would need more than one wave of one-warp programs (int4's loop holds 255 registers: 8 an
        # SM): the block's gate+up 19.2 -> 18.0 µs; int8's down 12.4 -> 11.8
        if weight_format == "int4":
            if mlp:
                BN, BK, iters = 1024, 32, 4 if -(-N // 1024) * -(-K // 64) > INT4_X8_WAVE else 2
            else:
                BN, BK, iters = 512, 32, 2
        elif mlp:
            BN, BK, iters = (512, 32, 4) if K > N else (512, 8, 8)
        else:
            BN, BK, iters = 256, 32, 2
        return make_config(N, K, BN=BN, BK=BK, iters=iters, use_dot=False, num_warps=1, num_stages=1, in_thread=True,
                           weight_math=3)
    if shared and M > 1 and weight_format != "int4":
        # the rows share one mask: tensor cores, rows padded to 16. H200, 2-16 rows at 50%
        # (examples/bench_kernels.py --sweep --sweep-shared; docs/perf-log.md v29-v30).
        # The MLP shapes: the packed loop (survivors' x columns packed a program at a time, only kept weight rows
        # copied), 512 x 64 tiles, 8 warps. A program holds 192 KB of shared memory, so one runs per SM: 32 tiles a
        # program where that still leaves ~a wave of programs (gate+up: 112), else 16 (down: 112). At 2-16 rows
        # gate+up 39.5-42.5 µs vs the masked loop's 47.6-56.8 (cuBLAS 56.4-57.9), down 24.1-26.8 vs 26.6-28.1
        # (32.2-33.0)
        if _mlp_sized(N, K):
            iters = 32 if -(-N // 512) * -(-K // (64 * 32)) >= 96 else 16
            return make_config(N, K, BN=512, BK=64, iters=iters, use_dot=True, num_warps=8, num_stages=3,
                               packed_dot=True)
        # the attention shapes: the loop over every input, the weight rows no row needs left unread, x requested a
        # tile ahead of the mask it sets; 256 x 32 tiles, 8 a program (the packed loop within 5% either way)
        if N >= 2048:
            return make_config(N, K, BN=256, BK=32, iters=8 if K <= 4096 else 16, use_dot=True, num_warps=4,
                               num_stages=3)
        iters = max(2, min(16, round(K * -(-N // 128) / (64 * 480))))
        return make_config(N, K, BN=128, BK=64, iters=iters, use_dot=True, num_warps=4, num_stages=3)
    if weight_format is not None:
        return _choose_quantized(M, N, K, sparsity, weight_format)
    if M == 1 and N >= 2048:  # below that (a lone k/v projection, small models) the in-thread loops had too few programs
        if sparsity is not None and sparsity >= compact_from(N, K):
            # packed survivors: 4 warps, ~450 programs each packing 64-256 inputs
            BN = min(1024, next_pow2(N))
            k_per = min(256, max(64, next_pow2(K * (-(-N // BN)) // 448)))
            return make_config(N, K, BN=BN, BK=16, iters=k_per // 16, use_dot=False, num_warps=BN // 256,
                               num_stages=1, compact=True)
        # every input, masked: one warp per 256 columns (~1000-1800 programs). The MLP shapes: 8 tiles of 16 rows a
        # program; the attention shapes (4096x4096, q+k+v): 2 tiles of 32 rows, 3-8% faster there at 0-50% and no
        # gain on the MLP shapes
        if _mlp_sized(N, K):
            return make_config(N, K, BN=256, BK=16, iters=8, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
        return make_config(N, K, BN=256, BK=32, iters=2, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
    if M <= 4 and N >= 2048:
        # 2-4 rows in the same layout, summed on CUDA cores: 16 tiles per program on the MLP shapes, 4 on 4096²
        # (at 50%: 0.85-0.87 of roofline on the MLP shapes vs 0.79-0.83 for the tensor-core path)
        iters = 16 if _mlp_sized(N, K) else 4
        return make_config(N, K, BN=256, BK=16, iters=iters, use_dot=False, num_warps=1, num_stages=1, in_thread=True)
    if N >= 2048:
        # 5-8 rows: tensor cores, 32-row tiles, 16 per program; 256 columns and a 4-stage pipeline on 4096² (at 8 and
        # 6 rows, 50%: 7-13% faster than the small-shape rule below)
        small = N * K <= 4096 * 4096
        return make_config(N, K, BN=256 if small else 128, BK=32, iters=16, use_dot=True, num_warps=4,
                           num_stages=4 if small else 3)
    BN, BK = 128, 64
    n_tiles = -(-N // BN)
    # about 450-500 programs did best: 16 tiles per program on the MLP shapes, 4 on 4096x4096, 2 on the small k/v
    iters = max(2, min(16, round(K * n_tiles / (BK * 480))))
    return make_config(N, K, BN=BN, BK=BK, iters=iters, use_dot=M > 1, num_warps=4, num_stages=2 if M == 1 else 3)




def _choose_quantized(M: int, N: int, K: int, sparsity: Optional[float], fmt: str) -> GemvConfig:
    """int8 / int4 weights: the float rule's loops, the integers converted by byte permutes. BK always divides the
    int4 group, and on tensor cores a program's inputs do (its sums scaled once). Swept on the H200 (docs/perf-log.md
    v22, v26); 2-8 rows keep the v22 rule (not re-swept)."""
    if M <= 4 and N >= 2048:
        mlp = _mlp_sized(N, K)
        # int8, one row: the packed survivors only where the bf16 rule takes them (unmeasured for int8 there; at 50%
        # the masked loop below is faster since its conversions became byte permutes: gate/up 14.7 µs vs 16.1)
        if fmt == "int8" and M == 1 and sparsity is not None and sparsity >= compact_from(N, K):
            return make_config(N, K, BN=1024, BK=16, iters=4, use_dot=False, num_warps=2, num_stages=1, compact=True)
        # int4, one row, the MLP shapes from ``int4_packed_from``: the survivors packed, summed as fp16 tiles, 16
        # bytes (32 nibbles) a thread; gate+up 8 tiles a program, down 4 (docs/perf-log.md v37, v46, v47)
        if fmt == "int4" and M == 1 and mlp and sparsity is not None and sparsity >= int4_packed_from(N, K):
            return make_config(N, K, BN=2048, BK=16, iters=8 if N > K else 4, use_dot=False, num_warps=2,
                               num_stages=1, compact=True, weight_math=tile_math(fmt, N, K))
        # one row otherwise: the masked in-thread loop, 32-row tiles, fp16 tile sums (``tile_math``; fp32 x takes
        # the exact sums, the launcher's fallback): 2 tiles a program, int8 on the MLP shapes 4. H200 at 50%: int8
        # gate+up 19.4 µs with 4 tiles, 20.0 with 2 (v46); int4 q+k+v 7.4 against v28's 512 x 16 x 4 9.1 (v38);
        # int4's MLP shapes below their packing, H100: gate+up 23.3 µs at 0% against v28's 1024 x 16 x 4 30.3,
        # down 12.1 at 40% against 14.4 (docs/perf-log.md v47)
        if M == 1:
            return make_config(N, K, BN=256, BK=32, iters=4 if mlp and fmt == "int8" else 2, use_dot=False,
                               num_warps=1, num_stages=1, in_thread=True, weight_math=tile_math(fmt, N, K))
        return make_config(N, K, BN=256, BK=16, iters=16 if mlp else 4, use_dot=False, num_warps=1, num_stages=1,
                           in_thread=True)  # 2-4 rows: the bf16 rule's tiles (a thread's registers hold rows x BK x 8)
    if fmt == "int4" and M > 1:  # the in-thread rows loop (the v22 rule, from before int4 could take tensor cores)
        return make_config(N, K, BN=256, BK=8, iters=32 if _mlp_sized(N, K) else 8, use_dot=False, num_warps=1,
                           num_stages=1, in_thread=True)
    if N >= 2048:
        small = N * K <= 4096 * 4096
        return make_config(N, K, BN=256 if small else 128, BK=32, iters=16, use_dot=True, num_warps=4,
                           num_stages=4 if small else 3)
    BN, BK = 128, 64
    iters = max(2, min(16, round(K * -(-N // BN) / (BK * 480))))
    return make_config(N, K, BN=BN, BK=BK, iters=iters, use_dot=M > 1, num_warps=4, num_stages=2 if M == 1 else 3)


# ------------------------------------------------------------------------------------------------ kernel or cuBLAS
# Per GPU kind, mask and shape class (``shape_class``): batch size -> the fraction of weight rows read below which
# the sparse GEMV beats cuBLAS (bf16, the smallest over the 8B block's launch shapes of the class:
# examples/bench_kernels.py --batches; examples/results/kernels_h200_batches.md). A batch size between entries takes
# the next larger entry's figure; >= 1 means the kernel wins even reading every row. The classes differ in how much
# a launch has to hide its fixed costs behind: at 16 rows, shared, q+k+v never breaks even but the MLP shapes do
# below 0.75 kept, so one figure for all would send the MLP's launches to cuBLAS too. H200 (docs/perf-log.md v30):
# one row wins at any sparsity; per-row masks over 2 rows below 0.67 kept on the MLP shapes (1 - 0.5^2 = 0.75 at
# 50%: cuBLAS), over 4 rows below 0.35-0.39, from 8 rows never; a shared mask at 50% takes the kernel at 2-16 rows
# on the MLP shapes and at 2-8 on the attention ones.
BREAK_EVEN_KEPT = {
    "H200": {"per_row": {"attention": {1: 2.0, 2: 2.0, 4: 0.35, 8: 0.0},
                         "mlp": {1: 2.0, 2: 0.67, 4: 0.39, 8: 0.0}},
             "shared": {"attention": {2: 0.81, 4: 0.71, 8: 0.60, 16: 0.0},
                        "mlp": {2: 0.85, 4: 0.85, 8: 0.83, 16: 0.75}}},
}
DEFAULT_GPU = "H200"


def shape_class(N: int, K: int) -> str:
    """"mlp" for the MLP-sized launches (gate, up, gate+up, down of an 8B model), else "attention"."""
    return "mlp" if _mlp_sized(N, K) else "attention"


def expected_kept(rows: int, sparsity: float, shared: bool) -> float:
    """The fraction of weight rows a launch reads: 1 - s for one row or a shared mask; for per-row masks the union,
    1 - s^rows if the rows' masks were independent (real rows overlap more, so this errs towards cuBLAS)."""
    return 1.0 - sparsity if shared or rows == 1 else 1.0 - sparsity**rows


_GPU_NAMES: dict = {}


def gpu_name(device: torch.device) -> str:
    """The GPU model of ``device`` (cached: asked at every op call outside CUDA graphs); the device type elsewhere."""
    if device not in _GPU_NAMES:
        _GPU_NAMES[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return _GPU_NAMES[device]


def kernel_pays(rows: int, sparsity: Optional[float], shared: bool, gpu: str, N: int, K: int) -> bool:
    """Whether the sparse GEMV beats cuBLAS on the masked input for ``rows`` rows of a [N, K] launch at the plan's
    ``sparsity`` (None or < 0: unknown, the kernel). Where it does not (per-row masks from about 4 rows: their union
    keeps nearly every weight row), the ops take cuBLAS with the same mask: never slower than dense."""
    if sparsity is None or sparsity < 0:
        return True
    tables = next((t for kind, t in BREAK_EVEN_KEPT.items() if kind in gpu), BREAK_EVEN_KEPT[DEFAULT_GPU])
    table = tables["shared" if shared and rows > 1 else "per_row"][shape_class(N, K)]
    limit = next((table[b] for b in sorted(table) if b >= rows), table[max(table)])
    return expected_kept(rows, sparsity, shared) < limit
