"""Two weight tiles in flight per warp: the masked one-row loop requesting tile t+1 before summing tile t.

probe_resident_tiles.py (NOTES v18) found the single MLP shapes faster alone with more programs in one wave (gate/up at
50%: 0.844 of roofline with 1792 programs, 0.87 with 2912), so bytes in flight per SM count; but larger grids were
slower in the block (the gate+up launch spills into a second wave). The in-thread loop uses 64 registers and keeps
one tile in flight per warp: the next tile's rows are requested only after this tile's FMAs. This variant requests
them first (loop-carried weights: the loads of tile t+1 have no dependence on the sums of tile t), doubling the bytes
in flight per warp at the same grid. v5 tried "weights ahead" in the old [BK, BN]-accumulator loop (168 registers:
fewer resident programs, slower); the in-thread layout leaves room for it.

Built by text substitution in a copy of kernels/sparse_gemv.py (exact results). Timed alone (50%, bf16) and in the
block (4 launches, 4 layers), interleaved rounds, with each compile's register count.

    python examples/probe_weights_ahead.py         (a CUDA GPU; log: examples/results/probe_weights_ahead_h100.log)
    python examples/probe_weights_ahead.py --fit   (grids sized to fit one wave at the variant's register count, or
                                                    capped with maxnreg; probe_weights_ahead_fit_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_kernels  # noqa: E402
from bench_kernels import (BLOCK_LAUNCHES, SHAPES, bench_block, compiled_kernels, kernel_variant,  # noqa: E402
                           make_case, one_row_config, probe_setup, time_sparse)

SIGNATURE = "                           PACK: tl.constexpr):"
MASKED = """            for k0 in range(k_lo, k_hi, BK):
                offs_k = k0 + tl.arange(0, BK)
                keep = tl.abs(x) > threshold  # x past k_hi is 0: never kept (t >= 0)
                w = _load_needed_rows(w_ptr, offs_k, offs_n, keep, n_ok, stride_wk, stride_wn, EVEN_N)
                nxt = offs_k + BK
                x_next = tl.load(x_ptr + nxt, mask=nxt < k_hi, other=0.0).to(tl.float32)
                acc += tl.sum(tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32), axis=0)
                x = x_next
"""
AHEAD_MASKED = """            if AHEAD:
                keep = tl.abs(x) > threshold
                w = _load_needed_rows(w_ptr, offs_k, offs_n, keep, n_ok, stride_wk, stride_wn, EVEN_N)
                nxt = offs_k + BK
                x_next = tl.load(x_ptr + nxt, mask=nxt < k_hi, other=0.0).to(tl.float32)
                for k0 in range(k_lo, k_hi, BK):
                    nxt = k0 + BK + tl.arange(0, BK)
                    keep_next = tl.abs(x_next) > threshold  # 0 past k_hi: never kept
                    w_next = _load_needed_rows(w_ptr, nxt, offs_n, keep_next, n_ok, stride_wk, stride_wn, EVEN_N)
                    nxt2 = nxt + BK
                    x_next2 = tl.load(x_ptr + nxt2, mask=nxt2 < k_hi, other=0.0).to(tl.float32)
                    acc += tl.sum(tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32), axis=0)
                    x, keep, w, x_next = x_next, keep_next, w_next, x_next2
            else:
