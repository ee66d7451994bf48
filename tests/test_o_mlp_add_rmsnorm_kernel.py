"""The block's second half with o's add + RMSNorm finish folded into the gate/up launch
(``sparse_gemv_o_mlp_add_rmsnorm``, fold=True) against the launchers it replaces (fold=False:
``sparse_gemv_add_rmsnorm`` then ``sparse_gemv_mlp_add_rmsnorm``, the same configs) and the op's CPU reference; the
workspace zero after every call.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (conftest sets it)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels.sparse_gemv_config import choose_config, make_config  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402
from tests.test_mlp_add_rmsnorm_kernel import TOL, down_config, rel_err, weight, workspace_is_zero  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"


def gate_up_config(loop: str, N: int, K: int, iters: int, fmt):
    """The rule, or gate/up split along K in the one-row masked or packed loop."""
    if loop == "rule":
        return choose_config(1, N, K, 0.5, fmt)
    return make_config(N, K, BN=32, BK=16, iters=iters, use_dot=False, in_thread=True, compact=loop == "compact")


@settings(max_examples=30 if ON_GPU else 12, deadline=None)
@given(inter=st.integers(8, 40).map(lambda n: 2 * n), hidden=st.integers(8, 40).map(lambda n: 2 * n),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), fmt=st.sampled_from([None, "int8", "int4"]),
       ts=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.5)),
       o_bias=st.booleans(), down_bias=st.booleans(), loops=st.tuples(*[st.sampled_from(["rule", "in_thread", "compact"])] * 2),
       iters=st.integers(1, 2), seed=st.integers(0, 1000))
def test_folded_norm_matches_o_then_mlp(inter, hidden, dtype, fmt, ts, o_bias, down_bias, loops, iters, seed):
    if fmt == "int4":
        inter, hidden = max(inter, 32), max(hidden, 32)  # grouped launches take weights of >= 16 stored rows
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 1, hidden, generator=g).to(dtype).to(DEVICE)
    (wo, so), (wg, sg_), (wu, su), (wd, sd) = (weight(hidden, hidden, dtype, fmt, g), weight(inter, hidden, dtype, fmt, g),
                                               weight(inter, hidden, dtype, fmt, g), weight(hidden, inter, dtype, fmt, g))
    bo = torch.randn(hidden, generator=g).to(dtype).to(DEVICE) if o_bias else None
    bd = torch.randn(hidden, generator=g).to(dtype).to(DEVICE) if down_bias else None
    res = torch.randn(1, 1, hidden, generator=g).to(dtype).to(DEVICE)
    nw1, nw2 = [(1 + torch.randn(hidden, generator=g) / 4).to(dtype).to(DEVICE) for _ in range(2)]
    if ON_GPU and dtype != torch.float32:
        # on a GPU the norm's sum adds in another order, so x may move by an ulp and flip an input at a threshold
        ts = (ts[0], 0.0, 0.0, 0.0)
    cfg_gu = gate_up_config(loops[0], 2 * inter, hidden, iters, fmt)
    cfg_d = down_config(loops[1], hidden, inter, iters)
    kw = dict(scales=(so, sg_, su, sd), configs=(None, cfg_gu, cfg_d))
    args = (a, wo, bo, ts[0], res, nw1, 1e-5, wg, wu, wd, bd, ts[1], ts[2], ts[3], nw2, 1e-6)
    h_ref, out_ref = sg.sparse_gemv_o_mlp_add_rmsnorm(*args, fold=False, **kw)
    assert workspace_is_zero()
    for _ in range(2):  # twice: o's, gate/up's and down's sums must all be left zero
        h, out = sg.sparse_gemv_o_mlp_add_rmsnorm(*args, fold=True, **kw)
        assert h.shape == out.shape == res.shape
        assert workspace_is_zero()
        if ON_GPU:
            assert rel_err(h, h_ref) <= TOL[dtype] and rel_err(out, out_ref) <= TOL[dtype]
        else:  # the programs run in grid order and the norm's sum over the same padded row: bit for bit
            assert torch.equal(h, h_ref) and torch.equal(out, out_ref)

    # and the op's CPU reference, in fp32 (the interpreter truncates bf16/fp16 where eager rounds)
    if dtype != torch.float32:
        return
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args[:14]]
    h_cpu, out_cpu = torch.ops.teal.sparse_o_mlp_add_rmsnorm(
        *cpu, 1.0, [0.5] * 4, nw2.cpu(), 1e-6, *(s.cpu() if s is not None else None for s in (so, sg_, su, sd)))
    assert rel_err(h.cpu(), h_cpu) <= TOL[dtype] and rel_err(out.cpu(), out_cpu) <= TOL[dtype]


def test_folds_only_small_gate_up_grids_of_one_row():
    packed = choose_config(1, 2 * 14336, 4096, 0.5, "int4")  # 448 programs
    masked = choose_config(1, 2 * 14336, 4096, 0.5, "int8")  # 3584 programs
    assert sg.folds_mlp_norm(1, packed, 2 * 14336)
    assert not sg.folds_mlp_norm(1, masked, 2 * 14336)
    assert not sg.folds_mlp_norm(2, packed, 2 * 14336)
    assert not sg.folds_mlp_norm(1, packed, 2 * 14336, x_int8=True)


def test_refuses_what_it_cannot_fold():
    a = torch.randn(1, 32, device=DEVICE)
    wo = torch.randn(32, 32, device=DEVICE).t().contiguous().t()
    wg = torch.randn(48, 32, device=DEVICE).t().contiguous().t()
    wd = torch.randn(32, 48, device=DEVICE).t().contiguous().t()
    res, nw = torch.randn(1, 32, device=DEVICE), torch.ones(32, device=DEVICE)
    assert sg.can_fold_mlp_norm(a, wo, res, nw, wg, wg, wd, nw)
    assert not sg.can_fold_mlp_norm(a, wo[:24], res, nw, wg, wg, wd, nw)  # gate does not take o's outputs
    assert not sg.can_fold_mlp_norm(a, wo, res, nw, wg, wg, wd, nw, x_int8=True)
    with pytest.raises(ValueError, match="can_fold_mlp_norm"):
        sg.sparse_gemv_o_mlp_add_rmsnorm(a, wo, None, 0.1, res, nw, 1e-6, wg, wg.contiguous(), wd, None, 0.1, 0.1, 0.1,
                                         nw, 1e-6)  # up row-major
    with pytest.raises(ValueError, match="one row"):
        sg.sparse_gemv_o_mlp_add_rmsnorm(a.expand(2, 32), wo, None, 0.1, res.expand(2, 32), nw, 1e-6, wg, wg, wd,
                                         None, 0.1, 0.1, 0.1, nw, 1e-6, fold=True)


def test_fp32_x_takes_the_rules_adjusted_configs():
    """The rule's configs with fp16 sums (weight_math 2 at gate/up's 2048 x 256) are exact-sum configs for fp32 x
    once the launcher adjusts them; the folded launcher leaves the rule to the launches (it reads a config only to
    decide), so fp32 x runs, folded and not, with the same result."""
    g = torch.Generator().manual_seed(0)
    (wo, so), (wg, sg_), (wu, su), (wd, sd) = (weight(256, 256, torch.float32, "int4", g),
                                               *(weight(1024, 256, torch.float32, "int4", g) for _ in range(2)),
                                               weight(256, 1024, torch.float32, "int4", g))
    assert choose_config(1, 2048, 256, 0.5, "int4").weight_math == 2
    a, res = (torch.randn(1, 1, 256, generator=g).to(DEVICE) for _ in range(2))
    nw = (torch.rand(256, generator=g) + 0.5).to(DEVICE)
    args = (a, wo, None, 0.3, res, nw, 1e-5, wg, wu, wd, None, 0.3, 0.3, 0.3, nw, 1e-6)
    kw = dict(sparsities=(0.5, 0.5, 0.5), scales=(so, sg_, su, sd))
    h, out = sg.sparse_gemv_o_mlp_add_rmsnorm(*args, fold=True, **kw)
    h_ref, out_ref = sg.sparse_gemv_o_mlp_add_rmsnorm(*args, fold=False, **kw)
    assert rel_err(h, h_ref) <= TOL[torch.float32] and rel_err(out, out_ref) <= TOL[torch.float32]
    assert workspace_is_zero()
