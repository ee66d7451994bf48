"""Quantized weights (kernels/quantize.py) and the kernels that read them: the sparse GEMV over int8/int4 rows
(every loop, split K, grouped, SwiGLU, add + RMSNorm) and the prefill GEMM, against a float64 reference of the
dequantized weight, on odd shapes, group edges and random thresholds.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 (set by conftest before triton is imported)."""
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from teal_fx.kernels.quantize import ACT_TILE, INT4_GROUP, dequantize, logical_shape, quantize_int4, quantize_int8
from teal_fx.kernels.reference import quantize_activation_tiles, reference_rmsnorm, reference_sparse_linear, sparsify

triton = pytest.importorskip("triton")
from teal_fx.kernels import dequant_matmul as dm  # noqa: E402
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels import sparse_gemv_config  # noqa: E402
from teal_fx.kernels.sparse_gemv_config import INT4_X8_WAVE, choose_config, make_config  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
QUANTIZE = {"int8": quantize_int8, "int4": quantize_int4}


# ------------------------------------------------------------------------------------------------ formats
@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 40).map(lambda n: 2 * n), K=st.integers(1, 300), seed=st.integers(0, 100))
def test_int4_packs_two_outputs_a_byte_and_round_trips(N, K, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (N // 2, K) and q.t().is_contiguous()  # a row per input
    assert s.shape == (-(-K // INT4_GROUP), N) and logical_shape(q) == (N, K)
    got = dequantize(q, s)
    step = s.t().repeat_interleave(INT4_GROUP, dim=1)[:, :K]
    # each weight within half its group's step, or clipped at the top of the grid (7 steps) when it lies above
    within, clipped = (got - w).abs() <= step / 2 + 1e-6, torch.isclose(got, 7 * step) & (w > 7 * step)
    assert bool((within | clipped).all())
    # each group's extreme lands on the end of the grid of its sign: -8 steps (nibble 0) or 7
    G = -(-K // INT4_GROUP)
    groups = torch.nn.functional.pad(w, (0, G * INT4_GROUP - K)).reshape(N, G, INT4_GROUP)
    lo, hi = groups.amin(2), groups.amax(2)
    nib = torch.stack([q & 15, q >> 4], dim=1).reshape(N, K).float()  # low nibble: even output, high: odd
    ends = torch.nn.functional.pad(nib, (0, G * INT4_GROUP - K), value=8.0).reshape(N, G, INT4_GROUP)
    negative = -lo > hi
    assert bool(torch.where(negative, ends.amin(2) == 0, ends.amax(2) == 15).all())


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 80), K=st.integers(1, 300), seed=st.integers(0, 100))
def test_int8_is_per_output_channel(N, K, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.t().is_contiguous() and s.shape == (N,)
    assert bool(((dequantize(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all())
    assert bool((q.abs().amax(dim=1) == 127).all())  # each channel's absmax is the full range


def test_int4_needs_an_even_output_count():
    with pytest.raises(ValueError, match="even"):
        quantize_int4(torch.randn(5, 16))


# ------------------------------------------------------------------------------------------------ the GEMV
def reference(x, q, s, b, t):
    """The op's reference in float64: the dequantized weight, the mask compared in float32 as the kernel does."""
    return reference_sparse_linear(x.double(), dequantize(q.cpu(), s.cpu(), torch.float64),
                                   None if b is None else b.double(), t)


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def operands(M, N, K, dtype, fmt, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    q, s = QUANTIZE[fmt]((torch.randn(N, K, generator=g) / K**0.5).to(dtype))
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731 (.to keeps q's column-major strides)
    return move(x), move(q), move(s), move(b)


LOOPS = ["tile", "in_thread", "compact", "dot"]


def config_for(loop, M, N, K, BK=16, iters=2, fmt=None):
    if loop == "compact" and fmt == "int4" and BK * iters >= INT4_GROUP:  # packed: whole groups, each scaled
        iters = BK * iters // INT4_GROUP * INT4_GROUP // BK
    elif loop in ("dot", "compact") and fmt == "int4":  # a program's sums scaled once: its inputs in one group
        iters = 1 << min(iters.bit_length() - 1, (INT4_GROUP // BK).bit_length() - 1)
    return make_config(N, K, BN=32, BK=BK, iters=iters, use_dot=loop == "dot", compact=loop == "compact",
                       in_thread=loop == "in_thread")


@settings(max_examples=14, deadline=None)  # on a GPU each example may compile a kernel variant
@given(
    fmt=st.sampled_from(["int8", "int4"]), M=st.integers(1, 8), N=st.integers(1, 40).map(lambda n: 2 * n),
    K=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    t=st.floats(0.0, 1.5), bias=st.booleans(), seed=st.integers(0, 1000),
    loop=st.sampled_from([None, *LOOPS]), BK=st.sampled_from([16, 32, 64]), iters=st.integers(1, 5),
)
def test_sparse_gemv_matches_float64_of_dequantized(fmt, M, N, K, dtype, t, bias, seed, loop, BK, iters):
    """K up to 300 crosses int4 group edges (128, 256) and ends mid-group; loops by config (None: the rule's)."""
    if loop == "compact" and M > 1:
        loop = "in_thread"  # several rows are never packed on CUDA cores
    if loop == "tile" and M > 1:
        loop = "dot"
    x, q, s, b = operands(M, N, K, dtype, fmt, seed, bias)
    cfg = None if loop is None else config_for(loop, M, N, K, BK, iters, fmt)
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    for _ in range(2):  # twice: the workspace and counters must be left clean
        sg.sparse_gemv(x, q, b, t, config=cfg, out=y, scales=s)
        assert not torch.isnan(y).any(), "unwritten output elements"
        assert rel_err(y.cpu(), reference(x.cpu(), q, s, None if b is None else b.cpu(), t)) <= TOL[dtype]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (1, torch.float32), (3, torch.bfloat16),
                                     (6, torch.bfloat16)])
def test_default_configs_of_wide_outputs(fmt, M, dtype):
    """N >= 2048: the rule's in-thread loops (one row: cheaper tile sums, exact for fp32 x) and tensor-core path, on a
    ragged last tile."""
    cfg = choose_config(M, 2100, 300, 0.5, fmt)
    assert not cfg.compact or fmt == "int8"
    assert INT4_GROUP % cfg.block_k == 0
    x, q, s, _ = operands(M, 2100, 300, dtype, fmt, 0)
    y = sg.sparse_gemv(x, q, None, 0.6, sparsity=0.5, scales=s)
    assert rel_err(y.cpu(), reference(x.cpu(), q, s, None, 0.6)) <= TOL[dtype]


@settings(max_examples=8, deadline=None)
@given(fmt=st.sampled_from([None, "int8", "int4"]), half=st.booleans(), N=st.integers(1, 35).map(lambda n: 2 * n),
       K=st.integers(1, 300),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), t=st.floats(0.0, 1.5), seed=st.integers(0, 100),
       BK=st.sampled_from([16, 32]), iters=st.integers(1, 4))
def test_one_row_packed_tensor_core_loop(fmt, half, N, K, dtype, t, seed, BK, iters):
    """One row through the packed survivors on tensor cores (``packed_dot``; int8 with or without ``half_dot``; int4
    with its programs inside one scale group): the survivors of a K split gathered into tiles, the next tile requested
    before this tile's dot. Twice per case: the scratch must be left clean; t = 1.5 drops most inputs, so some splits
    keep nothing and others end mid-tile."""
    half = half and fmt == "int8"
    if fmt == "int4":  # a program's inputs inside one scale group: BK x iters divides it
        iters = 1 << min(iters.bit_length() - 1, (INT4_GROUP // BK).bit_length() - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    if fmt is None:
        q, s = w.t().contiguous().t().to(DEVICE), None
        ref = reference_sparse_linear(x.cpu().double(), w.double(), None, t)
    else:
        q, s = (v.to(DEVICE) for v in QUANTIZE[fmt](w))
        ref = reference(x.cpu(), q, s, None, t)
    cfg = make_config(N, K, BN=32, BK=BK, iters=iters, use_dot=True, packed_dot=True, half_dot=half)
    assert cfg.use_dot and cfg.compact and cfg.half_dot == half
    for _ in range(2):
        y = sg.sparse_gemv(x, q, None, t, config=cfg, scales=s)
        assert rel_err(y.cpu(), ref) <= TOL[dtype]


def test_half_dot_refuses_fp32_x():
    x, q, s, _ = operands(1, 64, 96, torch.float32, "int8", 0)
    with pytest.raises(ValueError, match="half_dot"):
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 96, BN=32, BK=16, iters=2, use_dot=True,
                                                           half_dot=True), scales=s)


@settings(max_examples=24, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), math=st.sampled_from([1, 2, 4]),
       N=st.integers(1, 40).map(lambda n: 2 * n),
       K=st.integers(1, 300), dtype=st.sampled_from([torch.float16, torch.bfloat16]), t=st.floats(0.0, 1.5),
       magnitude=st.sampled_from([1e-3, 1.0, 2e3]), seed=st.integers(0, 1000), BK=st.sampled_from([16, 32]),
       iters=st.integers(1, 4), packed=st.booleans())
def test_cheaper_tile_sums_stay_within_the_output_precision(fmt, math, N, K, dtype, t, magnitude, seed, BK, iters,
                                                            packed):
    """weight_math 1 (the conversion's offset removed once per tile) and 2 (fp16 products and tile sums, x scaled by a
    power of two per tile; in the masked loop or over the packed survivors): x from 1e-3 to 2e3 in size, where
    unscaled fp16 sums of int8 products overflow. A rounded sum errs relative to the sum of its terms' sizes, not to
    its value, which cancellation can make far smaller (CI drew N = 2 with |y| a tenth of Σ|x||w|: 3.1e-3 of |y|): so
    the error is measured against Σ |x| |W|. 4: as 2 over the unsigned integers as subnormal halves."""
    packed = packed and math in (2, 4)  # the packed loop sums exactly or in fp16 tiles
    BN, warps = 32, 4
    if math == 4:  # subnormal halves: 4 bytes of a row a thread, rows on 16-byte boundaries (the test below)
        N, K, BN, warps = 256 + -(-N // 32) * 32, max(K, 2), 256, 1
    assume(not (packed and fmt == "int4" and INT4_GROUP % (BK * iters)))  # a packed int4 program in one group
    x, q, s, _ = operands(1, N, K, dtype, fmt, seed)
    x = (x.float() * magnitude).to(dtype)
    cfg = make_config(N, K, BN=BN, BK=BK, iters=iters, use_dot=False, num_warps=warps, in_thread=True,
                      compact=packed, weight_math=math)
    y = sg.sparse_gemv(x, q, None, t * magnitude, config=cfg, scales=s)
    ref = reference(x.cpu(), q, s, None, t * magnitude)
    size = sparsify(x.cpu(), t * magnitude).double().abs() @ dequantize(q.cpu(), s.cpu(), torch.float64).abs().t()
    assert float((y.cpu().double() - ref).norm() / size.norm().clamp_min(1e-30)) <= TOL[dtype]


@pytest.mark.parametrize("fmt, iters, math", [("int8", 8, 2), ("int4", 8, 2), ("int4", 16, 2), ("int8", 8, 4),
                                               ("int4", 8, 4)])
def test_the_packed_fp16_loop_ignores_its_scratch_past_the_survivors(fmt, iters, math):
    """The packed loop with fp16 sums reads whole tiles of its scratch slot unmasked: the entries past a K split's
    survivors (the next slot's, the next scale group's part of it, the launcher's padding) hold anything and must not
    count, neither as rows nor in a tile's x scale. So the scratch is poisoned first; 90 of 128 inputs kept, not a
    whole number of 16-row tiles. int4 with 16 tiles: a program over two scale groups, each packed in turn."""
    N, K = 256 if math == 4 else 64, 256  # (4: 4 bytes of a row a thread)
    x, q, s, _ = operands(1, N, K, torch.bfloat16, fmt, 5)
    t = float(x.float().abs().quantile(0.3))
    cfg = make_config(N, K, BN=N, BK=16, iters=iters, use_dot=False, num_warps=1, num_stages=1, compact=True,
                      weight_math=math)
    sg.sparse_gemv(x, q, None, t, config=cfg, scales=s)  # the scratch exists
    for (_, name), buf in sg._WORKSPACE.bufs.items():
        if name in ("idx", "xv"):
            buf.fill_(3 if name == "idx" else 1e30)  # a tile scale set by it would flush the real x to zero
    y = sg.sparse_gemv(x, q, None, t, config=cfg, scales=s)
    assert rel_err(y.cpu(), reference(x.cpu(), q, s, None, t)) <= TOL[torch.bfloat16]


def test_subnormal_sums_refuse_fp32_x_and_long_int8_tiles():
    for fmt, dtype, BK in (("int8", torch.float32, 16), ("int4", torch.float32, 16), ("int8", torch.bfloat16, 64)):
        x, q, s, _ = operands(1, 256, 128, dtype, fmt, 0)
        with pytest.raises(ValueError, match="weight_math 4 .* takes fp16/bf16 x"):
            sg.sparse_gemv(x, q, None, 0.1, config=make_config(256, 128, BN=256, BK=BK, iters=2, use_dot=False,
                                                               num_warps=1, in_thread=True, weight_math=4), scales=s)


def test_subnormal_sums_only_where_each_word_holds_four_columns(monkeypatch):
    """weight_math 4's inline PTX takes each word's four bytes as four consecutive columns, which Triton's layout
    gives only with at least 4 bytes of a row a thread and rows on 16-byte boundaries (on an H100, 32 columns a warp
    and 2100 int8 columns a row each summed wrong: docs/perf-log.md v52; one input, a row stride of 1, on an H200:
    v53). Asked for, it is refused there; the rule takes the permutes' fp16 sums (weight_math 2) instead, and keeps 4
    where it fits."""
    for fmt in ("int8", "int4"):
        x, q, s, _ = operands(1, 2100, 300, torch.bfloat16, fmt, 0)
        rule = choose_config(1, 2100, 300, 0.5, fmt)
        assert rule.weight_math == 4
        with pytest.raises(ValueError, match="16-byte"):
            sg.sparse_gemv(x, q, None, 0.6, config=rule, scales=s)
        permutes = sg.sparse_gemv(x, q, None, 0.6, config=replace(rule, weight_math=2), scales=s)
        assert torch.equal(sg.sparse_gemv(x, q, None, 0.6, sparsity=0.5, scales=s), permutes)
        x, q, s, _ = operands(1, 2112, 256, torch.bfloat16, fmt, 0)  # rows on 16-byte boundaries: the rule's 4
        rule = choose_config(1, 2112, 256, 0.5, fmt)
        subnormal = sg.sparse_gemv(x, q, None, 0.6, config=rule, scales=s)
        assert torch.equal(sg.sparse_gemv(x, q, None, 0.6, sparsity=0.5, scales=s), subnormal)
        assert not torch.equal(subnormal, sg.sparse_gemv(x, q, None, 0.6, config=replace(rule, weight_math=2),
                                                         scales=s))
        with pytest.raises(ValueError, match="4 bytes of a row a thread"):  # 64 columns a warp
            sg.sparse_gemv(x, q, None, 0.6, config=replace(rule, block_n=64), scales=s)
        x, q, s, _ = operands(1, 288, 1, torch.float16, fmt, 0)  # one input: a row stride of 1 (an H200, v53)
        rule = make_config(288, 1, BN=256, BK=16, iters=1, use_dot=False, num_warps=1, in_thread=True, weight_math=4)
        with pytest.raises(ValueError, match="16-byte"):
            sg.sparse_gemv(x, q, None, 0.0, config=rule, scales=s)
        monkeypatch.setattr(sg, "choose_config", lambda *args, rule=rule, **kwargs: rule)
        permutes = sg.sparse_gemv(x, q, None, 0.0, config=replace(rule, weight_math=2), scales=s)
        assert torch.equal(sg.sparse_gemv(x, q, None, 0.0, sparsity=0.5, scales=s), permutes)
        monkeypatch.undo()


def test_unknown_weight_math_is_refused():
    """5 (rows in inline PTX) was removed in v53 (slower, and wrong on a GPU): a config asking for it is refused."""
    x, q, s, _ = operands(1, 64, 128, torch.bfloat16, "int8", 0)
    with pytest.raises(ValueError, match="weight_math is one of 0-4"):
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 128, BN=64, BK=16, iters=2, use_dot=False,
                                                           compact=True, in_thread=True, weight_math=5), scales=s)


def test_fp16_tile_sums_refuse_fp32_x_and_other_loops():
    x, q, s, _ = operands(1, 64, 96, torch.float32, "int8", 0)
    with pytest.raises(ValueError, match="fp16"):
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 96, BN=32, BK=16, iters=2, use_dot=False,
                                                           in_thread=True, weight_math=2), scales=s)
    with pytest.raises(ValueError, match="weight_math"):
        sg.sparse_gemv(x.half(), q, None, 0.1, config=make_config(64, 96, BN=32, BK=16, iters=2, use_dot=False,
                                                                  compact=True, weight_math=1), scales=s)


def test_int4_refuses_a_packed_loop_or_a_tile_across_groups():
    x, q, s, _ = operands(1, 32, 256, torch.float32, "int4", 0)
    with pytest.raises(ValueError, match="int4"):  # a packed program of 1.5 groups (whole ones are summed in turn)
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(32, 256, BN=32, BK=16, iters=12, use_dot=False,
                                                           compact=True), scales=s)
    with pytest.raises(ValueError, match="int4"):
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(32, 256, BN=32, BK=256, iters=1, use_dot=False), scales=s)
    with pytest.raises(ValueError, match="tensor cores"):  # a program's 256 inputs span two scale groups
        sg.sparse_gemv(x, q, None, 0.1, config=config_for("dot", 1, 32, 256, iters=16), scales=s)


def test_quantized_weight_without_scales_is_refused():
    x, q, s, _ = operands(1, 32, 64, torch.float32, "int8", 0)
    assert not sg.supports(x, q) or not ON_GPU
    with pytest.raises(ValueError, match="scales"):
        sg.sparse_gemv(x, q, None, 0.1)


@settings(max_examples=8, deadline=None)
@given(
    fmt=st.sampled_from(["int8", "int4"]), M=st.integers(1, 8),
    Ns=st.lists(st.integers(8, 40).map(lambda n: 2 * n), min_size=2, max_size=3), K=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), ts=st.lists(st.floats(0.0, 1.5), min_size=3, max_size=3),
    bias=st.booleans(), seed=st.integers(0, 1000), loop=st.sampled_from(["tile", "in_thread", "dot"]),
    apart=st.booleans(),
)
def test_grouped_launch_swaps_scales_per_segment(fmt, M, Ns, K, dtype, ts, bias, seed, loop, apart):
    if loop == "tile" and M > 1:
        loop = "dot"
    parts = [operands(M, N, K, dtype, fmt, seed + i, bias) for i, N in enumerate(Ns)]
    x = parts[0][0]
    qs, ss, bs = [p[1] for p in parts], [p[2] for p in parts], [p[3] for p in parts]
    cfg = replace(config_for(loop, M, sum(Ns), K, fmt=fmt), apart=apart)
    ys = sg.sparse_gemv_group(x, qs, bs, ts[: len(Ns)], config=cfg, scales=ss)
    for q, s, b, t, y in zip(qs, ss, bs, ts, ys):
        assert rel_err(y.cpu(), reference(x.cpu(), q, s, None if b is None else b.cpu(), t)) <= TOL[dtype]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("M,loop", [(1, "in_thread"), (1, "tile"), (4, "in_thread"), (6, "dot")])
def test_swiglu_and_add_rmsnorm_finishes(fmt, M, loop):
    N, K, dtype = 48, 200, torch.float32
    x, qg, sg_, _ = operands(M, N, K, dtype, fmt, 1)
    _, qu, su, _ = operands(M, N, K, dtype, fmt, 2)
    cfg = config_for(loop, M, 2 * N, K, fmt=fmt)
    h = sg.sparse_gemv_swiglu(x, qg, qu, 0.3, 0.5, config=cfg, scales_gate=sg_, scales_up=su)
    ref = torch.nn.functional.silu(reference(x.cpu(), qg, sg_, None, 0.3)) * reference(x.cpu(), qu, su, None, 0.5)
    assert rel_err(h.cpu(), ref) <= 1e-5

    r = torch.randn(M, N, device=DEVICE)
    nw = torch.rand(N, device=DEVICE) + 0.5
    got_h, got = sg.sparse_gemv_add_rmsnorm(x, qg, None, 0.3, r, nw, 1e-6, config=config_for(loop, M, N, K, fmt=fmt),
                                            scales=sg_)
    want_h = r.cpu().double() + reference(x.cpu(), qg, sg_, None, 0.3)
    assert rel_err(got_h.cpu(), want_h) <= 1e-5
    assert rel_err(got.cpu(), reference_rmsnorm(want_h, nw.cpu().double(), 1e-6)) <= 1e-5


# ------------------------------------------------------------------------------------------------ int8 x (W8A8 / W4A8)
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 3), K=st.integers(1, 200), zero_from=st.integers(0, 200), seed=st.integers(0, 100))
def test_x_on_its_int8_grid_is_within_half_a_step_per_32_inputs(rows, K, zero_from, seed):
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, zero_from:] = 0.0  # whole tiles of zeros: scale 0, q 0
    q, scales = quantize_activation_tiles(x)
    assert q.dtype == torch.int8 and scales.shape == (rows, -(-K // ACT_TILE))
    step = scales.repeat_interleave(ACT_TILE, dim=-1)[:, :K]
    assert bool(((q.float() * step - x).abs() <= step / 2 * (1 + 1e-6)).all())
    assert bool((q.abs() <= 127).all())
    full = scales > 0
    tile_max = torch.nn.functional.pad(q.abs().float(), (0, -K % ACT_TILE)).unflatten(-1, (-1, ACT_TILE)).amax(-1)
    assert bool((tile_max[full] == 127).all()) and bool((tile_max[~full] == 0).all())


def reference_x_int8(x, q, s, b, t):
    """The x_int8 op's reference in float64: x masked, rounded to int8 per 32 inputs, times the dequantized weight."""
    return reference_sparse_linear(x.double(), dequantize(q.cpu(), s.cpu(), torch.float64),
                                   None if b is None else b.double(), t, x_int8=True)


def x_int8_config(N, K, BN, BK, iters):
    """A program's inputs whole tiles of 32 (one x scale each), in tiles of BK rows."""
    return make_config(N, K, BN=BN, BK=BK, iters=iters * (ACT_TILE // BK), use_dot=False, in_thread=True,
                       weight_math=3)


@settings(max_examples=16, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), N=st.integers(1, 70).map(lambda n: 2 * n), K=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), t=st.floats(0.0, 1.5), bias=st.booleans(),
       seed=st.integers(0, 1000), BN=st.sampled_from([None, 32, 64]), BK=st.sampled_from([4, 8, 16, 32]),
       iters=st.integers(1, 5))
def test_x_int8_gemv_matches_float64_of_its_grid(fmt, N, K, dtype, t, bias, seed, BN, BK, iters):
    """The dp4a loop (four rows a word, the 4 x 4 byte transpose; int4's nibbles less 8 Σx) against float64 of the
    same math: odd N, K ending mid-tile and mid-group, tiles of 4-32 rows. BN None: the rule's config. fp32 x
    agrees to rounding: a swapped byte, a wrong scale or offset is off by far more."""
    x, q, s, b = operands(1, N, K, dtype, fmt, seed, bias)
    cfg = None if BN is None else x_int8_config(N, K, BN, BK, iters)
    y = torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE)
    for _ in range(2):  # the scratch slots and counters are left clean
        sg.sparse_gemv(x, q, b, t, config=cfg, out=y, scales=s, x_int8=True)
        assert rel_err(y.cpu(), reference_x_int8(x.cpu(), q, s, None if b is None else b.cpu(), t)) <= TOL[dtype]
    if dtype == torch.float32 and int((x.abs() > t).sum()) >= 8:  # the rounding of x is small
        assert rel_err(y.cpu(), reference(x.cpu(), q, s, None if b is None else b.cpu(), t)) < 0.05


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_x_int8_grouped_swiglu_and_add_rmsnorm(fmt):
    K, dtype = 200, torch.float32
    parts = [operands(1, N, K, dtype, fmt, i) for i, N in enumerate((64, 32, 32))]
    x, ts = parts[0][0], [0.2, 0.5, 0.9]
    ys = sg.sparse_gemv_group(x, [p[1] for p in parts], [None] * 3, ts, scales=[p[2] for p in parts], x_int8=True)
    for (_, q, s, _), t, y in zip(parts, ts, ys):  # each segment its own threshold, so its own int8 x
        assert rel_err(y.cpu(), reference_x_int8(x.cpu(), q, s, None, t)) <= 1e-5
    (_, qg, sg_, _), (_, qu, su, _) = operands(1, 48, K, dtype, fmt, 5), operands(1, 48, K, dtype, fmt, 6)
    h = sg.sparse_gemv_swiglu(x, qg, qu, 0.3, 0.5, scales_gate=sg_, scales_up=su, x_int8=True)
    ref = torch.nn.functional.silu(reference_x_int8(x.cpu(), qg, sg_, None, 0.3)) * \
        reference_x_int8(x.cpu(), qu, su, None, 0.5)
    assert rel_err(h.cpu(), ref) <= 1e-5
    r, nw = torch.randn(1, 48, device=DEVICE), torch.rand(48, device=DEVICE) + 0.5
    got_h, got = sg.sparse_gemv_add_rmsnorm(x, qg, None, 0.3, r, nw, 1e-6, scales=sg_, x_int8=True)
    want_h = r.cpu().double() + reference_x_int8(x.cpu(), qg, sg_, None, 0.3)
    assert rel_err(got_h.cpu(), want_h) <= 1e-5
    assert rel_err(got.cpu(), reference_rmsnorm(want_h, nw.cpu().double(), 1e-6)) <= 1e-5


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_x_int8_rule_on_the_8b_shapes(fmt):
    """The rule's configs pass the launcher's checks (whole x tiles a program, a tile within one scale), and int4's
    one-warp programs (255 registers: 8 an SM) stay within about one wave: gate+up takes 4 tiles a program
    (docs/perf-log.md v33)."""
    for N, K in ((28672, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (4096, 4096), (1024, 4096)):
        cfg = choose_config(1, N, K, 0.5, fmt, x_int8=True)
        assert cfg.weight_math == 3 and cfg.in_thread and not cfg.compact and cfg.num_warps == 1
        assert cfg.k_per_split % ACT_TILE == 0 and ACT_TILE % cfg.block_k == 0
        if fmt == "int4":
            assert -(-N // cfg.block_n) * cfg.split_k <= INT4_X8_WAVE
    assert choose_config(1, 28672, 4096, 0.5, "int4", x_int8=True).k_per_split == 128


def test_int4_one_row_packs_the_mlp_launches_where_it_was_measured_faster():
    """int4, one row: gate+up packs its survivors from 35%, down from 45%, the attention shapes never; the packed
    configs sum fp16 tiles as subnormal halves and keep a program inside one scale group; below, the masked loop
    takes the attention shapes' 256 x 32 tiles, 2 a program, with the MLP's tile sums (docs/perf-log.md v37, v46,
    v47)."""
    for (N, K), masked_at, packed_at in (((28672, 4096), 0.3, 0.35), ((4096, 14336), 0.4, 0.45)):
        for below in (0.0, masked_at, None):  # None: sparsity unknown, the masked loop
            cfg = choose_config(1, N, K, below, "int4")
            assert not cfg.compact and cfg.in_thread and (cfg.block_n, cfg.block_k) == (256, 32)
            assert cfg.k_per_split == 2 * cfg.block_k and cfg.weight_math == sparse_gemv_config.MLP_TILE_MATH
        cfg = choose_config(1, N, K, packed_at, "int4")
        assert cfg.compact and cfg.weight_math == 4 and INT4_GROUP % cfg.k_per_split == 0
        assert not choose_config(1, N, K, 0.5, "int8").compact  # int8's packed loop was never faster
    for N, K in ((6144, 4096), (4096, 4096)):
        assert not choose_config(1, N, K, 0.6, "int4").compact


def test_one_row_tile_sums_per_shape_class():
    """One row's fp16 tile sums: the MLP shapes take ``MLP_TILE_MATH`` (int8's masked tiles 4 a program), the
    attention shapes ``INT8_TILE_MATH`` / ``INT4_TILE_MATH`` (2 tiles a program; docs/perf-log.md v46)."""
    for N, K in ((28672, 4096), (4096, 14336)):
        cfg = choose_config(1, N, K, 0.5, "int8")
        assert not cfg.compact and cfg.weight_math == sparse_gemv_config.MLP_TILE_MATH == 4
        assert cfg.k_per_split == 4 * cfg.block_k
    for N, K in ((6144, 4096), (4096, 4096)):
        for fmt, name in (("int8", "INT8_TILE_MATH"), ("int4", "INT4_TILE_MATH")):
            cfg = choose_config(1, N, K, 0.5, fmt)
            assert cfg.weight_math == getattr(sparse_gemv_config, name) and cfg.k_per_split == 2 * cfg.block_k


def test_the_8b_shapes_keep_the_subnormal_sums():
    """The launcher takes weight_math 4 back to 2 where its PTX cannot run
    (``test_subnormal_sums_only_where_each_word_holds_four_columns``); on Llama-3-8B's shapes, stored column-major as
    quantization stores them, the rule's 4 stands at every sparsity the decode uses."""
    subnormal = 0
    for N, K in ((28672, 4096), (4096, 14336), (6144, 4096), (4096, 4096)):
        for fmt in ("int8", "int4"):
            stored = (torch.empty(K, N, dtype=torch.int8) if fmt == "int8"
                      else torch.empty(K, N // 2, dtype=torch.uint8)).t()  # [N (/ 2), K], rows of N (/ 2) bytes
            for sparsity in (0.0, 0.25, 0.4, 0.5, 0.75):
                cfg = choose_config(1, N, K, sparsity, fmt)
                if cfg.weight_math == 4:
                    subnormal += 1
                    assert sg._subnormal_halves_fit([stored], cfg, 2 if fmt == "int4" else 1), (N, K, fmt, cfg)
    assert subnormal >= 30  # the attention shapes at every sparsity, the MLP's below int8's packing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rule_shape", [(28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("tile_math", [2, 4])
def test_int4_packed_rule_tiles_on_a_ragged_shape(rule_shape, dtype, tile_math, monkeypatch):
    """The tiles the rule packs int4 gate+up and down with (2048 columns x 16 rows, 2 warps), with either tile sum
    (``MLP_TILE_MATH``), chosen by the launcher as the rule's (fp32 x: its fallback to exact sums), on a shape with a
    ragged column tile, a ragged K split and several scale groups; twice, the scratch left clean."""
    monkeypatch.setattr(sparse_gemv_config, "MLP_TILE_MATH", tile_math)
    big = choose_config(1, *rule_shape, 0.5, "int4")
    assert big.weight_math == tile_math
    N, K = 2100, 300
    cfg = make_config(N, K, BN=big.block_n, BK=big.block_k, iters=big.k_per_split // big.block_k, use_dot=False,
                      num_warps=big.num_warps, num_stages=1, compact=True, weight_math=big.weight_math)
    monkeypatch.setattr(sg, "choose_config", lambda *args, **kwargs: cfg)
    x, q, s, _ = operands(1, N, K, dtype, "int4", 3)
    for _ in range(2):
        y = sg.sparse_gemv(x, q, None, 0.6, sparsity=0.5, scales=s)
        assert rel_err(y.cpu(), reference(x.cpu(), q, s, None, 0.6)) <= TOL[dtype]


def test_x_int8_is_a_choice_of_result_not_a_config():
    x, q, s, _ = operands(1, 64, 96, torch.float32, "int8", 0)
    wm3 = x_int8_config(64, 96, 32, 16, 2)
    with pytest.raises(ValueError, match="weight_math 3"):  # the int8-x kernel never runs unasked
        sg.sparse_gemv(x, q, None, 0.1, config=wm3, scales=s)
    with pytest.raises(ValueError, match="weight_math 3"):  # nor does x_int8 run another kernel
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 96, BN=32, BK=16, iters=2, use_dot=False,
                                                           in_thread=True), scales=s, x_int8=True)
    with pytest.raises(ValueError, match="one row"):
        sg.sparse_gemv(torch.cat([x, x]), q, None, 0.1, scales=s, x_int8=True)
    xf = torch.randn(1, 96, device=DEVICE)
    with pytest.raises(ValueError, match="int8/int4"):
        sg.sparse_gemv(xf, torch.randn(64, 96, device=DEVICE), None, 0.1, x_int8=True)
    with pytest.raises(ValueError, match="block_k"):  # a tile within one scale of x
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 96, BN=32, BK=64, iters=1, use_dot=False,
                                                           in_thread=True, weight_math=3), scales=s, x_int8=True)
    with pytest.raises(ValueError, match="k_per_split"):  # a program's inputs whole tiles of x's scales
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 96, BN=32, BK=8, iters=3, use_dot=False,
                                                           in_thread=True, weight_math=3), scales=s, x_int8=True)
    with pytest.raises(ValueError, match="weight_math applies"):  # no packed int8-x loop (docs/perf-log.md v33)
        sg.sparse_gemv(x, q, None, 0.1, config=make_config(64, 96, BN=32, BK=8, iters=4, use_dot=False,
                                                           compact=True, weight_math=3), scales=s, x_int8=True)
    assert not sg.supports(torch.cat([x, x]), q, s, x_int8=True)  # the ops round x themselves for batches


