"""Tile configs chosen in the block, not alone: one Llama-3-8B block at 50% (4 launches, as the backend issues it),
one launch's config varied at a time, the others as the launcher chooses.

v12 found that a config faster alone (one 32-row tile per program on the MLP shapes) made the block slower: with
programmatic dependent launch, how a launch's tail overlaps the next launch's ramp counts as much as its own
stream. So the candidates are ranked by the block's time, then the best of each launch are combined and timed
against the default, interleaved, to see whether the gains add up.

    python examples/probe_block_configs.py   (a CUDA GPU; log: examples/results/probe_block_configs_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import BLOCK_LAUNCHES, bench_block, one_row_config, probe_setup  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_block_configs")
LAUNCHES = {i: (name, *BLOCK_LAUNCHES[i]) for i, name in enumerate(("q+k+v", "o", "gate+up", "down"))}
CANDIDATES = (  # one-row loops over every input (the only kind used at 50%): (warps, rows per tile, tiles a program)
    [(1, 16, it) for it in (2, 4, 8, 16)] + [(1, 32, it) for it in (1, 2, 4)] + [(1, 8, it) for it in (8, 16)]
    + [(2, 16, it) for it in (4, 8)]
)


def config(i: int, nw: int, bk: int, iters: int) -> dict:
    return one_row_config(*BLOCK_LAUNCHES[i], bk, iters, warps=nw)


def block_us(configs: dict, repeats: int = 3) -> float:
    return statistics.median(bench_block(0.5, torch.bfloat16, bw, l2, configs=configs)["us"] for _ in range(repeats))


default = block_us({})
print(f"default block: {default:.2f} us", flush=True)
best = {}
for i, (name, N, K) in LAUNCHES.items():
    default_cfg = sg.choose_config(1, N, K, torch.device("cuda"), 0.5)
    print(f"{name} {N}x{K} (default BK{default_cfg['BK']} x {default_cfg['K_PER_SPLIT'] // default_cfg['BK']}, "
          f"{default_cfg['num_warps']} warp(s)):", flush=True)
    res = []
    for nw, bk, it in CANDIDATES:
        try:
            us = block_us({i: config(i, nw, bk, it)})
        except Exception as e:  # a config Triton cannot build
            print(f"   skipped {nw}w BK{bk} x {it}: {type(e).__name__}", flush=True)
            continue
        res.append((us, (nw, bk, it)))
        print(f"   {nw}w BK{bk:2d} x {it:2d}: block {us:6.2f} us ({us - default:+.2f})", flush=True)
    res.sort()
    best[i] = res[0]
combo = {i: config(i, *p) for i, (us, p) in best.items() if us < default}
print("best per launch: " + ", ".join(f"{LAUNCHES[i][0]} {p} {us - default:+.2f}" for i, (us, p) in best.items()),
      flush=True)
for rnd in range(3):  # interleaved, so drift between the two shows
    print(f"round {rnd}: default {block_us({}):.2f} us, combined {block_us(combo):.2f} us", flush=True)
