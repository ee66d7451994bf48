"""One mask per batch (a plan's ``batch_mask="shared"``, paper §5.4.4): the reference's semantics, and the Triton
GEMV's shared-mask loops (tensor cores, in-thread rows; up to 16 rows; grouped, SwiGLU) against a float64 reference.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 (set by conftest before triton is imported)."""
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from teal_fx.kernels.reference import keep_mask, reference_sparse_linear, sparsify, sparsify_shared_by_batch
from teal_fx.plan import LinearPlan

triton = pytest.importorskip("triton")
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels.sparse_gemv_config import make_config  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def test_shared_mask_drops_the_same_inputs_for_every_row():
    x = torch.tensor([[1.0, 0.1, 0.9], [0.0, 0.2, -0.3], [0.2, 0.3, 0.0]])  # column means of |x|: 0.4, 0.2, 0.4
    keep = keep_mask(x, 0.3, shared=True)
    assert keep.tolist() == [[True, False, True]] * 3
    assert torch.equal(keep_mask(x[:1], 0.3, shared=True), keep_mask(x[:1], 0.3))  # one row: its own mask
    x3 = torch.randn(4, 5, 8)  # [batch, positions, inputs]: a mask per position, over the batch
    k3 = keep_mask(x3, 0.7, shared=True)
    assert torch.equal(k3[0], x3.abs().mean(0) > 0.7) and torch.equal(k3[1], k3[3])


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), sizes=st.lists(st.integers(2, 32), min_size=1, max_size=4, unique=True),
       three_d=st.booleans(), seed=st.integers(0, 1000))
@example(rows=6, sizes=[4, 9], three_d=False, seed=0)  # 6 exactly as far from 4 as from 9: a tie both must break alike
def test_batch_threshold_chosen_at_run_time_is_the_plans(rows, sizes, three_d, seed):
    """In-graph choice (tensor ops, for a symbolic batch) = ``LinearPlan.threshold_for`` at that batch size."""
    g = torch.Generator().manual_seed(seed)
    table = tuple((n, float(t)) for n, t in zip(sizes, torch.rand(len(sizes), generator=g) * 1.5))
    lp = LinearPlan("w", 0, "q", (4, 64), 0.5, 0.8, table)
    x = torch.randn((rows, 1, 64) if three_d else (rows, 64), generator=g)
    want = sparsify(x, lp.threshold_for(rows), shared=True)
    assert torch.equal(sparsify_shared_by_batch(x, table, lp.threshold), want)


def test_batch_threshold_compiles_once_for_every_batch_size():
    table = ((2, 0.5), (4, 0.4), (8, 0.3), (16, 0.2))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fn = torch.compile(lambda x: sparsify_shared_by_batch(x, table, 0.7), backend="aot_eager", dynamic=True)
    lp = LinearPlan("w", 0, "q", (4, 32), 0.5, 0.7, table)
    for rows in (3, 5, 6, 11, 16, 30):
        x = torch.randn(rows, 1, 32)
        assert torch.equal(fn(x), sparsify(x, lp.threshold_for(rows), shared=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1
    torch._dynamo.reset()


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 16), N=st.integers(1, 70), K=st.integers(1, 150), dtype=st.sampled_from([torch.float32,
       torch.bfloat16]), t=st.floats(0.0, 1.2), bias=st.booleans(), seed=st.integers(0, 1000),
       loop=st.sampled_from([None, "dot", "in_thread", "packed"]), iters=st.integers(1, 4))
def test_shared_mask_gemv_matches_float64(M, N, K, dtype, t, bias, seed, loop, iters):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE).t().contiguous().t()
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    if loop == "in_thread" and M > 8:
        loop = "dot"
    if loop == "packed" and M == 1:  # one row: its own mask, the one-row loops
        loop = None
    cfg = None if loop is None else make_config(N, K, BN=32, BK=16, iters=iters, use_dot=loop in ("dot", "packed"),
                                                in_thread=loop == "in_thread", packed_dot=loop == "packed")
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    for _ in range(2):
        sg.sparse_gemv(x, w, b, t, config=cfg, out=y, shared=True)
        ref = reference_sparse_linear(x.cpu().double(), w.cpu().double(), None if b is None else b.cpu().double(), t,
                                      shared=True)
        assert not torch.isnan(y).any()
        assert rel_err(y.cpu(), ref) <= TOL[dtype]


def test_shared_mask_takes_up_to_16_rows_and_per_row_masks_8():
    x, w = torch.randn(16, 40, device=DEVICE), torch.randn(32, 40, device=DEVICE).t().contiguous().t()
    assert sg.sparse_gemv(x, w, None, 0.5, shared=True).shape == (16, 32)
    with pytest.raises(ValueError, match="rows"):
        sg.sparse_gemv(x, w, None, 0.5)
    with pytest.raises(ValueError, match="rows"):
        sg.sparse_gemv(torch.randn(17, 40, device=DEVICE), w, None, 0.5, shared=True)


