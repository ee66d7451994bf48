"""The q/k/v + RoPE finishing launch (``sparse_gemv_qkv_rope``) against its reference: the grouped GEMV's outputs
through ``reference_qkv_rope_`` (heads, RoPE as eager rounds it, the cache writes). Poisoned q and caches, so every
element it should write must be written and no other cache row touched.

Runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (conftest sets it)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402
from teal_fx.kernels.quantize import quantize_int4, quantize_int8  # noqa: E402
from teal_fx.kernels.reference import reference_qkv_rope_  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"
# the same sums through both paths, except that on a GPU the split-K sums meet in a varying order, and that the CPU
# interpreter truncates to bf16 where eager rounds (up to an ulp for each of the finish's roundings)
TOL = {torch.float32: 1e-5 if ON_GPU else 0.0, torch.float16: 2e-3 if ON_GPU else 0.0, torch.bfloat16: 1e-2}
# the q/k norm's statistic: 1 / sqrt against torch.rsqrt, and the mean's order of summation (an ulp of r, which can
# move a rounding of the normed values); the norm adds two bf16 roundings, which the interpreter truncates
NORM_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2 if ON_GPU else 3e-2}


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def operands(B, hq, hkv, D, K, dtype, fmt, bias, per_row_angles, seed, L=6):
    g = torch.Generator().manual_seed(seed)

    def weight(n):
        w = (torch.randn(n, K, generator=g) / K**0.5).to(dtype)
        if fmt is not None:
            q, s = {"int8": quantize_int8, "int4": quantize_int4}[fmt](w)
            return q.to(DEVICE), s.to(DEVICE)
        return w.to(DEVICE).t().contiguous().t(), None

    (wq, sq), (wk, sk), (wv, sv) = weight(hq * D), weight(hkv * D), weight(hkv * D)
    x = torch.randn(B, 1, K, generator=g).to(dtype).to(DEVICE)
    biases = [torch.randn(n, generator=g).to(dtype).to(DEVICE) for n in (hq * D, hkv * D, hkv * D)] if bias \
        else [None] * 3
    angles = torch.rand(B if per_row_angles else 1, 1, 1, D // 2, generator=g) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
    pos = torch.tensor([int(torch.randint(0, L, (1,), generator=g))], device=DEVICE)
    caches = [torch.full((B, hkv, L, D), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    return x, [wq, wk, wv], biases, [sq, sk, sv], cos, sin, pos, caches


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), heads=st.sampled_from([(2, 1), (4, 2), (3, 3), (8, 2)]),
       D=st.sampled_from([16, 32, 64, 128] if ON_GPU else [16, 32, 64]),
       K=st.integers(16, 80), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       fmt=st.sampled_from([None, "int8", "int4"]), bias=st.booleans(), per_row_angles=st.booleans(),
       t=st.floats(0.0, 1.0), seed=st.integers(0, 1000), x_int8=st.booleans(), qk_norm=st.booleans())
def test_matches_group_then_reference(B, heads, D, K, dtype, fmt, bias, per_row_angles, t, seed, x_int8, qk_norm):
    hq, hkv = heads
    if fmt == "int4" and hkv * D < 32:  # a grouped launch takes weights of at least 16 stored rows (_groupable)
        D = 32
    x, ws, bs, scales, cos, sin, pos, (kc, vc) = operands(B, hq, hkv, D, K, dtype, fmt, bias, per_row_angles, seed)
    ts = [t, t / 2, 0.0]
    x_int8 = x_int8 and fmt is not None and B == 1 and dtype != torch.float32  # a plan's activations="int8"
    # Qwen3's per-head q/k norms (weights around 1, as trained ones are)
    g = torch.Generator().manual_seed(seed + 1)
    norms = [(1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEVICE) for _ in range(2)] if qk_norm \
        else [None, None]
    q = sg.sparse_gemv_qkv_rope(x, ws, bs, ts, D, cos, sin, pos, kc, vc, *norms, 1e-6, scales=scales, x_int8=x_int8)

    # the reference from the grouped GEMV's own outputs, so only the finish is compared (the GEMV has its tests)
    yq, yk, yv = sg.sparse_gemv_group(x, ws, bs, ts, scales=scales, x_int8=x_int8)
    kc_ref, vc_ref = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    q_ref = reference_qkv_rope_(yq, yk, yv, D, cos, sin, pos, kc_ref, vc_ref, *norms, 1e-6)

    assert q.shape == q_ref.shape == (B, hq, 1, D)
    p = int(pos)
    for got, ref in ((q, q_ref), (kc[:, :, p], kc_ref[:, :, p]), (vc[:, :, p], vc_ref[:, :, p])):
        assert not torch.isnan(got).any(), "unwritten elements"
        assert rel_err(got, ref) <= max(TOL[dtype], NORM_TOL[dtype] if qk_norm else 0.0)
    others = [i for i in range(kc.shape[2]) if i != p]
    assert torch.isnan(kc[:, :, others]).all() and torch.isnan(vc[:, :, others]).all(), "another cache row written"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_with_x_on_its_int8_grid(fmt):
    """A plan's activations="int8" (one row, dp4a): the same finish after the int8-x GEMV."""
    test_matches_group_then_reference.hypothesis.inner_test(1, (4, 2), 32, 64, torch.bfloat16, fmt, True, False, 0.2,
                                                             5, True, False)


