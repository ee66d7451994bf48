"""Can DRAM's idle time during a decode step's attention pre-load the o projection's weights into L2?

Between the q/k/v GEMV and the o GEMV a layer runs the q/k/v finish, RoPE with the cache write, and the attention:
~9 µs in which DRAM reads ~1.5 MB of cache (NOTES.md, v16 profile), where it could read ~25 MB. The o GEMV's mask
depends on the attention's output, so which of o's rows it will read is unknown then; at 50% half of any rows
requested early are wasted. But DRAM is idle anyway, and the kept half the o GEMV then finds in L2. v14 requested
rows before a GEMV's wait, while the GEMV ahead still streamed, and lost; this window has nothing else to stream.

The probe: a layer of the backend's launches (q+k+v, the decode attention over a 384-position cache, o with the add
+ RMSNorm finish, gate+up with the SwiGLU finish, down with the add + RMSNorm finish; RoPE and the cache write left
out, so the window is shorter than in a decode step), 4 layers of weights (1.7 GB, > L2), 50%, bf16, in a CUDA graph
with dependent launches. Between q+k+v and the attention, a launch requests (``prefetch.global.L2``, one per 128-byte
line) the first FRACTION of o's weight rows, whole (column-major: one contiguous stretch). It lets the attention
launch at once and waits for the q+k+v finish before it completes, so the PDL chain's waits stay transitive
(kernels/pdl.py). Also timed: the layer without the attention (its cost in the chain), and ``evict_last`` requests.

``--kv-first``: the second question. The attention is a chain of dependent round trips (wait, q, K/V, partial states
and counter, merge). Its K/V cache rows, except the newest position's, were written in earlier steps, so they could be
requested before the wait, while the kernels ahead finish, leaving q, the product and the merge after it. Timed with
a one-block-a-program copy of the decode attention kernel, its K/V loads after the wait (as shipped) or before.
Also timed there: the kernel as it was before v19 (the mask loaded per head, each block's K/V loads behind a test
that some head attends; v19 loads a mask shared by the heads as one row and masks the loads by it), the shipped kernel
at num_stages=1, and one program per KV head over the whole cache in one tile (no
split, so no partial states, counter or merge), at 4, 8 and 16 warps. (The
probe's cache is never written, so both are exact here; a kernel that did this would need the newest row re-read
after the wait, or the row itself from the kernel that forms it.)

    python examples/probe_attention_window.py [--kv-first]   (an sm_90+ GPU; logs:
        examples/results/probe_attention_window_h100.log, probe_attention_kv_first_h100.log)
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import compiled_kernels, graph_time_us, kernel_variant, probe_setup  # noqa: E402

from teal_fx.kernels import decode_attention as da  # noqa: E402
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

LINE_BYTES = 128


@triton.jit
def _prefetch_l2_kernel(ptr, n_lines, LINE: tl.constexpr, PER_PROGRAM: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Request lines [pid * PER_PROGRAM, ...) of ``ptr`` into L2, let the next launch start, then wait for the launch
    before this one (so whoever waits for this launch has waited for that one too)."""
    j = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
    ok = j < n_lines
    addr = ptr + tl.where(ok, j * LINE, 0)
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [addr, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [addr, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()


@triton.jit
def _mask_row_and_kv(k_ptr, v_ptr, mask_ptr, hk, offs_l, offs_d, L, stride_kh, stride_kl, stride_vh, stride_vl):
    """A block's [1, 1, 1, L] boolean mask row and its K/V rows where it keeps them (batch 1)."""
    in_l = offs_l < L
    keep_l = in_l & (tl.load(mask_ptr + offs_l, mask=in_l, other=0) != 0)
    kt = tl.load(k_ptr + hk * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :], mask=keep_l[:, None],
                 other=0.0)
    vt = tl.load(v_ptr + hk * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :], mask=keep_l[:, None],
                 other=0.0)
    return keep_l, kt, vt


