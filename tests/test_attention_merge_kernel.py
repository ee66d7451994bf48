"""o's launch merging the decode attention's cache splits (``split_states_from_qkv_sums`` then
``sparse_gemv_merged_add_rmsnorm``) against the attention that merges them itself then o's add + RMSNorm launch
(``decode_attention_from_qkv_sums`` then ``sparse_gemv_add_rmsnorm``, the same configs): h, the normed h and both
caches bit for bit on the interpreter, the q/k/v sums and the workspaces zero after every call.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (conftest sets it)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
from teal_fx.kernels import decode_attention as da  # noqa: E402
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels.sparse_gemv_config import make_config  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402
from tests.test_mlp_add_rmsnorm_kernel import weight  # noqa: E402
from tests.test_qkv_rope_kernel import operands, rel_err  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"
# on a GPU the split-K sums meet in a varying order: a rounding of q, of x or of h may move
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def workspaces_are_zero() -> bool:
    gemv = all(not buf.any() for (_, name), buf in sg._WORKSPACE.bufs.items() if name in ("ws", "cnt"))
    return gemv and all(not buf.any() for (_, name), buf in da._WORKSPACE.bufs.items() if name == "cnt")


@settings(max_examples=30 if ON_GPU else 12, deadline=None)
@given(B=st.integers(1, 3), heads=st.sampled_from([(2, 1), (4, 2), (3, 3), (8, 2)]), D=st.sampled_from([16, 32]),
       K=st.integers(8, 32).map(lambda n: 2 * n), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       fmt=st.sampled_from([None, "int8", "int4"]), bias=st.booleans(), t=st.floats(0.0, 1.0),
       t_o=st.floats(0.0, 0.5), seed=st.integers(0, 1000), mask=st.sampled_from([None, "bool", "float"]),
       splits=st.integers(2, 3), loop=st.sampled_from(["rule", "in_thread", "compact"]), iters=st.integers(1, 3))
def test_o_merging_the_splits_matches_attention_then_o(B, heads, D, K, dtype, fmt, bias, t, t_o, seed, mask, splits,
                                                       loop, iters):
    hq, hkv = heads
    if fmt == "int4" and hkv * D < 32:
        D = 32
    if loop == "compact":
        B = 1  # the packed loop takes one row
    L = 40  # blocks of 16 positions (a GPU's dots take 16 or more), in 2 or 3 splits
    x, ws, bs, scales, cos, sin, pos, _ = operands(B, hq, hkv, D, K, dtype, fmt, bias, True, seed, L=L)
    g = torch.Generator().manual_seed(seed + 3)
    caches = [torch.randn(B, hkv, L, D, generator=g).to(dtype).to(DEVICE) for _ in range(2)]
    attend = torch.arange(L, device=DEVICE) <= pos
    m = {None: None, "bool": attend.view(1, 1, 1, L),
         "float": torch.where(attend, 0.0, float("-inf")).to(dtype).view(1, 1, 1, L)}[mask]
    cfg = da.split_cache(da.launch_config(B, hq, hkv, L, D, x.device), L, splits, block_l=16)
    assert cfg.nsplit == splits
    wo, so = weight(K, hq * D, dtype, fmt, g)
    bo = torch.randn(K, generator=g).to(dtype).to(DEVICE) if bias else None
    res = torch.randn(B, 1, K, generator=g).to(dtype).to(DEVICE)
    nw = (1 + torch.randn(K, generator=g) / 4).to(dtype).to(DEVICE)
    # o's K splits of 16-48 inputs: splits that straddle heads, as well as the rule's
    cfg_o = None if loop == "rule" else make_config(K, hq * D, BN=16, BK=16, iters=iters if fmt != "int4" else 1,
                                                    use_dot=False, in_thread=True, compact=loop == "compact")
    ts = [t, t / 2, 0.0]
    if ON_GPU and dtype != torch.float32:
        t_o = 0.0  # an ulp of x moved by the sums' order can flip an input at o's threshold (small shapes)

    kc_ref, vc_ref = (c.clone() for c in caches)
    sums = sg.sparse_gemv_sums(x, ws, ts, scales=scales)
    attn = da.decode_attention_from_qkv_sums(sums, bs, D, cos, sin, pos, kc_ref, vc_ref, None, None, 1e-6, m, 0.3,
                                             config=cfg)
    h_ref, out_ref = sg.sparse_gemv_add_rmsnorm(attn.transpose(1, 2).reshape(B, 1, hq * D), wo, bo, t_o, res, nw,
                                                1e-5, config=cfg_o, scales=so)
    kc, vc = (c.clone() for c in caches)
    for _ in range(2):  # twice: every sum must be left zero for the next call
        sums = sg.sparse_gemv_sums(x, ws, ts, scales=scales)
        states = da.split_states_from_qkv_sums(sums, bs, D, cos, sin, pos, kc, vc, None, None, 1e-6, m, 0.3,
                                               config=cfg)
        h, out = sg.sparse_gemv_merged_add_rmsnorm(states, wo, bo, t_o, res, nw, 1e-5, sums, config=cfg_o,
                                                   scales=so)
        assert h.shape == out.shape == res.shape
        assert all(not s.any() for s in sums), "the q/k/v sums left in the workspace"
        assert workspaces_are_zero()
        if ON_GPU:
            assert rel_err(h, h_ref) <= TOL[dtype] and rel_err(out, out_ref) <= TOL[dtype]
            assert rel_err(kc, kc_ref) <= TOL[dtype] and rel_err(vc, vc_ref) <= TOL[dtype]
        else:
            assert torch.equal(h, h_ref) and torch.equal(out, out_ref)
            assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_refuses_what_it_cannot_fold():
    """One cache split (the attention writes its output: nothing to merge), o not over the heads, 5 rows, int8 x."""
    x, ws, bs, scales, cos, sin, pos, caches = operands(1, 4, 2, 16, 32, torch.float32, None, False, False, 0)
    caches = [torch.zeros_like(c) for c in caches]
    one = da.split_cache(da.launch_config(1, 4, 2, 6, 16, x.device), 6, 1)
    sums = sg.sparse_gemv_sums(x, ws, [0.0] * 3)
    with pytest.raises(ValueError, match="two splits or more"):
        da.split_states_from_qkv_sums(sums, bs, 16, cos, sin, pos, *caches, None, None, 1e-6, None, 0.3, config=one)
    da.decode_attention_from_qkv_sums(sums, bs, 16, cos, sin, pos, *caches, None, None, 1e-6, None, 0.3)  # zeroes
    wo = torch.randn(32, 64, device=DEVICE).t().contiguous().t()
    res, nw = torch.randn(1, 1, 32, device=DEVICE), torch.ones(32, device=DEVICE)
    assert sg.can_fold_merge(1, 4, 16, wo, res, nw, torch.float32)
    assert not sg.can_fold_merge(1, 4, 16, wo[:, :48], res, nw, torch.float32)  # o does not take the heads
    assert not sg.can_fold_merge(5, 4, 16, wo, res.expand(5, 1, 32), nw, torch.float32)  # 5 rows: tensor cores
    assert not sg.can_fold_merge(1, 4, 16, wo, res, nw, torch.float32, x_int8=True)
    assert not sg.can_fold_merge(1, 4, 16, wo, res, nw, torch.bfloat16)  # the attention's dtype is not the residual's