def test_rotation_is_rope():
    """Independently of reference_qkv_rope_: RoPE by its definition, a rotation of each pair (d, d + D/2) by the
    angle, in float64 from the same fp32 sums (fp32 operands: the finish's roundings are exact enough to compare)."""
    B, hq, hkv, D, K = 2, 2, 1, 16, 32
    x, ws, bs, scales, cos, sin, pos, (kc, vc) = operands(B, hq, hkv, D, K, torch.float32, None, True, True, 3)
    q = sg.sparse_gemv_qkv_rope(x, ws, bs, [0.0] * 3, D, cos, sin, pos, kc, vc)
    y = torch.nn.functional.linear(x.double(), ws[0].double(), bs[0].double()).view(B, hq, D)
    c, s = cos.double().view(-1, 1, D)[..., : D // 2], sin.double().view(-1, 1, D)[..., : D // 2]
    a, b = y[..., : D // 2], y[..., D // 2:]
    expect = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    torch.testing.assert_close(q.double().view(B, hq, D), expect, atol=1e-5, rtol=1e-5)


def test_refuses_what_it_cannot_fold():
    x, ws, bs, scales, cos, sin, pos, (kc, vc) = operands(1, 2, 1, 16, 32, torch.float32, None, False, False, 0)
    assert sg.can_fold_rope(x, ws, 16, cos, sin, pos, kc, vc)
    assert not sg.can_fold_rope(x, ws, 12, cos, sin, pos, kc, vc)  # not a power of two
    assert not sg.can_fold_rope(x.expand(1, 2, 32), ws, 16, cos, sin, pos, kc, vc)  # two tokens: a prefill
    assert not sg.can_fold_rope(x, ws, 16, cos.double(), sin, pos, kc, vc)  # cos in another dtype
    assert not sg.can_fold_rope(x, ws, 16, cos, sin, torch.tensor([1, 2], device=x.device), kc, vc)  # two cache rows
    assert not sg.can_fold_rope(x, [w.contiguous() for w in ws], 16, cos, sin, pos, kc, vc)  # row-major weights
    norm = torch.ones(16, device=x.device)
    assert sg.can_fold_rope(x, ws, 16, cos, sin, pos, kc, vc, norm, norm)
    assert not sg.can_fold_rope(x, ws, 16, cos, sin, pos, kc, vc, norm, None)  # q normed, k not
    assert not sg.can_fold_rope(x, ws, 16, cos, sin, pos, kc, vc, norm[:8], norm[:8])  # not [D]
    with pytest.raises(ValueError, match="can_fold_rope"):
        sg.sparse_gemv_qkv_rope(x, ws, bs, [0.0] * 3, 12, cos, sin, pos, kc, vc)


@pytest.mark.skipif(not ON_GPU, reason="the Llama-3-8B shape: a GPU's test (the interpreter takes minutes)")
@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama3_8b_heads(fmt, B, qk_norm):
    """32 query heads and 8 KV heads of 128 over K = 4096, bf16, the configs the decode step picks at 50% (with the
    q/k norms: Qwen3-8B's heads)."""
    x, ws, bs, scales, cos, sin, pos, (kc, vc) = operands(B, 32, 8, 128, 4096, torch.bfloat16, fmt, False, True, 7,
                                                          L=64)
    norms = [torch.full((128,), 1.1, dtype=torch.bfloat16, device=DEVICE)] * 2 if qk_norm else [None, None]
    ts = [0.1, 0.1, 0.1]
    q = sg.sparse_gemv_qkv_rope(x, ws, bs, ts, 128, cos, sin, pos, kc, vc, *norms, 1e-6, scales=scales, sparsity=0.5)
    yq, yk, yv = sg.sparse_gemv_group(x, ws, bs, ts, scales=scales, sparsity=0.5)
    kc_ref, vc_ref = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    q_ref = reference_qkv_rope_(yq, yk, yv, 128, cos, sin, pos, kc_ref, vc_ref, *norms, 1e-6)
    p = int(pos)
    for got, ref in ((q, q_ref), (kc[:, :, p], kc_ref[:, :, p]), (vc[:, :, p], vc_ref[:, :, p])):
        assert rel_err(got, ref) <= TOL[torch.bfloat16]


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), heads=st.sampled_from([(2, 1), (4, 2), (3, 3), (8, 2)]), D=st.sampled_from([16, 32]),
       K=st.integers(16, 64), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       fmt=st.sampled_from([None, "int8", "int4"]), bias=st.booleans(), per_row_angles=st.booleans(),
       t=st.floats(0.0, 1.0), seed=st.integers(0, 1000), qk_norm=st.booleans(),
       mask=st.sampled_from([None, "bool", "float"]), splits=st.integers(1, 3))