""" + "\n".join("    " + line if line else line for line in MASKED.split("\n"))
CALL = "offs_n, n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, COMPACT),"
PARAM = "        APART: tl.constexpr = False,\n    ):"
LAUNCH = "PDL=use_pdl, APART=apart,"
SUBSTITUTIONS = [
    (SIGNATURE, "                           PACK: tl.constexpr, AHEAD: tl.constexpr = False):"),
    (MASKED, AHEAD_MASKED),
    (CALL, "offs_n, n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, COMPACT, AHEAD),"),
    (PARAM, "        APART: tl.constexpr = False,\n        AHEAD: tl.constexpr = False,\n    ):"),
    (LAUNCH, LAUNCH + " AHEAD=AHEAD_ON, **({'maxnreg': MAXNREG} if MAXNREG else {}),"),
]

bw, l2 = probe_setup("probe_weights_ahead")
sg = kernel_variant("sg_ahead", SUBSTITUTIONS)
sg.AHEAD_ON = False
sg.MAXNREG = None
bench_kernels.sg = sg  # bench_block and time_sparse launch through the module named sg there
device = torch.device("cuda")
torch.manual_seed(0)
S = 0.5
SMS = torch.cuda.get_device_properties(0).multi_processor_count


def compiled() -> dict:
    return compiled_kernels(sg._sparse_gemv_kernel)


def timed(ahead: bool, fn, *args, **kw):
    sg.AHEAD_ON = ahead
    before = compiled()
    r = fn(*args, **kw)
    regs = [getattr(k, "n_regs", 0) for key, k in compiled().items() if key not in before]
    return r, (max(regs) if regs else None)


if sys.argv[1:] == ["--fit"]:
    # round 2: ahead with grids that fit one wave at its register count (or capped with maxnreg)
    print("== ahead, grids that fit one wave: alone at 50%, bf16, µs (round 1 / round 2)", flush=True)
    for name in ("gate/up 14336x4096", "down 4096x14336"):
        N, K = SHAPES[name]
        _, ws_col, x, t, needed = make_case(N, K, 1, S, torch.bfloat16, l2)
        roof = needed * N * K * 2 / bw * 1e6
        print(f"{name}: roofline {roof:.2f} µs", flush=True)
        for ahead, bk, it, cap in ((False, 16, 8, None), (True, 8, 10, None), (True, 8, 12, None), (True, 8, 16, None),
                                   (True, 16, 10, None), (True, 16, 12, None), (True, 16, 8, 128), (True, 16, 6, 96)):
            sg.MAXNREG = cap
            cfg = one_row_config(N, K, bk, it)
            programs = -(-N // 256) * cfg["SPLIT_K"]
            (r0, err), regs = timed(ahead, time_sparse, x, ws_col, t, cfg, S, 32)
            (r1, _), _ = timed(ahead, time_sparse, x, ws_col, t, cfg, S, 32)
            assert err < 1e-2, (name, bk, it, ahead, err)
            fit = 65536 // (32 * regs) if regs else 0
            print(f"   {'ahead' if ahead else 'one  '} BK{bk:2d} x {it:2d} maxnreg {cap}: {programs:5d} programs "
                  f"({programs / SMS:4.1f}/SM), {regs} regs ({fit}/SM fit): {r0:6.2f} / {r1:6.2f} "
                  f"({roof / min(r0, r1):.3f})", flush=True)
    sg.MAXNREG = None
    sys.exit(0)

print("== alone at 50%, bf16: µs (round 1 / round 2), registers of a new compile", flush=True)
for name, cands in (("gate/up 14336x4096", [(16, 8), (16, 16), (32, 4)]),
                    ("down 4096x14336", [(16, 8), (16, 16), (32, 4)]),
                    ("gate+up 28672x4096", [(16, 8), (16, 16)]), ("q/o 4096x4096", [(32, 2), (16, 4), (16, 8)]),
                    ("qkv 6144x4096", [(32, 2), (16, 4), (16, 8)])):
    N, K = SHAPES[name]
    _, ws_col, x, t, needed = make_case(N, K, 1, S, torch.bfloat16, l2)
    roof = needed * N * K * 2 / bw * 1e6
    print(f"{name}: roofline {roof:.2f} µs", flush=True)
    for bk, it in cands:
        cfg = one_row_config(N, K, bk, it)
        programs = -(-N // 256) * cfg["SPLIT_K"]
        cells = []
        for ahead in (False, True):
            (r0, err), regs = timed(ahead, time_sparse, x, ws_col, t, cfg, S, 32)
            (r1, _), _ = timed(ahead, time_sparse, x, ws_col, t, cfg, S, 32)
            assert err < 1e-2, (name, bk, it, ahead, err)
            cells.append(f"{'ahead' if ahead else 'one  '} {r0:6.2f} / {r1:6.2f} ({roof / min(r0, r1):.3f}, "
                         f"{regs} regs)")
        print(f"   BK{bk:2d} x {it:2d} ({programs:5d} programs, {programs / SMS:4.1f}/SM): " + " | ".join(cells),
              flush=True)

VARIANTS = {  # name: (ahead, {launch: (BK, iters)})
    "default": (False, {}),
    "ahead, default tiles": (True, {}),
    "ahead, gate+up BK16 x 16": (True, {2: (16, 16)}),
    "ahead, MLP BK16 x 16": (True, {2: (16, 16), 3: (16, 16)}),
    "ahead, MLP x16, attention BK16 x 4": (True, {0: (16, 4), 1: (16, 4), 2: (16, 16), 3: (16, 16)}),
}
res = {k: [] for k in VARIANTS}
for rnd in range(2):
    for k, (ahead, tiles) in VARIANTS.items():
        cfgs = {i: one_row_config(*BLOCK_LAUNCHES[i], *p) for i, p in tiles.items()}
        sg.AHEAD_ON = ahead
        res[k].append(statistics.median(bench_block(S, torch.bfloat16, bw, l2, configs=cfgs)["us"] for _ in range(3)))
print("== one block at 50% (4 launches, 4 layers), µs, median of 3 per round", flush=True)
base = statistics.mean(res["default"])
for k, v in res.items():
    print(f"   {k:36s} {v[0]:6.2f} / {v[1]:6.2f}  ({statistics.mean(v) - base:+.2f})", flush=True)
