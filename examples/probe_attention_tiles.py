"""Decode attention tile sizes at short caches: positions per block (BLOCK_L) and so the number of splits.

At a few hundred positions the kernel is a chain of dependent steps (NOTES.md v16), not bandwidth: smaller blocks give
more, shorter programs (more splits to merge). Times ``teal::decode_attention``'s kernel with BLOCK_L 16 / 32 / 64 / 128 at
Llama-3-8B heads, bf16, the cache half filled, as examples/bench_attention.py does, interleaved rounds.

    python examples/probe_attention_tiles.py   (a CUDA GPU; log: examples/results/probe_attention_tiles_h100.log)
"""
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import graph_time_us, probe_setup  # noqa: E402

from teal_fx.kernels import decode_attention as da  # noqa: E402

HEADS, KV_HEADS, D, LAYERS = 32, 8, 128, 32
probe_setup("probe_attention_tiles")
torch.manual_seed(0)
for batch, length in ((1, 384), (1, 512), (1, 2048), (4, 512)):
    fill = length // 2
    layers = [(torch.randn(batch, HEADS, 1, D, device="cuda", dtype=torch.bfloat16),
               torch.randn(batch, KV_HEADS, length, D, device="cuda", dtype=torch.bfloat16),
               torch.randn(batch, KV_HEADS, length, D, device="cuda", dtype=torch.bfloat16)) for _ in range(LAYERS)]
    mask = (torch.arange(length, device="cuda") < fill)[None, None, None, :].expand(batch, 1, 1, length)
    scale = 1 / math.sqrt(D)
    base = da.launch_config(batch, HEADS, KV_HEADS, length, D, torch.device("cuda"))
    configs = {}
    for bl in (16, 32, 64, 128):
        blocks = -(-length // bl)
        nsplit = min(blocks, max(1, -(-2 * 132 // (batch * KV_HEADS))))
        per = -(-blocks // nsplit) * bl
        configs[bl] = dict(base, BLOCK_L=bl, L_PER_SPLIT=per, NSPLIT=-(-length // per))
    q, k, v = layers[0]
    ref = da.reference_decode_attention(q.double(), k.double(), v.double(), mask, scale)
    for bl, cfg in configs.items():
        da._WORKSPACE.reserve(torch.device("cuda"), **da._workspace_sizes(cfg, batch, KV_HEADS))
        got = da.decode_attention_gpu(q, k, v, mask, scale, config=cfg)
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-2, bl
    res = {bl: [] for bl in configs}
    for _ in range(3):
        for bl, cfg in configs.items():
            res[bl].append(graph_time_us([lambda q=q, k=k, v=v, cfg=cfg: da.decode_attention_gpu(q, k, v, mask, scale, config=cfg)
                                          for q, k, v in layers]))
    print(f"batch {batch}, cache {length}, fill {fill}: " + "  ".join(
        f"BLOCK_L {bl} ({configs[bl]['NSPLIT']} splits): {statistics.median(t):.2f} us" for bl, t in res.items())
        + f"  [shipped: BLOCK_L {base['BLOCK_L']}]", flush=True)
