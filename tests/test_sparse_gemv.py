"""The Triton sparse GEMV against a float64 reference, on small odd shapes, every dtype, 1-8 rows, random
thresholds; the output is poisoned first so that every element must be written.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (set before triton is imported:
run this file in its own process, as .ci/run and the README's test command do through conftest)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
from dataclasses import replace  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels.reference import reference_rmsnorm, reference_sparse_linear  # noqa: E402
from teal_fx.kernels.sparse_gemv_config import choose_config, make_config  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the SwiGLU epilogue rounds three times, as eager silu(gate) * up does (gate, silu, product): up to 3 bf16 ulps
# against the exact product (the CPU interpreter truncates to bf16, so each rounding can cost a whole ulp there)
SWIGLU_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def reference(x, w, b, t):
    """The op's reference in float64 (the mask compared in float32 as the kernel compares)."""
    return reference_sparse_linear(x.double(), w.double(), None if b is None else b.double(), t)


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def run(M, N, K, dtype, t, bias, col_major=True, config=None, seed=0, sparsity=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(N, K, generator=g).to(dtype).to(DEVICE) / K**0.5
    if col_major:
        w = w.t().contiguous().t()
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # poison
    sg.sparse_gemv(x, w, b, t, config=config, out=y, sparsity=sparsity)
    ref = reference(x.cpu(), w.cpu(), b.cpu() if b is not None else None, t)
    assert not torch.isnan(y).any(), "unwritten output elements"
    return rel_err(y.cpu(), ref)


@settings(max_examples=25 if ON_GPU else 12, deadline=None)
@given(
    M=st.integers(1, 8), N=st.integers(1, 70), K=st.integers(1, 90),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    t=st.floats(0.0, 1.5), bias=st.booleans(), seed=st.integers(0, 1000),
    hint=st.sampled_from([None, 0.3, 0.9]),  # the expected sparsity picks the variant (0.9: compacted for one row)
)
def test_matches_float64(M, N, K, dtype, t, bias, seed, hint):
    assert run(M, N, K, dtype, t, bias, seed=seed, sparsity=hint) <= TOL[dtype]


def test_config_follows_expected_sparsity():
    unknown, half = choose_config(1, 4096, 4096), choose_config(1, 4096, 4096, sparsity=0.5)
    assert unknown.in_thread and not unknown.compact and half == unknown
    dense_ish, sparse = choose_config(1, 14336, 4096, 0.4), choose_config(1, 14336, 4096, 0.9)
    assert sparse.compact and not dense_ish.compact
    for cfg in (unknown, dense_ish, sparse):  # the in-thread sum needs whole columns per thread
        assert cfg.block_n == 256 * cfg.num_warps and cfg.in_thread
    assert not choose_config(1, 1024, 4096, 0.9).in_thread  # a lone k/v: [BK, BN] tiles
    rows4 = choose_config(4, 14336, 4096, 0.9)  # 2-4 rows: the in-thread layout, never packed
    assert rows4.in_thread and not rows4.compact and not rows4.use_dot
    assert choose_config(5, 14336, 4096, 0.5).use_dot  # more rows: the tensor-core path


@pytest.mark.parametrize("N,K", [(40, 96), (64, 96), (64, 100)])  # ragged and even tiles (EVEN_N / EVEN_K paths)
@pytest.mark.parametrize("iters", [6, 1])
@pytest.mark.parametrize("M,use_dot,loop", [(1, False, "tile"), (1, False, "in_thread"), (1, False, "compact"),
                                            (1, True, "tile"), (5, True, "tile"), (5, False, "in_thread")])
def test_split_k_and_variants(N, K, iters, M, use_dot, loop):
    cfg = make_config(N, K, BN=32, BK=16, iters=iters, use_dot=use_dot, compact=loop == "compact",
                         in_thread=loop == "in_thread")
    assert cfg.split_k == -(-K // (16 * iters))
    # both split-K epilogues: the grid's last arriver, and a second launch (APART, the default where launches overlap)
    for apart in (False, True):
        for rep in range(2):  # the second launch checks that the arrival counters and the workspace were reset
            assert run(M, N, K, torch.float32, 0.4, True, config=replace(cfg, apart=apart), seed=rep) <= 1e-5


@pytest.mark.parametrize("loop", ["tile", "in_thread", "compact"])
def test_negative_threshold_keeps_every_input(loop):
    cfg = make_config(40, 70, BN=32, BK=16, iters=2, use_dot=False, compact=loop == "compact",
                         in_thread=loop == "in_thread")  # ragged last split
    assert run(1, 40, 70, torch.float32, -0.5, True, config=cfg) <= 1e-5


@pytest.mark.parametrize("M,hint", [(1, None), (1, 0.9), (3, 0.5), (6, 0.5)])
def test_default_configs_of_wide_outputs(M, hint):
    """N >= 2048 (ragged N: masked last tile): one row takes the in-thread loops (0.9 packs the survivors), 2-4 rows
    each keep their mask in the in-thread layout, 5-8 rows take the tensor cores."""
    assert choose_config(M, 2100, 80, hint).in_thread == (M <= 4)
    assert run(M, 2100, 80, torch.bfloat16, 0.8, True, sparsity=hint) <= TOL[torch.bfloat16]


def test_row_major_weight_still_correct():
    assert run(2, 33, 47, torch.float32, 0.3, False, col_major=False) <= 1e-5


def test_all_masked_gives_bias_or_zero():
    x = torch.full((1, 20), 0.1, device=DEVICE)
    w = torch.randn(12, 20, device=DEVICE)
    b = torch.randn(12, device=DEVICE)
    torch.testing.assert_close(sg.sparse_gemv(x, w, b, 0.5), b[None])
    assert torch.count_nonzero(sg.sparse_gemv(x, w, None, 0.5)) == 0


def test_rows_keep_their_own_mask():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    w = torch.tensor([[1.0, 10.0]], device=DEVICE)
    torch.testing.assert_close(sg.sparse_gemv(x, w, None, 0.5), torch.tensor([[1.0], [10.0]], device=DEVICE))


def test_rejects_too_many_rows():
    with pytest.raises(ValueError, match="rows"):
        sg.sparse_gemv(torch.randn(9, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), None, 0.1)


@settings(max_examples=20 if ON_GPU else 10, deadline=None)
@given(
    M=st.integers(1, 8), Ns=st.lists(st.integers(1, 70), min_size=1, max_size=3), K=st.integers(1, 90),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    ts=st.lists(st.floats(0.0, 1.5), min_size=3, max_size=3), bias=st.booleans(), seed=st.integers(0, 1000),
    split=st.booleans(), loop=st.sampled_from(["tile", "in_thread", "compact"]), BK=st.sampled_from([16, 32]),
    apart=st.booleans(),
)
def test_grouped_launch_matches_each_linear(M, Ns, K, dtype, ts, bias, seed, split, loop, BK, apart):
    """q/k/v-style group: one launch, each segment its own weight, bias, output and threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    ws = [(torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE).t().contiguous().t() for N in Ns]
    bs = [torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None for N in Ns]
    ys = [torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE) for N in Ns]
    # small tiles split K (workspace + last-arriver path); the default config does not split such small K
    cfg = replace(make_config(sum(Ns), K, BN=16, BK=BK, iters=2, use_dot=M > 1 and loop != "in_thread",
                                 compact=loop == "compact", in_thread=loop == "in_thread"), apart=apart) if split else None
    for _ in range(2):  # twice: the arrival counters and the workspace must be left clean
        sg.sparse_gemv_group(x, ws, bs, ts[: len(Ns)], config=cfg, outs=ys)
        for w, b, t, y in zip(ws, bs, ts, ys):
            ref = reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), t)
            assert not torch.isnan(y).any(), "unwritten output elements"
            assert rel_err(y.cpu(), ref) <= TOL[dtype]


def test_grouped_launch_rejects_mixed_bias():
    x = torch.randn(1, 8, device=DEVICE)
    w = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bias"):
        sg.sparse_gemv_group(x, [w, w], [None, torch.zeros(4, device=DEVICE)], [0.1, 0.1])


@settings(max_examples=20 if ON_GPU else 10, deadline=None)
@given(
    M=st.integers(1, 8), N=st.integers(16, 70), K=st.integers(2, 90),  # (K = 1: not groupable, see below)
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    ts=st.tuples(st.floats(0.0, 1.5), st.floats(0.0, 1.5)), seed=st.integers(0, 1000),
    split=st.booleans(), loop=st.sampled_from(["tile", "in_thread", "compact"]), apart=st.booleans(),
)
def test_swiglu_launch_matches_float64(M, N, K, dtype, ts, seed, split, loop, apart):
    """gate/up in one launch whose epilogue forms silu(gate) * up: against the float64 product of the references."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    wg, wu = [(torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE).t().contiguous().t() for _ in range(2)]
    h = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    cfg = replace(make_config(2 * N, K, BN=16, BK=16, iters=2, use_dot=M > 1 and loop != "in_thread",
                                 compact=loop == "compact", in_thread=loop == "in_thread"), apart=apart) if split else None
    gate = reference(x.cpu(), wg.cpu(), None, ts[0])
    ref = torch.nn.functional.silu(gate) * reference(x.cpu(), wu.cpu(), None, ts[1])
    for _ in range(2):  # twice: the shared arrival counters and the workspace must be left clean
        h.fill_(float("nan"))
        sg.sparse_gemv_swiglu(x, wg, wu, ts[0], ts[1], config=cfg, out=h)
        assert not torch.isnan(h).any(), "unwritten output elements"
        assert rel_err(h.cpu(), ref) <= SWIGLU_TOL[dtype]


def test_swiglu_launch_refuses_what_it_cannot_group():
    x = torch.randn(1, 32, device=DEVICE)
    w = torch.randn(32, 32, device=DEVICE).t().contiguous().t()
    with pytest.raises(ValueError, match="column-major"):
        sg.sparse_gemv_swiglu(x, w, w.contiguous(), 0.1, 0.1)  # up stored row-major
    with pytest.raises(ValueError, match="column-major"):
        sg.sparse_gemv_swiglu(x, w, w[:16], 0.1, 0.1)  # shapes differ
    one = torch.randn(32, 1, device=DEVICE)  # column-major and row-major at once: stride (1, 1)
    with pytest.raises(ValueError, match="column-major"):
        sg.sparse_gemv_swiglu(x[:, :1], one, one, 0.1, 0.1)


def test_weights_with_unit_k_stride_launch_apart():
    """[N, 1] weights have stride (1, 1): a grouped launch would swap a stride Triton turned into the constant 1."""
    x = torch.randn(1, 1, device=DEVICE)
    ws = [torch.randn(n, 1, device=DEVICE) for n in (16, 32)]
    ys = sg.sparse_gemv_group(x, ws, [None, None], [0.0, 0.0])
    for w, y in zip(ws, ys):
        assert torch.allclose(y, x @ w.t(), atol=1e-5)


@settings(max_examples=20 if ON_GPU else 10, deadline=None)
@given(
    M=st.integers(1, 8), N=st.integers(1, 70), K=st.integers(1, 90),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    t=st.floats(0.0, 1.5), bias=st.booleans(), seed=st.integers(0, 1000), split=st.sampled_from([None, 1, 3]),
)
def test_add_rmsnorm_launch_matches_float64(M, N, K, dtype, t, bias, seed, split):
    """The linear, the residual add and Llama's RMSNorm: against the float64 linear rounded and normalised as eager
    rounds (so up to a few ulps apart, as the SwiGLU epilogue); both outputs poisoned first, the workspace left clean
    (run twice). ``split``: K split in that many parts where the default config would not split it."""

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE).t().contiguous().t()
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    res = torch.randn(M, N, generator=g).to(dtype).to(DEVICE)
    nw = (1 + torch.randn(N, generator=g) / 4).to(dtype).to(DEVICE)
    cfg = None
    if split is not None:
        cfg = make_config(N, K, BN=16, BK=16, iters=max(1, -(-K // (16 * split))), use_dot=M > 4,
                             in_thread=M <= 4)
    y = reference(x.cpu(), w.cpu(), b.cpu() if b is not None else None, t).to(dtype)
    h_ref = res.cpu() + y
    out_ref = reference_rmsnorm(h_ref, nw.cpu(), 1e-5)
    h, out = (torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    for _ in range(2):
        h.fill_(float("nan")), out.fill_(float("nan"))
        sg.sparse_gemv_add_rmsnorm(x, w, b, t, res, nw, 1e-5, config=cfg, outs=(h, out))
        assert not (torch.isnan(h).any() or torch.isnan(out).any()), "unwritten output elements"
        assert rel_err(h.cpu(), h_ref.double()) <= SWIGLU_TOL[dtype]
        assert rel_err(out.cpu(), out_ref.double()) <= SWIGLU_TOL[dtype]


def test_add_rmsnorm_launch_refuses_what_it_cannot_fuse():
    x = torch.randn(1, 32, device=DEVICE)
    w = torch.randn(32, 32, device=DEVICE).t().contiguous().t()
    with pytest.raises(ValueError, match="residual"):
        sg.sparse_gemv_add_rmsnorm(x, w, None, 0.1, torch.randn(1, 16, device=DEVICE), torch.ones(32, device=DEVICE),
                                   1e-6)
    with pytest.raises(ValueError, match="residual"):
        sg.sparse_gemv_add_rmsnorm(x, w, None, 0.1, torch.randn(1, 32, device=DEVICE),
                                   torch.ones(32, device=DEVICE, dtype=torch.float16), 1e-6)


def test_one_row_switches_to_the_packed_loop_where_it_was_measured_faster():
    """The masked loop over every input stays faster than the packed one up to 0.65 on the MLP shapes and up to 0.8
    on the attention shapes (docs/design.md, "Sparse GEMV: tiles and loops")."""
    for (N, K), masked_at, packed_at in (((14336, 4096), 0.65, 0.7), ((4096, 14336), 0.65, 0.7),
                                         ((4096, 4096), 0.8, 0.9), ((6144, 4096), 0.8, 0.9)):
        assert not choose_config(1, N, K, sparsity=masked_at).compact
        assert choose_config(1, N, K, sparsity=packed_at).compact
    assert not choose_config(2, 14336, 4096, sparsity=0.9).compact  # batches never pack
