"""No split-K: one program per column tile over the whole of K, its warps splitting K, one reduction at the end.

probe_epilogue.py showed that the split-K epilogue (arrival counter, last arriver) costs 1.6-2.3 µs per launch and
that the loop without it runs at 0.87 of roofline on the MLP shapes and 0.72 on 4096² at 50%. This sweep asks
whether a grid with no cross-program reduction at all (the kernel's [BK, BN] loop with SPLIT_K = 1: rows of a tile
spread over the warps, the sum over K formed once after the loop, y stored directly) streams as well. Narrow column
tiles keep >= 128 programs: 4096 columns in 32-column tiles is 64-byte stretches per weight row.

    python examples/probe_cta_reduce.py      (a CUDA GPU; log: examples/results/probe_cta_reduce_h100.log)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import dependent_launches, graph_time_us, make_case, probe_setup  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_cta_reduce")

SHAPES = {(4096, 4096): (32,), (6144, 4096): (32,), (14336, 4096): (32, 64), (4096, 14336): (32,)}
with dependent_launches(True):
    for (N, K), bns in SHAPES.items():
        for sparsity in (0.5, 0.0):
            _, ws_col, x, t, needed = make_case(N, K, 1, sparsity, torch.bfloat16, l2)
            y = torch.empty(1, N, dtype=torch.bfloat16, device="cuda")
            roof = needed * N * K * 2 / bw * 1e6

            def timed(cfg):
                out = sg.sparse_gemv(x, ws_col[0], None, t, config=cfg)
                ref = sg.reference_sparse_gemv(x, ws_col[0], None, t)
                err = float((out.double() - ref).norm() / ref.norm())
                us = graph_time_us([lambda i=i: sg.sparse_gemv(x, ws_col[i % len(ws_col)], None, t, config=cfg,
                                                               out=y) for i in range(32)])
                return us, err

            base, _ = timed(sg.choose_config(1, N, K, x.device, sparsity))
            print(f"{N}x{K} s={sparsity:.1f} roof {roof:5.2f} us: default {base:6.2f} ({roof / base:.2f})", flush=True)
            results = []
            for BN in bns:
                for W in (8, 16, 32):
                    for R in (1, 2, 4, 8):
                        BK = (256 // BN) * W * R
                        if BK > K or W * 32 * R * 8 > 96 * 1024:  # the accumulator alone would not fit
                            continue
                        for stages in (1, 3):
                            cfg = sg.make_config(N, K, BN=BN, BK=BK, iters=K // BK, use_dot=False, num_warps=W,
                                                 num_stages=stages)
                            try:
                                us, err = timed(cfg)
                            except Exception as e:  # noqa: BLE001 - out of resources etc.: report and go on
                                print(f"  BN={BN} W={W} R={R} st={stages}: {type(e).__name__}", flush=True)
                                continue
                            results.append((us, f"BN={BN} W={W} R={R} BK={BK} st={stages}", err))
            for us, name, err in sorted(results)[:6]:
                print(f"  {name}: {us:6.2f} us ({roof / us:.2f} of roof, err {err:.0e})", flush=True)
            ws_col = None
