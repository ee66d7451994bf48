"""The add + RMSNorm finish split in two (``sparse_gemv_add_sumsq``, then a launch taking ``x_norm=TileNorm(...)``)
against the launcher it would replace (``sparse_gemv_add_rmsnorm``, whose normalised output the next launch reads),
the same configs: h bit for bit (on a GPU at the output's precision: the split-K sums meet in a varying order),
the per-tile sums of squares against fp64, the next launch's outputs at the
output's precision (its mean(h²) is summed in another order, so r, and so a rounding of x, may move by one).

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (conftest sets it)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from tests.test_mlp_add_rmsnorm_kernel import DEVICE, ON_GPU, TOL, rel_err, weight, workspace_is_zero  # noqa: E402


def same_h(h, h_ref, dtype) -> bool:
    """h of the two finishes: bit for bit on the interpreter; on a GPU the split-K sums meet in a varying order."""
    return rel_err(h.cpu(), h_ref.cpu()) <= TOL[dtype] if ON_GPU else torch.equal(h, h_ref)


@settings(max_examples=30 if ON_GPU else 8, deadline=None)
@given(M=st.integers(1, 4), width=st.integers(4, 300).map(lambda n: 2 * n), inner=st.integers(8, 40).map(lambda n: 2 * n),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fmt=st.sampled_from([None, "int8", "int4"]),
       ts=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), bias=st.booleans(), seed=st.integers(0, 1000))
def test_norm_from_tiles_matches_the_add_rmsnorm_finish(M, width, inner, dtype, fmt, ts, bias, seed):
    """o's launch (inner -> width, residual add) then a grouped q/k launch and a SwiGLU launch over the norm of h:
    widths of 1-3 sum-of-squares tiles, the last partial; 1-4 rows; float, int8 and int4 weights."""
    if fmt == "int4":
        inner = max(inner, 32)  # a grouped launch takes weights of at least 16 stored rows (_groupable)
        width = max(width, 32)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, inner, generator=g).to(dtype).to(DEVICE)
    res = torch.randn(M, width, generator=g).to(dtype).to(DEVICE)
    nw = (torch.rand(width, generator=g) + 0.5).to(dtype).to(DEVICE)
    w_o, s_o = weight(width, inner, dtype, fmt, g)
    b_o = torch.randn(width, generator=g).to(dtype).to(DEVICE) if bias and fmt is None else None
    (w_q, s_q), (w_k, s_k) = weight(2 * inner, width, dtype, fmt, g), weight(inner, width, dtype, fmt, g)
    t_o, t_q = ts

    h_ref, normed = sg.sparse_gemv_add_rmsnorm(x, w_o, b_o, t_o, res, nw, 1e-5, scales=s_o)
    h, sumsq = sg.sparse_gemv_add_sumsq(x, w_o, b_o, t_o, res, scales=s_o)
    assert workspace_is_zero() and same_h(h, h_ref, dtype)
    tiles = -(-width // sg.SUMSQ_TILE)
    assert sumsq.shape == (M, tiles) and sumsq.dtype == torch.float32
    hf = torch.nn.functional.pad(h.double().cpu(), (0, tiles * sg.SUMSQ_TILE - width))
    assert torch.allclose(sumsq.double().cpu(), (hf**2).reshape(M, tiles, -1).sum(-1), rtol=1e-5, atol=1e-30)

    norm = sg.TileNorm(sumsq, nw, 1e-5)
    got = sg.sparse_gemv_group(h, [w_q, w_k], [None, None], [t_q, t_q], scales=[s_q, s_k], x_norm=norm)
    want = sg.sparse_gemv_group(normed, [w_q, w_k], [None, None], [t_q, t_q], scales=[s_q, s_k])
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b.cpu()) <= TOL[dtype]
    got = sg.sparse_gemv_swiglu(h, w_q, w_q, t_q, t_o, scales_gate=s_q, scales_up=s_q, x_norm=norm)
    want = sg.sparse_gemv_swiglu(normed, w_q, w_q, t_q, t_o, scales_gate=s_q, scales_up=s_q)
    assert rel_err(got.cpu(), want.cpu()) <= TOL[dtype] and workspace_is_zero()


@settings(max_examples=20 if ON_GPU else 6, deadline=None)
@given(M=st.integers(1, 4), hidden=st.integers(4, 300).map(lambda n: 2 * n), inter=st.integers(16, 40).map(lambda n: 2 * n),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fmt=st.sampled_from([None, "int8", "int4"]),
       ts=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 0.5)), bias=st.booleans(), seed=st.integers(0, 1000))
def test_folded_mlp_with_tile_norms_matches_the_add_rmsnorm_one(M, hidden, inter, dtype, fmt, ts, bias, seed):
    """The folded MLP (gate/up sums, down over silu(gate) * up) with the sum-of-squares finish: h as the add +
    RMSNorm one's (``same_h``), the gate/up sums zeroed by it (the workspace zero), its tile sums against fp64; then the
    same MLP taking its input as ``TileNorm`` of the h before, at the output's precision."""
    hidden = max(hidden, 32)  # grouped launches take weights of at least 16 stored rows (_groupable)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, hidden, generator=g).to(dtype).to(DEVICE)
    res = torch.randn(M, hidden, generator=g).to(dtype).to(DEVICE)
    nw = (torch.rand(hidden, generator=g) + 0.5).to(dtype).to(DEVICE)
    (wg, sgt), (wu, su) = weight(inter, hidden, dtype, fmt, g), weight(inter, hidden, dtype, fmt, g)
    wd, sd = weight(hidden, inter, dtype, fmt, g)
    bd = torch.randn(hidden, generator=g).to(dtype).to(DEVICE) if bias and fmt is None else None
    t_in, t_down = ts
    if ON_GPU and dtype != torch.float32:
        t_down = 0.0  # an ulp of silu(gate) * up moved by the sums' order can flip an input at down's threshold
    scales = (sgt, su, sd)
    h_ref, normed = sg.sparse_gemv_mlp_add_rmsnorm(x, wg, wu, wd, t_in, t_in, t_down, res, nw, 1e-5, b_down=bd,
                                                   scales=scales)
    h, sumsq = sg.sparse_gemv_mlp_add_sumsq(x, wg, wu, wd, t_in, t_in, t_down, res, b_down=bd, scales=scales)
    assert workspace_is_zero() and same_h(h, h_ref, dtype)
    tiles = -(-hidden // sg.SUMSQ_TILE)
    hf = torch.nn.functional.pad(h.double().cpu(), (0, tiles * sg.SUMSQ_TILE - hidden))
    assert torch.allclose(sumsq.double().cpu(), (hf**2).reshape(M, tiles, -1).sum(-1), rtol=1e-5, atol=1e-30)

    # the next layer's MLP over the norm of h: formed in its gate/up launch from the tile sums, or read as given
    norm = sg.TileNorm(sumsq, nw, 1e-5)
    got = sg.sparse_gemv_mlp_add_sumsq(h, wg, wu, wd, t_in, t_in, t_down, res, b_down=bd, scales=scales,
                                       x_norm=norm)
    want = sg.sparse_gemv_mlp_add_sumsq(normed, wg, wu, wd, t_in, t_in, t_down, res, b_down=bd, scales=scales)
    assert rel_err(got[0].cpu(), want[0].cpu()) <= TOL[dtype] and workspace_is_zero()
    got = sg.sparse_gemv_mlp_add_rmsnorm(h, wg, wu, wd, t_in, t_in, t_down, res, nw, 1e-5, b_down=bd, scales=scales,
                                         x_norm=norm)
    want = sg.sparse_gemv_mlp_add_rmsnorm(normed, wg, wu, wd, t_in, t_in, t_down, res, nw, 1e-5, b_down=bd,
                                          scales=scales)
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b.cpu()) <= TOL[dtype]
    assert workspace_is_zero()


