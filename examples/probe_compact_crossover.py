"""From which sparsity does the packed-survivors loop beat the masked loop over every input, per shape?

``choose_config`` switched one-row launches to the packed loop (``COMPACT``) at an expected sparsity of 0.6 on every
shape with N >= 2048 (now ``compact_from``, set per shape class from this probe). That line came from the MLP shapes
(NOTES v5, v6), before programmatic dependent launch and the finishing launch (v10, v11) made the masked loop faster;
the kernel table of v17 has 4096x4096 *slower* at 65% (packed, 9.5 µs) than at 50% (masked, 8.8 µs). Greedy plans put
single linears there (SmolLM2 at 50%: every down projection at 0.60-0.70). This times both loops, the launcher's own
configs, on each Llama-3-8B shape over sparsities around the switch, in two interleaved rounds, as bench_kernels.py
times (CUDA graph of 32 calls over rotating weights, dependent launches on).

    python examples/probe_compact_crossover.py   (a CUDA GPU; log: examples/results/probe_compact_crossover_h100.log)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import SHAPES, make_case, probe_setup, time_sparse  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_compact_crossover")
torch.manual_seed(0)
device = torch.device("cuda")
print("shape, sparsity: masked µs / packed µs (round 1; round 2), roofline µs", flush=True)
for name in ("q/o 4096x4096", "qkv 6144x4096", "gate/up 14336x4096", "down 4096x14336"):
    N, K = SHAPES[name]
    masked = sg.choose_config(1, N, K, device, sparsity=None)
    packed = sg.choose_config(1, N, K, device, sparsity=1.0)
    assert packed["COMPACT"] and not masked["COMPACT"]
    for s in (0.5, 0.6, 0.65, 0.7, 0.8, 0.9):
        _, ws_col, x, t, needed = make_case(N, K, 1, s, torch.bfloat16, l2)
        rounds = [[time_sparse(x, ws_col, t, cfg, s, calls=32)[0] for cfg in (masked, packed)] for _ in range(2)]
        roof = needed * N * K * 2 / bw * 1e6
        print(f"{name:20s} s={s:.2f}  masked {rounds[0][0]:6.2f} / packed {rounds[0][1]:6.2f}  "
              f"({rounds[1][0]:6.2f} / {rounds[1][1]:6.2f})  roof {roof:6.2f}", flush=True)