@pytest.mark.parametrize("M,loop", [(3, "in_thread"), (6, "dot"), (12, "dot"), (5, "packed"), (16, "packed")])
def test_shared_mask_grouped_and_swiglu(M, loop):
    g = torch.Generator().manual_seed(M)
    K, Ns = 72, [48, 16, 16]
    x = torch.randn(M, K, generator=g).to(DEVICE)
    ws = [(torch.randn(N, K, generator=g) / K**0.5).to(DEVICE).t().contiguous().t() for N in Ns]
    ts = [0.6, 0.8, 0.4]
    cfg = replace(make_config(sum(Ns), K, BN=16, BK=16, iters=2, use_dot=loop in ("dot", "packed"),
                              in_thread=loop == "in_thread", packed_dot=loop == "packed"), apart=True)
    for y, w, t in zip(sg.sparse_gemv_group(x, ws, [None] * 3, ts, config=cfg, shared=True), ws, ts):
        ref = reference_sparse_linear(x.cpu().double(), w.cpu().double(), None, t, shared=True)
        assert rel_err(y.cpu(), ref) <= 1e-5
    h = sg.sparse_gemv_swiglu(x, ws[1], ws[2], 0.5, 0.7, config=cfg, shared=True)
    gate = reference_sparse_linear(x.cpu().double(), ws[1].cpu().double(), None, 0.5, shared=True)
    up = reference_sparse_linear(x.cpu().double(), ws[2].cpu().double(), None, 0.7, shared=True)
    assert rel_err(h.cpu(), torch.nn.functional.silu(gate) * up) <= 1e-5


def test_dispatch_rule_compares_the_rows_read_with_the_measured_break_even(monkeypatch):
    from teal_fx.kernels import sparse_gemv_config as cfg

    assert cfg.expected_kept(4, 0.5, shared=False) == pytest.approx(1 - 0.5**4)
    assert cfg.expected_kept(4, 0.5, shared=True) == cfg.expected_kept(1, 0.5, shared=False) == 0.5
    monkeypatch.setattr(cfg, "BREAK_EVEN_KEPT", {"H200": {
        "per_row": {"attention": {1: 2.0, 2: 2.0, 8: 0.0}, "mlp": {1: 2.0, 2: 0.7, 8: 0.0}},
        "shared": {"attention": {2: 0.9, 16: 0.3}, "mlp": {2: 0.9, 16: 0.6}}}})
    gpu, mlp, attn = "NVIDIA H200", (14336, 4096), (4096, 4096)
    assert cfg.shape_class(*mlp) == "mlp" and cfg.shape_class(4096, 14336) == "mlp"
    assert cfg.shape_class(*attn) == cfg.shape_class(6144, 4096) == "attention"
    assert cfg.kernel_pays(1, 0.0, False, gpu, *mlp)  # one row: the kernel even at 0%
    assert not cfg.kernel_pays(2, 0.5, False, gpu, *mlp)  # the union of 2 rows at 50% keeps 0.75 > 0.7
    assert cfg.kernel_pays(2, 0.5, False, gpu, *attn)  # ... which the attention class's 2.0 still takes
    assert cfg.kernel_pays(2, 0.6, False, gpu, *mlp)  # 1 - 0.36 = 0.64 < 0.7
    assert not cfg.kernel_pays(4, 0.9, False, gpu, *mlp)  # 4 rows take the 8-row entry: never
    assert cfg.kernel_pays(8, 0.5, True, gpu, *mlp) and not cfg.kernel_pays(9, 0.3, True, gpu, *mlp)  # the 16 entry
    assert cfg.kernel_pays(16, 0.5, True, gpu, *mlp) and not cfg.kernel_pays(16, 0.5, True, gpu, *attn)  # by class
    assert cfg.kernel_pays(8, -1.0, False, gpu, *mlp) and cfg.kernel_pays(8, None, False, gpu, *attn)  # unknown
    assert cfg.kernel_pays(2, 0.5, True, "Another GPU", *mlp) == cfg.kernel_pays(2, 0.5, True, gpu, *mlp)  # default


def test_packed_columns_of_an_earlier_launch_never_leak():
    """The packed tensor-core loop reads whole tiles of packed x columns, past the survivors' count: those slots must
    be zeros, not an earlier launch's values (an inf there times a zero weight row would be NaN)."""
    K, N, M = 64, 48, 4
    w = (torch.randn(N, K) / K**0.5).to(DEVICE).t().contiguous().t()
    cfg = make_config(N, K, BN=16, BK=16, iters=4, use_dot=True, packed_dot=True)
    poisoned = torch.randn(M, K)
    poisoned[:, 5] = float("inf")  # all kept at t = 0: packed into slot 5
    sg.sparse_gemv(poisoned.to(DEVICE), w, None, 0.0, config=cfg, shared=True)
    x = torch.full((M, K), 0.01)
    x[:, 0] = 2.0  # only input 0 survives: one slot, and the tile read holds slots 0-15
    y = sg.sparse_gemv(x.to(DEVICE), w, None, 1.0, config=cfg, shared=True)
    ref = reference_sparse_linear(x.double(), w.cpu().double(), None, 1.0, shared=True)
    assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-5
