"""The teal::sparse_linear op: semantics against float64, opcheck, autograd."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from teal_fx.kernels import reference_sparse_linear, sparse_linear
from teal_fx.kernels.quantize import dequantize, quantize_int8
from tests.conftest import int8_tiles


def _ref64(x, w, b, t, start):
    x64 = x.double()
    keep = x.abs().float() > t
    if x.dim() >= 3 and start:
        keep[..., :start, :] = True
    y = torch.where(keep, x64, 0.0) @ w.double().t()
    return y + b.double() if b is not None else y


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4), seq=st.integers(1, 6), k=st.integers(1, 40), n=st.integers(1, 24),
    t=st.floats(0, 2), frac=st.sampled_from([0.0, 0.5, 1.0]), bias=st.booleans(),
)
def test_matches_float64(rows, seq, k, n, t, frac, bias):
    x = torch.randn(rows, seq, k)
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    y = sparse_linear(x, w, b, t, frac)
    start = 0 if seq == 1 else min(seq, int(-(-frac * seq // 1)))
    torch.testing.assert_close(y.double(), _ref64(x, w, b, t, start), atol=1e-4, rtol=1e-4)


def test_decode_sparse_prefill_dense_by_default():
    x = torch.randn(2, 5, 16)
    w = torch.randn(8, 16)
    assert torch.equal(sparse_linear(x, w, None, 10.0), x @ w.t())  # prefill: dense
    one = x[:, :1]
    assert torch.equal(sparse_linear(one, w, None, 10.0), torch.zeros(2, 1, 8))  # decode: all masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(2, 1, 16, dtype=dtype, requires_grad=dtype == torch.float32)
    w = torch.randn(8, 16, dtype=dtype, requires_grad=dtype == torch.float32)
    b = torch.randn(8, dtype=dtype)
    torch.library.opcheck(torch.ops.teal.sparse_linear.default, (x, w, b, 0.5, 1.0))
    torch.library.opcheck(torch.ops.teal.sparse_linear.default, (x, w, b, 0.5, 1.0, 0.7))
    torch.library.opcheck(torch.ops.teal.sparse_linear.default, (torch.randn(3, 4, 16, dtype=dtype), w.detach(), None, 0.2, 0.5))


def test_gradients_match_masked_linear():
    x = torch.randn(3, 1, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: sparse_linear(x, w, b, 0.7, 1.0), (x, w, b))


def test_reference_is_what_the_op_runs_on_cpu():
    x, w = torch.randn(1, 3, 8), torch.randn(4, 8)
    assert torch.equal(sparse_linear(x, w, None, 0.3, 0.0), reference_sparse_linear(x, w, None, 0.3, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_opcheck(dtype):
    grad = dtype == torch.float32
    x = torch.randn(2, 1, 16, dtype=dtype, requires_grad=grad)
    ws = [torch.randn(n, 16, dtype=dtype, requires_grad=grad) for n in (8, 4, 4)]
    op = torch.ops.teal.sparse_linear_group.default
    torch.library.opcheck(op, (x, ws, [None, None, None], [0.5, 0.1, 1.0], 1.0, [0.5, 0.6, -1.0], [None] * 3, False, False))
    bs = [torch.randn(n, dtype=dtype) for n in (8, 4, 4)]
    torch.library.opcheck(op, (torch.randn(3, 4, 16, dtype=dtype), [w.detach() for w in ws], bs, [0.2, 0.3, 0.4], 0.5, [0.7, 0.7, 0.7],
                                [None] * 3, False, False))


def test_group_equals_one_op_per_weight_and_its_gradients():
    x = torch.randn(3, 1, 12, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 12, dtype=torch.float64, requires_grad=True) for n in (5, 3)]
    ts = [0.7, 0.2]
    group = torch.ops.teal.sparse_linear_group(x, ws, [None, None], ts, 1.0, [0.4, 0.7], [None, None], False, False)
    for y, w, t in zip(group, ws, ts):
        torch.testing.assert_close(y, sparse_linear(x, w, None, t, 1.0))
    torch.autograd.gradcheck(lambda x, a, b: torch.ops.teal.sparse_linear_group(x, [a, b], [None, None], ts, 1.0, [0.4, 0.7],
                                                                                [None, None], False, False),
                             (x, *ws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq,psf", [(1, 1.0), (4, 1.0), (4, 0.5)])
def test_swiglu_is_silu_gate_times_up_and_opchecks(dtype, seq, psf):
    x = torch.randn(2, seq, 16, dtype=dtype)
    wg, wu = (torch.randn(24, 16, dtype=dtype) for _ in range(2))
    got = torch.ops.teal.sparse_swiglu(x, wg, wu, 0.5, 0.8, psf, [0.5, -1.0])
    want = torch.nn.functional.silu(sparse_linear(x, wg, None, 0.5, psf)) * sparse_linear(x, wu, None, 0.8, psf)
    assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.teal.sparse_swiglu.default, (x, wg, wu, 0.5, 0.8, psf, [0.5, -1.0]))


def test_deterministic_algorithms_turn_the_kernel_off_with_one_warning(monkeypatch):
    """The gate that keeps the ops off the sparse GEMV (fp32 atomics) under torch.use_deterministic_algorithms;
    that the ops then give their reference on a GPU is tests/test_gpu.py's."""
    from teal_fx.kernels import sparse_gemv as sg

    monkeypatch.setattr(sg, "_warned_deterministic", False)
    assert not sg._deterministic_requested()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(UserWarning, match="reproducible"):
            assert sg._deterministic_requested()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sg._deterministic_requested()  # said once
    finally:
        torch.use_deterministic_algorithms(False)
    assert not sg._deterministic_requested()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_opcheck_and_expression(dtype):
    """teal::sparse_linear_add_rmsnorm: opcheck (fake, schema), and on CPU exactly the eager expression it replaces."""
    from teal_fx.kernels import reference_rmsnorm

    op = torch.ops.teal.sparse_linear_add_rmsnorm.default
    x, w, b = torch.randn(2, 1, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype), torch.randn(8, dtype=dtype)
    r, nw = torch.randn(2, 1, 8, dtype=dtype), torch.randn(8, dtype=dtype)
    torch.library.opcheck(op, (x, w, b, 0.5, 1.0, 0.5, r, nw, 1e-6))
    torch.library.opcheck(op, (torch.randn(3, 4, 16, dtype=dtype), w, None, 0.2, 0.5, -1.0, torch.randn(3, 4, 8, dtype=dtype),
                               nw, 1e-5))
    h, out = op(x, w, b, 0.5, 1.0, 0.5, r, nw, 1e-6)
    h_want = r + sparse_linear(x, w, b, 0.5, 1.0)
    hf = h_want.float()
    out_want = nw * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(h, h_want) and torch.equal(out, out_want)
    assert torch.equal(reference_rmsnorm(h_want, nw, 1e-6), out_want)


@pytest.mark.parametrize("psf", [1.0, 0.5, 0.0])
def test_x_int8_rounds_the_sparsified_tokens_only(psf):
    """A plan's activations="int8": the masked input of each sparsified token on its int8 grid (32 inputs a scale),
    the dense tokens of a prefill as they are; one decode token is always sparsified."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 70, generator=g, dtype=torch.float64)
    w, scales = quantize_int8(torch.randn(24, 70, generator=g))
    wd = dequantize(w, scales, torch.float64)
    got = sparse_linear(x, w, None, 0.4, psf, 0.5, scales.double(), False, True)
    masked = torch.where(x.abs() > 0.4, x, 0.0)
    start = 4 if psf == 1.0 else int(4 * psf)
    want_x = torch.cat([x[:, :start], int8_tiles(masked[:, start:])], dim=1)
    torch.testing.assert_close(got, want_x @ wd.t(), rtol=1e-6, atol=1e-6)
    one = sparse_linear(x[:, :1], w, None, 0.4, psf, 0.5, scales.double(), False, True)
    torch.testing.assert_close(one, int8_tiles(masked[:, :1]) @ wd.t(), rtol=1e-6, atol=1e-6)
