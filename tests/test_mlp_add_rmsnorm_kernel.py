"""The MLP launcher with the SwiGLU finish folded into the down launch (``sparse_gemv_mlp_add_rmsnorm``) against
the two launchers it replaces (``sparse_gemv_swiglu`` then ``sparse_gemv_add_rmsnorm``, the same configs) and the
op's CPU reference; the outputs poisoned first, the workspace zero after every call.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (conftest sets it)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels.quantize import quantize_int4, quantize_int8  # noqa: E402
from teal_fx.kernels.sparse_gemv_config import choose_config, make_config  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"
# the same launches' sums either way: on the CPU interpreter (programs in grid order) bit for bit; on a GPU the
# split-K sums meet in a varying order, and a rounding of x moved by one can move a rounding of h
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def weight(n, k, dtype, fmt, g):
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    if fmt is None:
        return w.to(DEVICE).t().contiguous().t(), None
    q, s = {"int8": quantize_int8, "int4": quantize_int4}[fmt](w)
    return q.to(DEVICE), s.to(DEVICE)


def down_config(loop: str, N: int, K: int, iters: int):
    """None (the rule), or a down launch split along K in that loop (one row: the masked or the packed loop)."""
    if loop == "rule":
        return None
    return make_config(N, K, BN=16, BK=16, iters=iters, use_dot=False, in_thread=True, compact=loop == "compact")


def workspace_is_zero() -> bool:
    return all(not buf.any() for (dev, name), buf in sg._WORKSPACE.bufs.items() if name in ("ws", "cnt"))


@settings(max_examples=30 if ON_GPU else 14, deadline=None)
@given(M=st.integers(1, 4), inter=st.integers(8, 40).map(lambda n: 2 * n), hidden=st.integers(8, 40).map(lambda n: 2 * n),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fmt=st.sampled_from([None, "int8", "int4"]),
       ts=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.5)), bias=st.booleans(),
       loop=st.sampled_from(["rule", "in_thread", "compact"]), iters=st.integers(1, 3), seed=st.integers(0, 1000))
def test_folded_mlp_matches_swiglu_then_add_rmsnorm(M, inter, hidden, dtype, fmt, ts, bias, loop, iters, seed):
    if loop == "compact":
        M = 1  # the packed loop takes one row
    if fmt == "int4":
        inter = max(inter, 32)  # a grouped launch takes weights of at least 16 stored rows (_groupable)
        iters = iters if loop != "compact" else min(iters, 2)  # packed int4: a program's inputs within a group (128)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 1, hidden, generator=g).to(dtype).to(DEVICE)
    (wg, sg_), (wu, su), (wd, sd) = weight(inter, hidden, dtype, fmt, g), weight(inter, hidden, dtype, fmt, g), \
        weight(hidden, inter, dtype, fmt, g)
    bd = torch.randn(hidden, generator=g).to(dtype).to(DEVICE) if bias else None
    res = torch.randn(M, 1, hidden, generator=g).to(dtype).to(DEVICE)
    nw = (1 + torch.randn(hidden, generator=g) / 4).to(dtype).to(DEVICE)
    if ON_GPU and dtype != torch.float32:
        # the gate/up sums meet in another order on a GPU, so silu(gate) * up may move by an ulp, and at a bf16 ulp
        # an input of these small shapes lands on down's threshold often enough to flip: down keeps every input
        ts = (ts[0], ts[1], 0.0)
    cfg_gu = choose_config(M, 2 * inter, hidden, 0.4, fmt)
    cfg_d = down_config(loop, hidden, inter, iters)

    act = sg.sparse_gemv_swiglu(x, wg, wu, ts[0], ts[1], config=cfg_gu, scales_gate=sg_, scales_up=su)
    h_ref, out_ref = sg.sparse_gemv_add_rmsnorm(act, wd, bd, ts[2], res, nw, 1e-5, config=cfg_d, scales=sd)
    for _ in range(2):  # twice: the gate/up sums and the down sums must both be left zero
        h, out = sg.sparse_gemv_mlp_add_rmsnorm(x, wg, wu, wd, ts[0], ts[1], ts[2], res, nw, 1e-5, b_down=bd,
                                                scales=(sg_, su, sd), configs=(cfg_gu, cfg_d))
        assert h.shape == out.shape == res.shape
        assert workspace_is_zero()
        if ON_GPU:
            assert rel_err(h, h_ref) <= TOL[dtype] and rel_err(out, out_ref) <= TOL[dtype]
        else:
            assert torch.equal(h, h_ref) and torch.equal(out, out_ref)

    # and the op's CPU reference (the two ops' references), in fp32: in bf16/fp16 the interpreter truncates where
    # eager rounds, which moves silu(gate) * up by an ulp and can flip an input of down at its threshold
    if dtype != torch.float32:
        return
    args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (x, wg, wu, wd, bd, *ts)]
    h_cpu, out_cpu = torch.ops.teal.sparse_mlp_add_rmsnorm(*args, 1.0, [0.4, 0.4, 0.4], res.cpu(), nw.cpu(), 1e-5,
                                                           *(s.cpu() if s is not None else None for s in (sg_, su, sd)))
    assert rel_err(h.cpu(), h_cpu) <= TOL[dtype] and rel_err(out.cpu(), out_cpu) <= TOL[dtype]


def test_refuses_what_it_cannot_fold():
    x = torch.randn(1, 32, device=DEVICE)
    wg = torch.randn(48, 32, device=DEVICE).t().contiguous().t()
    wd = torch.randn(32, 48, device=DEVICE).t().contiguous().t()
    res, nw = torch.randn(1, 32, device=DEVICE), torch.ones(32, device=DEVICE)
    assert sg.can_fold_swiglu(x, wg, wg, wd, res, nw)
    assert not sg.can_fold_swiglu(x, wg, wg, wd, res, nw, x_int8=True)  # x_int8 quantizes x in its own prologue
    assert not sg.can_fold_swiglu(x.expand(5, 32), wg, wg, wd, res.expand(5, 32), nw)  # 5 rows: tensor cores
    assert not sg.can_fold_swiglu(x, wg, wg, wd[:, :40], res, nw)  # down does not take gate's outputs
    with pytest.raises(ValueError, match="can_fold_swiglu"):
        sg.sparse_gemv_mlp_add_rmsnorm(x, wg, wg.contiguous(), wd, 0.1, 0.1, 0.1, res, nw, 1e-6)  # up row-major
