"""Can the down projection start on its inputs as the gate/up launch completes them, instead of after it?

In a layer's MLP the down GEMV waits for the whole gate/up grid (and its SwiGLU finishing launch) before it reads
anything: one grid drains, a launch forms silu(gate) * up, the next grid ramps (NOTES.md v11, v14, v18). But the down
GEMV's K split c needs only gate/up's column tile c. Here each gate/up program, after adding its partials, bumps its
column tile's arrival counter (release); each down program spins (acquire) on the counter of the tile its K split
lies in, instead of waiting for the grid, reads the gate and up sums of its 128 inputs, forms silu(gate) * up (eager
rounding) and runs the shipped masked loop. The last of a tile's 32 readers zeroes its sums and resets both counters.
No SwiGLU finishing launch. v18's grid barrier made 1792 programs meet on one counter; here 64 writers and 32
readers meet on each of 56.

Variants, per layer of gate/up -> down (+ plain finish), 4 layers (352 MB each, > L2), 50%, bf16, CUDA graph, PDL:
  shipped: sparse_gemv_swiglu (gate/up + SwiGLU finish) -> sparse_gemv (down + finish);
  flags:   gate/up with tile counters, no finish -> down spinning on its tile -> finish;
  wait:    the same, but down waits for the gate/up grid (gdc_wait) instead of spinning: the finish launch removed,
           no overlap.
The gate/up variant is a copy of kernels/sparse_gemv.py by text substitution (bench_kernels.kernel_variant); the
down kernel is written here.

    python examples/probe_mlp_flags.py   (an sm_90+ GPU; log: examples/results/probe_mlp_flags_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import compiled_kernels, graph_time_us, kernel_variant, probe_setup  # noqa: E402

SUBSTITUTIONS = [
    ("        APART: tl.constexpr = False,\n",
     "        APART: tl.constexpr = False,\n        FLAG: tl.constexpr = False,\n"),
    ("            # APART: _finish_kernel, launched next, reads the sums back once this grid has completed\n",
     "            if FLAG:  # this column tile's partials have landed: one more arrival (release)\n"
     "                tl.debug_barrier()\n"
     "                tl.atomic_add(cnt_ptr + pn, 1, sem=\"release\")\n"
     "            # APART: _finish_kernel, launched next, reads the sums back once this grid has completed\n"),
    ("        NSEG=nseg, GATED=_gated, PDL=use_pdl, APART=apart, ",
     "        NSEG=nseg, GATED=_gated, PDL=use_pdl, APART=apart, FLAG=FLAGS and _gated, "),
    ("    elif apart:\n", "    elif apart and not (FLAGS and _gated):\n"),
]
variant = kernel_variant("sg_mlp_flags", SUBSTITUTIONS)
variant.FLAGS = False


@triton.jit
def _down_from_sums_kernel(ws_ptr, cnt_ptr, rd_ptr, w_ptr, out_ptr, UP_OFF, t, stride_wk,
                           TILE: tl.constexpr, ARRIVALS: tl.constexpr, READERS: tl.constexpr,
                           K_PER: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, SPIN: tl.constexpr):
    """One row of down: program (N tile, K split) of K_PER inputs, its input silu(gate) * up from the gate/up sums."""
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    k_lo = pk * K_PER
    tile = k_lo // TILE
    offs_n = pn * BN + tl.arange(0, BN)
    if SPIN:
        arrived = tl.atomic_add(cnt_ptr + tile, 0, sem="acquire")
        while arrived < ARRIVALS:
            arrived = tl.atomic_add(cnt_ptr + tile, 0, sem="acquire")
    else:
        tl.extra.cuda.gdc_wait()
    offs = k_lo + tl.arange(0, K_PER)
    g = tl.load(ws_ptr + offs, cache_modifier=".cg")
    u = tl.load(ws_ptr + UP_OFF + offs, cache_modifier=".cg")
    act = variant._silu_times_up(g, u, tl.bfloat16).to(tl.bfloat16).to(tl.float32)  # as the SwiGLU finish stores it
    x_all = tl.reshape(act, (K_PER // BK, BK))
    rows = tl.arange(0, K_PER // BK)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for i in range(K_PER // BK):  # not unrolled: a static range hoists every tile's loads (~300 µs a call)
        x = tl.sum(tl.where((rows == i)[:, None], x_all, 0.0), axis=0)
        offs_k = k_lo + i * BK + tl.arange(0, BK)
        keep = tl.abs(x) > t
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=keep[:, None], other=0.0,
                    eviction_policy="evict_first")
        acc += tl.sum(tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32), axis=0)
    tl.extra.cuda.gdc_launch_dependents()
    # the last of the tile's readers zeroes its sums and resets the counters for the next launch
    tl.debug_barrier()
    done = tl.atomic_add(rd_ptr + tile, 1, sem="acq_rel")
    if done == READERS - 1:
        cols = tile * TILE + tl.arange(0, TILE)
        tl.store(ws_ptr + cols, tl.zeros((TILE,), dtype=tl.float32))
        tl.store(ws_ptr + UP_OFF + cols, tl.zeros((TILE,), dtype=tl.float32))
        tl.atomic_xchg(cnt_ptr + tile, 0)
        tl.atomic_xchg(rd_ptr + tile, 0)
    tl.atomic_add(out_ptr + offs_n, acc, sem="relaxed")


bw, l2 = probe_setup("probe_mlp_flags")
if torch.cuda.get_device_capability()[0] < 9:
    sys.exit("probe_mlp_flags needs programmatic dependent launch (sm_90+)")

torch.manual_seed(0)
D, F, LAYERS, S = 4096, 14336, 4, 0.5
dt = torch.bfloat16
dev = "cuda"
layers = [[(torch.randn(n, k, dtype=dt, device=dev) / k**0.5).t().contiguous().t() for n, k in ((F, D), (F, D), (D, F))]
          for _ in range(LAYERS)]
x = torch.randn(1, D, dtype=dt, device=dev)
t_in = float(torch.quantile(x.float().abs(), S))
act = torch.empty(1, F, dtype=dt, device=dev)
y = torch.empty(1, D, dtype=dt, device=dev)
wg, wu, wd = layers[0]
ref_act = variant.sparse_gemv_swiglu(x, wg, wu, t_in, t_in, sparsity=S)
t_down = float(torch.quantile(ref_act.float().abs(), S))
ref_y = variant.sparse_gemv(ref_act, wd, None, t_down, sparsity=S).float()

gu_cfg = variant.choose_config(1, 2 * F, D, x.device, S)
dn_cfg = variant.choose_config(1, D, F, x.device, S)
TILE, K_PER, BK, BN = gu_cfg["BN"], dn_cfg["K_PER_SPLIT"], dn_cfg["BK"], dn_cfg["BN"]
assert TILE % K_PER == 0 and F % TILE == 0 and D % BN == 0 and F % K_PER == 0, (gu_cfg, dn_cfg)
ARRIVALS = 2 * gu_cfg["SPLIT_K"]
READERS = (TILE // K_PER) * (D // BN)
print(f"gate/up: {F // TILE} column tiles x {gu_cfg['SPLIT_K']} K splits (x2); down: {D // BN} N tiles x "
      f"{F // K_PER} K splits of {K_PER}; {ARRIVALS} arrivals and {READERS} readers a tile", flush=True)
ws, cnt, _, _ = variant._WORKSPACE.get(x.device, ws=2 * F, cnt=F // TILE, idx=1, xv=1)
rd = torch.zeros(F // TILE, dtype=torch.int32, device=dev)
out_ws = torch.zeros(D, dtype=torch.float32, device=dev)


def mlp_flags(wg, wu, wd, spin: bool) -> None:
    variant.FLAGS = True
    variant.sparse_gemv_swiglu(x, wg, wu, t_in, t_in, out=act, sparsity=S)
    variant.FLAGS = False
    _down_from_sums_kernel[(D // BN, F // K_PER)](
        ws, cnt, rd, wd, out_ws, F, t_down, wd.stride(1), TILE=TILE, ARRIVALS=ARRIVALS, READERS=READERS, K_PER=K_PER,
        BK=BK, BN=BN, SPIN=spin, num_warps=1, num_stages=1, launch_pdl=True)
    variant._finish_kernel[(D // BN,)](out_ws, y, y, 1, D, D, y.stride(0), BM=1, BN=BN, HAS_BIAS=False, GATED=False,
                                       PDL=True, num_warps=1, launch_pdl=True)


def chain(kind: str) -> list:
    calls = []
    for wg, wu, wd in layers:
        if kind == "shipped":
            def layer(wg=wg, wu=wu, wd=wd):
                variant.sparse_gemv_swiglu(x, wg, wu, t_in, t_in, out=act, sparsity=S)
                variant.sparse_gemv(act, wd, None, t_down, out=y, sparsity=S)
        else:
            def layer(wg=wg, wu=wu, wd=wd, spin=kind == "flags"):
                mlp_flags(wg, wu, wd, spin)
        calls.append(layer)
    return calls


for kind in ("flags", "wait"):
    for _ in range(3):  # repeated: the counters and sums must be left as found
        mlp_flags(wg, wu, wd, kind == "flags")
        torch.cuda.synchronize()
        err = float((y.float() - ref_y).norm() / ref_y.norm())
        assert err < 1e-2, (kind, err)
    assert int(cnt.abs().sum()) == 0 and int(rd.abs().sum()) == 0 and float(ws[:2 * F].abs().sum()) == 0.0, kind
    print(f"{kind}: relative error vs shipped {err:.2e}; counters and sums left zero", flush=True)
for key, k in compiled_kernels(_down_from_sums_kernel).items():
    print(f"down kernel: {k.n_regs} registers, {k.n_spills} spills", flush=True)
roof = 3 * F * D * (1 - S) * 2 / bw * 1e6
print(f"== gate/up -> down, {LAYERS} layers, 50%, bf16: µs per layer, roofline {roof:.1f}", flush=True)
for rnd in range(3):
    res = {k: statistics.median(graph_time_us(chain(k)) for _ in range(3)) for k in ("shipped", "wait", "flags")}
    print(f"round {rnd}: " + "  ".join(f"{k}: {us:.2f} ({us - res['shipped']:+.2f})" for k, us in res.items()),
          flush=True)