@triton.jit
def _attend_one_tile(q_ptr, kt, vt, keep_l, hk, qk_scale, stride_qh, G: tl.constexpr, GP: tl.constexpr,
                     D: tl.constexpr):
    """The G query heads of KV head ``hk`` against one tile of positions: (max, sum, unnormalised output), with the
    shipped kernel's score and softmax steps."""
    offs_g = tl.arange(0, GP)
    g_ok = offs_g < G
    q = tl.load(q_ptr + (hk * G + offs_g)[:, None] * stride_qh + tl.arange(0, D)[None, :], mask=g_ok[:, None],
                other=0.0)
    s = da._scores(q, kt, qk_scale, False, False)
    s = tl.where(g_ok[:, None] & keep_l[None, :], s, float("-inf"))
    return da._online_softmax_step(s, vt, tl.full((GP,), float("-inf"), tl.float32), tl.zeros((GP,), tl.float32),
                                   tl.zeros((GP, D), tl.float32), False, False)


@triton.jit
def _attention_one_block_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, acc_ptr, ml_ptr, cnt_ptr, L, qk_scale,
                                stride_qh, stride_kh, stride_kl, stride_vh, stride_vl, stride_oh,
                                G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                                NSPLIT: tl.constexpr, KV_FIRST: tl.constexpr):
    """The decode attention of kernels/decode_attention.py for batch 1, a [1, 1, 1, L] boolean mask and one block
    of BLOCK_L positions a program (as its launch config gives at 384 positions), K/V requested before the wait or
    after it."""
    hk = tl.program_id(0)
    split = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_l = split * BLOCK_L + tl.arange(0, BLOCK_L)
    if KV_FIRST:
        keep_l, kt, vt = _mask_row_and_kv(k_ptr, v_ptr, mask_ptr, hk, offs_l, offs_d, L, stride_kh, stride_kl,
                                          stride_vh, stride_vl)
        tl.extra.cuda.gdc_wait()
    else:
        tl.extra.cuda.gdc_wait()
        keep_l, kt, vt = _mask_row_and_kv(k_ptr, v_ptr, mask_ptr, hk, offs_l, offs_d, L, stride_kh, stride_kl,
                                          stride_vh, stride_vl)
    m_i, l_i, acc = _attend_one_tile(q_ptr, kt, vt, keep_l, hk, qk_scale, stride_qh, G, GP, D)
    tl.extra.cuda.gdc_launch_dependents()
    slot = hk * NSPLIT + split
    tl.store(acc_ptr + slot * GP * D + offs_g[:, None] * D + offs_d[None, :], acc)
    tl.store(ml_ptr + slot * 2 * GP + offs_g, m_i)
    tl.store(ml_ptr + slot * 2 * GP + GP + offs_g, l_i)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + hk, 1, sem="acq_rel")
    if arrived == NSPLIT - 1:
        out, l_tot = da._merge_splits(acc_ptr, ml_ptr, hk * NSPLIT, offs_g, offs_d, GP, D, NSPLIT)
        g_ok = offs_g < G
        out = (out / tl.where(g_ok, l_tot, 1.0)[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + (hk * G + offs_g)[:, None] * stride_oh + offs_d[None, :], out, mask=g_ok[:, None])
        tl.atomic_xchg(cnt_ptr + hk, 0)


@triton.jit
def _attention_whole_cache_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, L, qk_scale, stride_qh, stride_kh, stride_kl,
                                  stride_vh, stride_vl, stride_oh, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                                  BLOCK_L: tl.constexpr):
    """One program per KV head over the whole (short) cache in one tile: no split, so no partial states, no counter
    and no merge; the price is one SM per KV head reading all its positions."""
    hk = tl.program_id(0)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    tl.extra.cuda.gdc_wait()
    keep_l, kt, vt = _mask_row_and_kv(k_ptr, v_ptr, mask_ptr, hk, tl.arange(0, BLOCK_L), offs_d, L, stride_kh,
                                      stride_kl, stride_vh, stride_vl)
    m_i, l_i, acc = _attend_one_tile(q_ptr, kt, vt, keep_l, hk, qk_scale, stride_qh, G, GP, D)
    tl.extra.cuda.gdc_launch_dependents()
    g_ok = offs_g < G
    out = (acc / tl.where(g_ok, l_i, 1.0)[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + (hk * G + offs_g)[:, None] * stride_oh + offs_d[None, :], out, mask=g_ok[:, None])


def prefetch_l2(t: torch.Tensor, nbytes: int, evict_last: bool = False, per_program: int = 1024) -> None:
    lines = nbytes // LINE_BYTES
    if lines == 0:
        return
    elem = LINE_BYTES // t.element_size()
    _prefetch_l2_kernel[(triton.cdiv(lines, per_program),)](t, lines, LINE=elem, PER_PROGRAM=per_program,
                                                            EVICT_LAST=evict_last, num_warps=4, launch_pdl=True)


ap = argparse.ArgumentParser()
ap.add_argument("--kv-first", action="store_true", help="time K/V requested before the attention's wait")
args = ap.parse_args()
bw, l2 = probe_setup("probe_attention_window")
if torch.cuda.get_device_capability()[0] < 9:
    sys.exit("probe_attention_window needs programmatic dependent launch (sm_90+)")

torch.manual_seed(0)
D, F, H, HKV, HD, L, USED, LAYERS, S = 4096, 14336, 32, 8, 128, 384, 300, 4, 0.5
dt = torch.bfloat16
dev = "cuda"


def col_major(n, k):
    return (torch.randn(n, k, dtype=dt, device=dev) / k**0.5).t().contiguous().t()


layers = []
for _ in range(LAYERS):
    layers.append(dict(q=col_major(D, D), k=col_major(D // 4, D), v=col_major(D // 4, D), o=col_major(D, D),
                       g=col_major(F, D), u=col_major(F, D), d=col_major(D, F),
                       kc=torch.randn(1, HKV, L, HD, dtype=dt, device=dev),
                       vc=torch.randn(1, HKV, L, HD, dtype=dt, device=dev)))
x0 = torch.randn(1, D, dtype=dt, device=dev)
res0 = torch.randn(1, D, dtype=dt, device=dev)
norm_w = torch.ones(D, dtype=dt, device=dev)
mask = torch.zeros(1, 1, 1, L, dtype=torch.bool, device=dev)
mask[..., :USED] = True
scale = HD ** -0.5
q_out, k_out, v_out = (torch.empty(1, n, dtype=dt, device=dev) for n in (D, D // 4, D // 4))
attn = torch.empty(1, H, 1, HD, dtype=dt, device=dev)
h1, n1, act, h2, n2 = (torch.empty(1, n, dtype=dt, device=dev) for n in (D, D, F, D, D))
da.reserve_workspace(torch.device(dev), 1, H, HKV, L, HD)


def quantile(t):
    return float(torch.quantile(t.float().abs().flatten(), S))


# thresholds at 50% of each launch's input, from one pass of layer 0
w0 = layers[0]
t_x = quantile(x0)
sg.sparse_gemv_group(x0, [w0["q"], w0["k"], w0["v"]], [None] * 3, [t_x] * 3, outs=[q_out, k_out, v_out], sparsity=S)
da.decode_attention_gpu(q_out.view(1, H, 1, HD), w0["kc"], w0["vc"], mask, scale, out=attn)
t_o = quantile(attn)
sg.sparse_gemv_add_rmsnorm(attn.view(1, D), w0["o"], None, t_o, res0, norm_w, 1e-5, sparsity=S, outs=(h1, n1))
t_n = quantile(n1)
sg.sparse_gemv_swiglu(n1, w0["g"], w0["u"], t_n, t_n, out=act, sparsity=S)
t_a = quantile(act)
torch.cuda.synchronize()


NSPLIT_1B, BLOCK_1B = -(-L // 64), 64
acc_1b = torch.empty(HKV * NSPLIT_1B * 16 * HD, dtype=torch.float32, device=dev)
ml_1b = torch.empty(HKV * NSPLIT_1B * 2 * 16, dtype=torch.float32, device=dev)
cnt_1b = torch.zeros(HKV, dtype=torch.int32, device=dev)


def attention_variant(name: str, substitutions: list):
    """A copy of kernels/decode_attention.py with each substitution made once, its workspace reserved."""
    mod = kernel_variant(name, substitutions, module=da)
    mod.reserve_workspace(torch.device(dev), 1, H, HKV, L, HD)
    return mod


da_stages1 = attention_variant("da_stages1", [("num_warps=4, num_stages=2", "num_warps=4, num_stages=1")])
# the kernel before v19: the mask loaded per head, and a block's K/V loads behind the test that some head attends
da_per_head = attention_variant("da_per_head", [("MASK_ROW=m_strides[1] == 0 or H == 1", "MASK_ROW=False")])


def one_block_attention(q, kc, vc, out, kv_first: bool) -> None:
    _attention_one_block_kernel[(HKV, NSPLIT_1B)](
        q, kc, vc, mask, out, acc_1b, ml_1b, cnt_1b, L, scale * da.LOG2E, q.stride(1), kc.stride(1), kc.stride(2),
        vc.stride(1), vc.stride(2), out.stride(1), G=H // HKV, GP=16, D=HD, BLOCK_L=BLOCK_1B, NSPLIT=NSPLIT_1B,
        KV_FIRST=kv_first, num_warps=4, num_stages=1, launch_pdl=True)


def whole_cache_attention(q, kc, vc, out, warps: int) -> None:
    _attention_whole_cache_kernel[(HKV,)](
        q, kc, vc, mask, out, L, scale * da.LOG2E, q.stride(1), kc.stride(1), kc.stride(2), vc.stride(1),
        vc.stride(2), out.stride(1), G=H // HKV, GP=16, D=HD, BLOCK_L=triton.next_power_of_2(L), num_warps=warps,
        num_stages=1, launch_pdl=True)


def chain(fraction: float = 0.0, evict_last: bool = False, attention: str = "shipped") -> list:
    """One call per layer. ``attention``: "shipped" (kernels/decode_attention.py), "after"/"before" (the one-block
    copy with K/V requested after/before its wait), or "none"."""
    calls = []
    for w in layers:
        def layer(w=w):
            sg.sparse_gemv_group(x0, [w["q"], w["k"], w["v"]], [None] * 3, [t_x] * 3, outs=[q_out, k_out, v_out],
                                 sparsity=S)
            if fraction > 0:
                prefetch_l2(w["o"], int(fraction * w["o"].numel()) * 2, evict_last)
            q = q_out.view(1, H, 1, HD)
            if attention == "shipped":
                da.decode_attention_gpu(q, w["kc"], w["vc"], mask, scale, out=attn)
            elif attention == "per_head":
                da_per_head.decode_attention_gpu(q, w["kc"], w["vc"], mask, scale, out=attn)
            elif attention == "stages1":
                da_stages1.decode_attention_gpu(q, w["kc"], w["vc"], mask, scale, out=attn)
            elif attention.startswith("whole"):
                whole_cache_attention(q, w["kc"], w["vc"], attn, int(attention[5:]))
            elif attention in ("after", "before"):
                one_block_attention(q, w["kc"], w["vc"], attn, attention == "before")
            sg.sparse_gemv_add_rmsnorm(attn.view(1, D), w["o"], None, t_o, res0, norm_w, 1e-5, sparsity=S,
                                       outs=(h1, n1))
            sg.sparse_gemv_swiglu(n1, w["g"], w["u"], t_n, t_n, out=act, sparsity=S)
            sg.sparse_gemv_add_rmsnorm(act, w["d"], None, t_a, h1, norm_w, 1e-5, sparsity=S, outs=(h2, n2))
        calls.append(layer)
    return calls


def final_norm(**kw) -> torch.Tensor:
    for f in chain(**kw):
        f()
    torch.cuda.synchronize()
    return n2.float().clone()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


roof = (2.5 * D * D + 3 * F * D) * (1 - S) * 2 / bw * 1e6
what = (f"one layer (q+k+v, attention over {USED} of {L} positions, o + add/RMSNorm, gate+up SwiGLU, down + "
        f"add/RMSNorm), {LAYERS} layers, 50%, bf16: µs per layer; GEMV roofline {roof:.1f}")
ref = final_norm()
if args.kv_first:
    q = q_out.view(1, H, 1, HD)
    expect = da.reference_decode_attention(q, layers[-1]["kc"], layers[-1]["vc"], mask, scale).float()
    for where in ("after", "before"):
        one_block_attention(q, layers[-1]["kc"], layers[-1]["vc"], attn, where == "before")
        torch.cuda.synchronize()
        err = rel(attn.float(), expect)
        print(f"one-block attention, K/V {where} the wait: relative error vs sdpa {err:.2e}", flush=True)
        assert err < 1e-2, err
    print(f"== {what}", flush=True)
    for warps in (4, 8, 16):
        whole_cache_attention(q, layers[-1]["kc"], layers[-1]["vc"], attn, warps)
        torch.cuda.synchronize()
        err = rel(attn.float(), expect)
        print(f"one program per KV head, {warps} warps: relative error vs sdpa {err:.2e}", flush=True)
        assert err < 1e-2, err
    for key, k in compiled_kernels(_attention_whole_cache_kernel).items():
        print(f"  a compile of it: {k.n_regs} registers, {k.n_spills} spills", flush=True)
    err = rel(da_stages1.decode_attention_gpu(q, layers[-1]["kc"], layers[-1]["vc"], mask, scale).float(), expect)
    print(f"shipped kernel at num_stages=1: relative error vs sdpa {err:.2e}", flush=True)
    assert err < 1e-2, err
    err = rel(da_per_head.decode_attention_gpu(q, layers[-1]["kc"], layers[-1]["vc"], mask, scale).float(), expect)
    print(f"the kernel before v19 (mask per head): relative error vs sdpa {err:.2e}", flush=True)
    assert err < 1e-2, err
    variants = {"no attention": dict(attention="none"), "shipped": dict(), "before v19 (mask per head)":
                dict(attention="per_head"), "shipped, num_stages=1":
                dict(attention="stages1"), "one block, K/V after wait":
                dict(attention="after"), "one block, K/V before wait": dict(attention="before"),
                **{f"one program a KV head, {w} warps": dict(attention=f"whole{w}") for w in (4, 8, 16)}}
else:
    # the prefetch changes no value: the layer's outputs with and without it agree up to the atomics' order
    err = rel(final_norm(fraction=0.5), ref)
    print(f"outputs with / without the prefetch: relative difference {err:.2e}", flush=True)
    assert err < 1e-2, err
    print(f"== {what}; o's weight {D * D * 2 / 1e6:.1f} MB", flush=True)
    variants = {"no attention": dict(attention="none"), "none": dict()}
    for frac in (0.25, 0.5, 0.75, 1.0):
        variants[f"{frac:.2f}"] = dict(fraction=frac)
    variants["0.50 evict_last"] = dict(fraction=0.5, evict_last=True)
    variants["1.00 evict_last"] = dict(fraction=1.0, evict_last=True)
for rnd in range(3):
    res = {name: statistics.median(graph_time_us(chain(**kw)) for _ in range(3)) for name, kw in variants.items()}
    base = res["shipped" if args.kv_first else "none"]
    print(f"round {rnd}: " + "  ".join(f"{n}: {us:.2f} ({us - base:+.2f})" for n, us in res.items()), flush=True)