# ------------------------------------------------------------------------------------------------ prefill GEMM
@settings(max_examples=6, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), M=st.integers(1, 40), N=st.integers(1, 40).map(lambda n: 2 * n),
       K=st.integers(1, 300), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 100))
def test_dequant_matmul_matches_float64(fmt, M, N, K, bias, dtype, seed):
    x, q, s, b = operands(M, N, K, dtype, fmt, seed, bias)
    y = dm.dequant_matmul(x, q, s, b, block_m=16, block_n=32, block_k=32)
    assert rel_err(y.cpu(), reference(x.cpu(), q, s, None if b is None else b.cpu(), -1.0)) <= TOL[dtype]


@settings(max_examples=8, deadline=None)
@given(M=st.integers(1, 8), N=st.integers(1, 70), K=st.integers(1, 200), dtype=st.sampled_from([torch.float16,
       torch.bfloat16]), t=st.floats(0.0, 1.5), seed=st.integers(0, 100), iters=st.integers(1, 4))
def test_int8_half_dot_matches_float64(M, N, K, dtype, t, seed, iters):
    """The fp16 tensor-core candidate for int8 (``half_dot``): the bit-pattern conversion is exact, x is rounded to
    fp16 (exact for bf16 and fp16 values in range)."""
    x, q, s, _ = operands(M, N, K, dtype, "int8", seed)
    cfg = make_config(N, K, BN=32, BK=16, iters=iters, use_dot=True, half_dot=True)
    assert cfg.half_dot
    y = sg.sparse_gemv(x, q, None, t, config=cfg, scales=s)
    assert rel_err(y.cpu(), reference(x.cpu(), q, s, None, t)) <= TOL[dtype]
    with pytest.raises(ValueError, match="half_dot"):
        x4, q4, s4, _ = operands(M, 2 * N, K, dtype, "int4", seed)
        sg.sparse_gemv(x4, q4, None, t, config=make_config(2 * N, K, BN=32, BK=16, iters=1, use_dot=True,
                                                           half_dot=True), scales=s4)


def test_register_report_tells_a_spilling_config_from_one_that_fits():
    """``bench_kernels.py --registers`` compiles configs for sm_90 here, without a GPU, and reads ptxas's count: the
    int8 loop with 32 bytes and 32 rows a thread spills (1024 fp32 values), 8 bytes and 16 rows fit. A subprocess:
    the jitted kernels must not be the CPU interpreter's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).parents[1] / "examples"
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_kernels as b; "
            "from teal_fx.kernels.sparse_gemv_config import make_config as m; "
            "print(json.dumps([b.registers('int8', 14336, 4096, m(14336, 4096, BN=bn, BK=bk, iters=it, use_dot=False, "
            "num_warps=1, num_stages=1, in_thread=True)) for bn, bk, it in ((1024, 32, 2), (256, 16, 4))]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, str(examples)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (regs_wide, spill_wide), (regs_fit, spill_fit) = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0 < regs_fit <= 255 and 0 < regs_wide <= 255
    assert spill_fit == 0 < spill_wide