def test_norm_from_tiles_refuses_what_it_cannot_read():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 300, generator=g).to(torch.bfloat16).to(DEVICE)
    w, _ = weight(64, 300, torch.bfloat16, None, g)
    nw = torch.ones(300, dtype=torch.bfloat16, device=DEVICE)
    sumsq = torch.ones(2, 2, device=DEVICE)
    for bad in (sg.TileNorm(sumsq[:, :1], nw, 1e-5),  # one tile for 300 columns
                sg.TileNorm(sumsq.double(), nw, 1e-5), sg.TileNorm(sumsq, nw[:256], 1e-5),
                sg.TileNorm(sumsq, nw.float(), 1e-5)):
        with pytest.raises(ValueError, match="RMSNorm"):
            sg.sparse_gemv(h, w, None, 0.1, x_norm=bad)
    with pytest.raises(ValueError, match="residual"):
        sg.sparse_gemv_add_sumsq(h, w, None, 0.1, torch.zeros(2, 60, dtype=torch.bfloat16, device=DEVICE))


def test_the_benchmark_chains_run(monkeypatch):
    """``bench_kernels.py --block-norm-tiles``' two chains (add + RMSNorm finish; sums of squares and TileNorm) on small
    shapes: every launch takes what the one before left, and the workspace is zero after each chain."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import bench_kernels

    ran = []
    monkeypatch.setattr(bench_kernels, "graph_time_us", lambda calls: ran.append([f() for f in calls]) or 1.0)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    for tiles in (False, True):
        assert bench_kernels.bench_block_norms(0.5, torch.bfloat16, "int8", tiles, layers=2, shapes=shapes,
                                               device=DEVICE) == 4.0
        assert len(ran[-1]) == 8 and workspace_is_zero()
