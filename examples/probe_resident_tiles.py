"""Do more resident warps in one wave make the masked one-row loop stream closer to the roofline at 50%?

The sweeps (NOTES v6, v10, v12) tried 1, 2, 4, 8 or 16 tiles a program. Alone, the MLP shapes ran fastest with one
32-row tile a program (gate/up 22.2 µs, 0.89 of roofline; 7168 programs, two to three waves), but in the block that
was slower (v12): the next launch's programs cannot be resident early behind a grid of several waves. The default
(8 tiles of 16 rows, 1792 programs, 13.6 a SM) is one wave with room to spare: 64 registers a thread, so up to 32
programs fit on an SM, and fewer bytes are in flight per SM than could be. Tile counts that are not powers of two
(4-7 tiles of 16 rows: 2000-3600 programs) fill more of it and stay one wave. This times them alone and in the
block, with each compile's register count and how many of its programs fit on an SM at once.

    python examples/probe_resident_tiles.py   (a CUDA GPU; log: examples/results/probe_resident_tiles_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import (BLOCK_LAUNCHES, SHAPES, bench_block, compiled_kernels, make_case,  # noqa: E402
                           one_row_config, probe_setup, time_sparse)

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_resident_tiles")
props = torch.cuda.get_device_properties(0)
SMS = props.multi_processor_count
REGS_PER_SM = 65536
device = torch.device("cuda")
torch.manual_seed(0)
S = 0.5

MLP = [(16, it) for it in (4, 5, 6, 7, 8)] + [(32, it) for it in (3, 4)] + [(8, 12)]
ATTENTION = [(32, it) for it in (1, 2, 3)] + [(16, it) for it in (2, 3, 4, 5)]


def compiled() -> dict:
    return compiled_kernels(sg._sparse_gemv_kernel)


def regs_of(before: dict) -> int:
    new = [k for key, k in compiled().items() if key not in before]
    regs = [getattr(k, "n_regs", 0) for k in new]
    return max(regs) if regs else -1  # -1: no new compile (the specialisation of an earlier row)


print(f"{props.name}: {SMS} SMs; one-warp programs; 50% sparsity, bf16; µs in two interleaved rounds", flush=True)
for name, cands in (("gate/up 14336x4096", MLP), ("down 4096x14336", MLP), ("q/o 4096x4096", ATTENTION),
                    ("qkv 6144x4096", ATTENTION)):
    N, K = SHAPES[name]
    default = sg.choose_config(1, N, K, device, S)
    _, ws_col, x, t, needed = make_case(N, K, 1, S, torch.bfloat16, l2)
    roof = needed * N * K * 2 / bw * 1e6
    print(f"{name}: default BK{default['BK']} x {default['K_PER_SPLIT'] // default['BK']}, roofline {roof:.2f} µs",
          flush=True)
    rows = []
    for bk, it in cands:
        cfg = one_row_config(N, K, bk, it)
        before = compiled()
        us0, err = time_sparse(x, ws_col, t, cfg, S, calls=32)
        regs = regs_of(before)
        rows.append([bk, it, cfg, regs, err, us0])
    for r in rows:  # second round after the first, so drift shows as a difference between the columns
        r.append(time_sparse(x, ws_col, t, r[2], S, calls=32)[0])
    for bk, it, cfg, regs, err, us0, us1 in rows:
        programs = -(-N // 256) * cfg["SPLIT_K"]
        fit = (f"{regs:3d} regs, {min(32, REGS_PER_SM // (regs * 32)):2d} resident/SM, "
               f"{programs / (min(32, REGS_PER_SM // (regs * 32)) * SMS):4.2f} waves") if regs > 0 else "compiled above"
        print(f"   BK{bk:2d} x {it:2d}: {programs:5d} programs, {fit} | {us0:6.2f} / {us1:6.2f} µs, "
              f"{roof / min(us0, us1):.3f} of roofline, err {err:.1e}", flush=True)

# in the block (4 launches, 4 layers): one candidate for both MLP launches (gate+up, down), or for both attention
# launches (q+k+v, o), the others as chosen; median of 3, rounds interleaved with the default


def block_us(configs: dict) -> float:
    return statistics.median(bench_block(S, torch.bfloat16, bw, l2, configs=configs)["us"] for _ in range(3))


variants = {"default": {}}
for bk, it in MLP:
    variants[f"MLP BK{bk} x {it}"] = {i: one_row_config(*BLOCK_LAUNCHES[i], bk, it) for i in (2, 3)}
for bk, it in ATTENTION:
    variants[f"attention BK{bk} x {it}"] = {i: one_row_config(*BLOCK_LAUNCHES[i], bk, it) for i in (0, 1)}
results = {k: [] for k in variants}
for rnd in range(2):
    for k, cfgs in variants.items():
        results[k].append(block_us(cfgs))
print("block at 50% (µs, two rounds):", flush=True)
base = statistics.mean(results["default"])
for k, v in results.items():
    print(f"   {k:24s} {v[0]:6.2f} / {v[1]:6.2f}  ({statistics.mean(v) - base:+.2f})", flush=True)