def test_attention_from_sums_matches_finish_then_attention(B, heads, D, K, dtype, fmt, bias, per_row_angles, t, seed,
                                                           qk_norm, mask, splits):
    """The q/k/v + RoPE finish folded into the attention (``decode_attention_from_qkv_sums``) against the finish
    then the attention (the same configs): the output and both caches bit for bit on the interpreter, with 1-3 splits
    of the cache (the position in any of them); the workspaces zero after."""
    from teal_fx.kernels import decode_attention as da

    hq, hkv = heads
    if fmt == "int4" and hkv * D < 32:
        D = 32
    L = 40  # blocks of 16 positions (a GPU's dots take 16 or more; blocks of 2 failed to compile on an H100)
    x, ws, bs, scales, cos, sin, pos, _ = operands(B, hq, hkv, D, K, dtype, fmt, bias, per_row_angles, seed, L=L)
    g = torch.Generator().manual_seed(seed + 2)
    caches = [torch.randn(B, hkv, L, D, generator=g).to(dtype).to(DEVICE) for _ in range(2)]
    attend = torch.arange(L, device=DEVICE) <= pos  # the static cache's rows up to the new one
    m = {None: None, "bool": attend.view(1, 1, 1, L),
         "float": torch.where(attend, 0.0, float("-inf")).to(dtype).view(1, 1, 1, L)}[mask]
    norms = [(1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEVICE) for _ in range(2)] if qk_norm \
        else [None, None]
    ts = [t, t / 2, 0.0]
    cfg = da.split_cache(da.launch_config(B, hq, hkv, L, D, x.device), L, splits, block_l=16)

    kc_ref, vc_ref = (c.clone() for c in caches)
    q = sg.sparse_gemv_qkv_rope(x, ws, bs, ts, D, cos, sin, pos, kc_ref, vc_ref, *norms, 1e-6, scales=scales)
    ref = da.decode_attention_gpu(q, kc_ref, vc_ref, m, 0.3, config=cfg)
    kc, vc = (c.clone() for c in caches)
    sums = sg.sparse_gemv_sums(x, ws, ts, scales=scales)
    out = da.decode_attention_from_qkv_sums(sums, bs, D, cos, sin, pos, kc, vc, *norms, 1e-6, m, 0.3, config=cfg)
    assert all(not s.any() for s in sums), "the q/k/v sums left in the workspace"
    assert all(not buf.any() for (_, name), buf in da._WORKSPACE.bufs.items() if name == "cnt")
    if ON_GPU:  # the sums meet in another order: a rounding of q may move
        assert rel_err(out, ref) <= max(TOL[dtype], NORM_TOL[dtype])
        assert rel_err(kc, kc_ref) <= NORM_TOL[dtype] and rel_err(vc, vc_ref) <= NORM_TOL[dtype]
    else:
        assert torch.equal(out, ref) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.skipif(not ON_GPU, reason="the Llama-3-8B shape: a GPU's test (the interpreter takes minutes)")
@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama3_8b_attention_from_sums(fmt, B, qk_norm):
    """The fold on Llama-3-8B's heads (Qwen3-8B's with the norms) over a 2048-position cache (the launcher's own
    splits, the new row at 1000), the configs the decode step picks at 50%, against the finish then the attention."""
    from teal_fx.kernels import decode_attention as da

    x, ws, bs, scales, cos, sin, _, _ = operands(B, 32, 8, 128, 4096, torch.bfloat16, fmt, False, True, 7)
    L, pos = 2048, torch.tensor([1000], device=DEVICE)
    caches = [torch.randn(B, 8, L, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    mask = (torch.arange(L, device=DEVICE) <= pos).view(1, 1, 1, L)
    norms = [torch.full((128,), 1.1, dtype=torch.bfloat16, device=DEVICE)] * 2 if qk_norm else [None, None]
    ts = [0.1, 0.1, 0.1]
    kc_ref, vc_ref = (c.clone() for c in caches)
    q = sg.sparse_gemv_qkv_rope(x, ws, bs, ts, 128, cos, sin, pos, kc_ref, vc_ref, *norms, 1e-6, scales=scales,
                                sparsity=0.5)
    ref = da.decode_attention_gpu(q, kc_ref, vc_ref, mask, 128**-0.5)
    kc, vc = (c.clone() for c in caches)
    sums = sg.sparse_gemv_sums(x, ws, ts, scales=scales, sparsity=0.5)
    out = da.decode_attention_from_qkv_sums(sums, bs, 128, cos, sin, pos, kc, vc, *norms, 1e-6, mask, 128**-0.5)
    assert all(not s.any() for s in sums)
    for got, want in ((out, ref), (kc, kc_ref), (vc, vc_ref)):
        assert rel_err(got, want) <= NORM_TOL[torch.bfloat16]
