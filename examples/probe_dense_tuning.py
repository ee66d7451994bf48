"""How stable is Inductor dense with coordinate-descent tuning, the dense baseline gpt-fast uses?

With ``coordinate_descent_tuning`` Inductor writes a one-row matmul as a Triton reduction and tunes its tile by timing
candidates while compiling (torch/_inductor/decomposition.py, ``mm``), instead of calling cuBLAS's GEMV. This compiles
the lean loop's dense decode step that way ``--rounds`` times, each from scratch (Inductor's caches off, so every
compile tunes again), on the Llama-3-8B shape of examples/bench_decode.py, and prints tok/s and the step's largest
kernels (µs a step, calls a step), so a slow round shows which kernel got a slow tile.

    python examples/probe_dense_tuning.py                 (a CUDA GPU; log: examples/results/probe_dense_tuning_h100.log)
    python examples/probe_dense_tuning.py --teal-backend  (the same setting through the teal backend without a plan,
                                                           sdpa or teal's decode attention; caches on;
                                                           log: examples/results/probe_dense_tuning_teal_h100.log)
"""
import argparse
import os
import sys
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--teal-backend", action="store_true")
args = ap.parse_args()
if not args.teal_backend:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # read when Inductor's config is imported

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import DENSE_TUNED, build_model, decode_speed, lean  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("probe_dense_tuning needs a CUDA GPU")
model = build_model(32)
ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
CACHE_LEN, NEW = 384, 256

if args.teal_backend:
    for name, opts in [("teal backend no plan + CDT, sdpa", {"decode_attention": False, **DENSE_TUNED}),
                       ("teal backend no plan + CDT, teal attention", dict(DENSE_TUNED))]:
        t, first = decode_speed(lean(model, ids, "teal", CACHE_LEN, opts), NEW)
        print(f"{name}: {t:.1f} tok/s, first call {first:.0f} s", flush=True)
    sys.exit(0)

for rnd in range(args.rounds):
    torch.compiler.reset()  # the next call compiles (and tunes) afresh
    run = lean(model, ids, "inductor", CACHE_LEN, DENSE_TUNED)
    t, first = decode_speed(run, NEW)
    print(f"round {rnd}: tuned dense {t:.1f} tok/s, first call {first:.0f} s", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(33)  # the prefill and 32 decode steps
        torch.cuda.synchronize()
    top = sorted(((e.key, e.device_time_total / 32, e.count / 32) for e in prof.key_averages()), key=lambda r: -r[1])
    for key, us, calls in top[:8]:
        print(f"   {us:9.1f} us/step  {calls:6.1f}/step  {key[:100]}", flush=True)
