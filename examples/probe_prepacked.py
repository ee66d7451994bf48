"""What would the packed-survivors loop give if its input arrived already packed?

The masked loop pays a "sparsity tax" at 50%: gate+up takes 0.4 µs over its roofline at 0% but 2.7 µs at 50%, down
1.6 and 4.1 (kernel table, NOTES v17): each tile still costs a round trip and a tile's FMAs for half the rows.
The packed loop (``COMPACT``) walks only the survivors, full tiles, but first packs them itself (x, a scan, a
scratch round trip, a barrier), which costs more than it saves below ~70% (NOTES v17). The producer of a GEMV's input
(a finishing launch, the attention's merge) could write the survivors' indices and values as it writes x, for the
consumer's threshold, so the consumer would skip the packing. Before building that, this bounds its gain: the
packed loop reads lists computed once outside the timed graph (the kernel's packing replaced by one load of the
count), alone and in the block, against the shipped kernel.

Built by text substitution in a copy of kernels/sparse_gemv.py (exact results).

    python examples/probe_prepacked.py   (a CUDA GPU; log: examples/results/probe_prepacked_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_kernels  # noqa: E402
from bench_kernels import (BLOCK_LAUNCHES, SHAPES, bench_block, kernel_variant, make_case, one_row_config,  # noqa: E402
                           probe_setup, time_sparse)

PACK_START = """        if PACK:
            offs = k_lo + tl.arange(0, CHUNK)
            x = tl.load(x_ptr + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
            keep = tl.abs(x) > threshold
            slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
            n_keep = tl.sum(keep.to(tl.int32), axis=0)
            tl.store(idx_ptr + slot, offs, mask=keep)
            tl.store(xv_ptr + slot, x, mask=keep)
            tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier
"""
PRE_PACK_START = """        if PACK:
            if PRE:
                n_keep = tl.load(count_ptr)
            else:
""" + "".join("    " + line for line in PACK_START.splitlines(keepends=True)[1:])
SIGNATURE = "                           PACK: tl.constexpr):"
CALL = "offs_n, n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, COMPACT),"
KERNEL_ARGS = "        x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, xv_ptr,\n        M, N, K, threshold,"
PARAM = "        APART: tl.constexpr = False,\n    ):"
LAUNCH_ARGS = """        x2, s0["w"], s0["b"], s0["y"], ws, cnt, idx, xv,\n"""
LAUNCH_FLAGS = "PDL=use_pdl, APART=apart,"
PRE_HELPER = '''

_PRE_CACHE: dict = {}


def _pre_lists(x2, ts, K, cfg, nseg):
    """The survivors of each K split and segment, packed as the kernel packs them (indices, fp32 values, counts),
    computed once per input and thresholds (outside any CUDA graph: the first, uncaptured call fills the cache)."""
    S, C, KP = cfg["SPLIT_K"], cfg["CHUNK"], cfg["K_PER_SPLIT"]
    key = (x2.data_ptr(), tuple(ts), S, C, KP)
    if key not in _PRE_CACHE:
        idx = torch.zeros(nseg * S * C, dtype=torch.int32, device=x2.device)
        xv = torch.zeros(nseg * S * C, dtype=torch.float32, device=x2.device)
        counts = torch.zeros(nseg * S, dtype=torch.int32, device=x2.device)
        xf = x2[0].float()
        for s_i, t in enumerate(ts):
            for pk in range(S):
                lo, hi = pk * KP, min(pk * KP + KP, K)
                kept = torch.nonzero(xf[lo:hi].abs() > t).flatten() + lo
                base = (s_i * S + pk) * C
                idx[base: base + kept.numel()] = kept.int()
                xv[base: base + kept.numel()] = xf[kept]
                counts[s_i * S + pk] = kept.numel()
        _PRE_CACHE[key] = (idx, xv, counts)
    return _PRE_CACHE[key]
'''
SUBSTITUTIONS = [
    (PACK_START, PRE_PACK_START),
    (SIGNATURE, "                           PACK: tl.constexpr, count_ptr=None, PRE: tl.constexpr = False):"),
    (CALL, "offs_n, n_ok, stride_wk, stride_wn, BK, BN, CHUNK, EVEN_N, COMPACT,\n"
           "                                                pre_ptr + seg * SPLIT_K + pk, PRE),"),
    (KERNEL_ARGS,
     "        x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, xv_ptr, pre_ptr,\n        M, N, K, threshold,"),
    (PARAM, "        APART: tl.constexpr = False,\n        PRE: tl.constexpr = False,\n    ):"),
    (LAUNCH_ARGS, """        x2, s0["w"], s0["b"], s0["y"], ws, cnt, idx, xv, pre,\n"""),
    (LAUNCH_FLAGS, LAUNCH_FLAGS + " PRE=pre_on,"),
    ("    _sparse_gemv_kernel[(total_tiles, cfg[\"SPLIT_K\"])](",
     "    pre_on = PRE_ON and bool(cfg.get(\"COMPACT\")) and M == 1\n"
     "    pre = cnt\n"
     "    if pre_on:\n"
     "        idx, xv, pre = _pre_lists(x2, [d[\"t\"] for d in seg], K, cfg, nseg)\n"
     "    _sparse_gemv_kernel[(total_tiles, cfg[\"SPLIT_K\"])]("),
    ("\n\ndef interpreter_upcasts(", PRE_HELPER + "\n\ndef interpreter_upcasts("),
]


def variant():
    sg = kernel_variant("sg_prepacked", SUBSTITUTIONS)
    sg.PRE_ON = False
    return sg


if __name__ == "__main__":
    bw, l2 = probe_setup("probe_prepacked")
    sg = variant()
    bench_kernels.sg = sg  # bench_block and time_sparse launch through the module named sg there
    device = torch.device("cuda")
    torch.manual_seed(0)
    S = 0.5

    def packed(N: int, K: int, BN: int, k_per: int) -> dict:
        return one_row_config(N, K, 16, k_per // 16, warps=BN // 256, compact=True)

    def run(pre: bool, fn, *args, **kw):
        sg.PRE_ON = pre
        return fn(*args, **kw)

    PACKED = [(1024, 256), (1024, 128), (512, 128), (256, 128), (256, 256)]  # (BN = 256 x warps, inputs a program)
    print("== alone at 50%, bf16, µs (two rounds): the shipped masked loop; the packed loop packing itself; the "
          "packed loop reading pre-packed lists", flush=True)
    for name in ("gate/up 14336x4096", "down 4096x14336", "q/o 4096x4096", "qkv 6144x4096"):
        N, K = SHAPES[name]
        _, ws_col, x, t, needed = make_case(N, K, 1, S, torch.bfloat16, l2)
        roof = needed * N * K * 2 / bw * 1e6
        shipped = [run(False, time_sparse, x, ws_col, t, None, S, 32)[0] for _ in range(2)]
        print(f"{name}: roofline {roof:.2f} µs; shipped {shipped[0]:.2f} / {shipped[1]:.2f} "
              f"({roof / min(shipped):.3f})", flush=True)
        for BN, k_per in PACKED:
            cfg = packed(N, K, BN, k_per)
            programs = -(-N // BN) * cfg["SPLIT_K"]
            cells = []
            for pre in (False, True):
                r = [run(pre, time_sparse, x, ws_col, t, cfg, S, 32) for _ in range(2)]
                assert max(e for _, e in r) < 1e-2, (name, BN, k_per, pre, r)
                cells.append(f"{'pre-packed' if pre else 'packing   '} {r[0][0]:6.2f} / {r[1][0]:6.2f} "
                             f"({roof / min(u for u, _ in r):.3f})")
            print(f"   packed BN {BN:4d} ({BN // 256} warps), {k_per:3d} inputs a program ({programs:5d} programs): "
                  + " | ".join(cells), flush=True)

    VARIANTS = {"shipped": (False, None)}
    for BN, k_per in PACKED:
        VARIANTS[f"pre-packed BN {BN}, {k_per} inputs"] = (True, (BN, k_per))
        VARIANTS[f"packing BN {BN}, {k_per} inputs"] = (False, (BN, k_per))
    res = {k: [] for k in VARIANTS}
    for rnd in range(2):
        for k, (pre, p) in VARIANTS.items():
            cfgs = {i: packed(*BLOCK_LAUNCHES[i], *p) for i in BLOCK_LAUNCHES} if p else {}
            sg.PRE_ON = pre
            res[k].append(statistics.median(bench_block(S, torch.bfloat16, bw, l2, configs=cfgs)["us"]
                                            for _ in range(3)))
    print("== one block at 50% (4 launches, 4 layers), µs, median of 3 per round", flush=True)
    base = statistics.mean(res["shipped"])
    for k, v in res.items():
        print(f"   {k:36s} {v[0]:6.2f} / {v[1]:6.2f}  ({statistics.mean(v) - base:+.2f})", flush=True)
