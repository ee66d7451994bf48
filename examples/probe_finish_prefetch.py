"""Can a finishing launch keep DRAM busy at a GEMV boundary by asking L2 for the next GEMV's weight rows?

Between two dependent sparse GEMVs DRAM idles: the first grid drains, its finishing launch reads the split-K sums and
writes y, the next grid waits for it, reads y, masks, and only then requests weights (NOTES.md, v11, v14). v14 had the
next grid request rows before its wait, kept or not: at 50% half were wasted and the block got slower. Here the
finishing launch itself, which has just formed y, knows which of the next weight's rows the next GEMV will read
(|y_k| > t_next): it requests (``prefetch.global.L2``) the whole rows of the first ``PF`` kept inputs of each of the
next GEMV's K splits, so the next grid's first tiles come from L2. Nothing is wasted; values are unchanged.

Probed on the MLP boundary only: the SwiGLU finish (gate/up sums -> silu(gate) * up) prefetching down's rows, in a
chain gate/up -> down per layer over 4 layers of weights (352 MB each, > L2), at 50%, bf16, interleaved rounds.
The variant is a copy of kernels/sparse_gemv.py made by text substitution (bench_kernels.kernel_variant).

    python examples/probe_finish_prefetch.py   (an sm_90+ GPU; log: examples/results/probe_finish_prefetch_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import graph_time_us, kernel_variant, probe_setup  # noqa: E402

PARAMS_OLD = "        PDL: tl.constexpr = False,\n    ):\n        \"\"\"The split-K epilogue as its own launch"
PARAMS_NEW = ("        PDL: tl.constexpr = False,\n"
              "        nxt_ptr=None, N_NEXT=0, t_next=0.0, stride_next=0, K_SPLIT_NEXT: tl.constexpr = 128,\n"
              "        PF: tl.constexpr = 0, LINES: tl.constexpr = 64,\n"
              "    ):\n        \"\"\"The split-K epilogue as its own launch")
UP_OLD = "            up = tl.load(ws_ptr + ws_offs + TILES1 * BN, mask=mask, other=0.0, cache_modifier=\".cg\")\n"
UP_NEW = UP_OLD + """            if PF > 0:  # the next GEMV's rows for the first PF inputs of each of its K splits in this tile
                j = tl.arange(0, (BN // K_SPLIT_NEXT) * PF)
                idx = pn * BN + (j // PF) * K_SPLIT_NEXT + (j % PF)
                ok = idx < N
                g = tl.load(ws_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
                u = tl.load(ws_ptr + idx + TILES1 * BN, mask=ok, other=0.0, cache_modifier=".cg")
                a = _silu_times_up(g, u, y_ptr.dtype.element_ty)
                keep = ok & (tl.abs(a) > t_next)
                LINE: tl.constexpr = 1024 // nxt_ptr.dtype.element_ty.primitive_bitwidth
                cols = tl.arange(0, LINES) * LINE
                flag = (keep[:, None] & (cols < N_NEXT)[None, :]).to(tl.int32)
                addr = nxt_ptr + tl.where(flag != 0, idx[:, None] * stride_next + cols[None, :], 0)
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [addr, flag], dtype=tl.int32, is_pure=False, pack=1)
"""
LAUNCH_OLD = "            NSEG=nseg, BM=BM, BN=BN, HAS_BIAS=has_bias, GATED=_gated, PDL=use_pdl, num_warps=1,\n"
LAUNCH_NEW = LAUNCH_OLD + "            **(PF_NEXT if _gated and PF_NEXT else {}),\n"

variant = kernel_variant("sg_finish_prefetch", [(PARAMS_OLD, PARAMS_NEW), (UP_OLD, UP_NEW), (LAUNCH_OLD, LAUNCH_NEW)])
variant.PF_NEXT = None

bw, l2 = probe_setup("probe_finish_prefetch")
if torch.cuda.get_device_capability()[0] < 9:
    sys.exit("probe_finish_prefetch needs programmatic dependent launch (sm_90+)")

torch.manual_seed(0)
D, F, LAYERS, S = 4096, 14336, 4, 0.5
dt = torch.bfloat16
layers = [[(torch.randn(n, k, dtype=dt, device="cuda") / k**0.5).t().contiguous().t() for n, k in ((F, D), (F, D), (D, F))]
          for _ in range(LAYERS)]
x = torch.randn(1, D, dtype=dt, device="cuda")
t_in = float(torch.quantile(x.float().abs(), S))
act = torch.empty(1, F, dtype=dt, device="cuda")
y = torch.empty(1, D, dtype=dt, device="cuda")
wg, wu, wd = layers[0]
ref_act = variant.sparse_gemv_swiglu(x, wg, wu, t_in, t_in, sparsity=S)
t_down = float(torch.quantile(ref_act.float().abs(), S))
k_split = variant.choose_config(1, D, F, x.device, S)["K_PER_SPLIT"]
print(f"down's K split: {k_split} inputs; kept inputs of down: {float((ref_act.abs() > t_down).float().mean()):.3f}",
      flush=True)


def chain(pf: int) -> list:
    calls = []
    for wg, wu, wd in layers:
        nxt = dict(nxt_ptr=wd, N_NEXT=D, t_next=t_down, stride_next=wd.stride(1), K_SPLIT_NEXT=k_split, PF=pf,
                   LINES=D // 64) if pf else None

        def mlp(wg=wg, wu=wu, nxt=nxt):
            variant.PF_NEXT = nxt
            variant.sparse_gemv_swiglu(x, wg, wu, t_in, t_in, out=act, sparsity=S)
            variant.PF_NEXT = None

        calls.append(mlp)
        calls.append(lambda wd=wd: variant.sparse_gemv(act, wd, None, t_down, out=y, sparsity=S))
    return calls


# the prefetching finish writes the plain one's act (up to the order of the fp32 atomics)
for pf in (0, 16):
    for f in chain(pf)[:2]:
        f()
    torch.cuda.synchronize()
    err = float((act.float() - ref_act.float()).norm() / ref_act.float().norm())
    assert err < 1e-2, (pf, err)
roof = (2 * F * D + F * D) * (1 - S) * 2 / bw * 1e6
print(f"== gate/up (SwiGLU) -> down, {LAYERS} layers, 50%, bf16: µs per layer (2 launches + finishes), roofline "
      f"{roof:.1f}", flush=True)
for rnd in range(3):
    res = {pf: statistics.median(graph_time_us(chain(pf)) * 2 for _ in range(3)) for pf in (0, 8, 16, 32)}
    print(f"round {rnd}: " + "  ".join(f"PF {p}: {us:.2f} ({us - res[0]:+.2f})" for p, us in res.items()), flush=True)
