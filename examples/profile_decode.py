"""Where the time of one decode step goes: GPU kernel time vs wall time, top kernels, CUDA-graph skips.

    python examples/profile_decode.py [--layers 32] [--sparsity 0.5] [--steps 32] [--trace-dir DIR]
                                      [--weights int8|int4 [--activations int8] [--quantize-lm-head [int4]]]

For the lean loop (teal_fx.generate, mode="reduce-overhead") with Inductor dense and with the teal backend, on the
Llama-3-8B-shaped model of bench_decode.py, it prints: wall ms/step; GPU ms/step, the sum of kernel durations from
the profiler (PDL overlaps launches, so the sum can exceed the wall); the kernels that take the most time per decode
step (those of ``steps`` tokens less those of one, the prefill); and Inductor's cudagraph counters (a skipped CUDA
graph shows up here and in the perf_hints log).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

import teal_fx
from bench_common import decode_speed
from bench_decode import build_model, hf, lean


def show_syncs(run) -> None:
    """Run ``run()`` printing the Python stack of every synchronising CUDA call (torch's sync debug mode)."""
    import traceback
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"   SYNC: {message}")
        traceback.print_stack(limit=12)

    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def profile_run(run):
    """Profile ``run()``: ({kernel name: [µs, launches]} of its CUDA kernels, {host op: [self µs, calls]}, profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    cpu = {e.key[:90]: [e.self_cpu_time_total, e.count] for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return kernels, cpu, prof


def profile_path(name: str, model, ids, steps: int, backend: str, trace_dir=None, sync_debug: bool = False,
                 top: int = 14, options: dict | None = None) -> None:
    from torch._dynamo.utils import counters

    if steps < 2:
        raise SystemExit("--steps must be at least 2 (one prefill and a decode step)")
    run = lean(model, ids, backend, ids.shape[1] + steps, options)  # one cache length: every call reuses the same graphs
    wall = 1e3 / decode_speed(run, steps)[0]
    if sync_debug:
        show_syncs(lambda: run(3))

    # run(n) is one prefill and n - 1 decode steps: the decode steps' kernels are those of run(steps) less those of
    # run(1), divided by steps - 1
    both, cpu, prof = profile_run(lambda: run(steps))
    prefill, _, _ = profile_run(lambda: run(1))
    kernels = {}
    for kname, (us, cnt) in both.items():
        p_us, p_cnt = prefill.get(kname, (0.0, 0))
        if cnt > p_cnt:
            kernels[kname] = (max(us - p_us, 0.0), cnt - p_cnt)
    n = steps - 1
    gpu_ms = sum(v[0] for v in kernels.values()) / 1e3 / n
    print(f"\n== {name}: wall {wall:.3f} ms/step; GPU kernels {gpu_ms:.3f} ms/step (sum of kernel times: launches that "
          f"overlap count twice); {len(kernels)} distinct kernels, {sum(v[1] for v in kernels.values()) / n:.0f} "
          f"launches/step", flush=True)
    for kname, (us, cnt) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"   {us / n:9.1f} us/step  {cnt / n:6.1f} calls/step  {kname}")
    print("   host side (self CPU time of run(steps) / steps, us/step, calls/step):")
    for kname, (us, cnt) in sorted(cpu.items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"   {us / steps:9.1f} us/step  {cnt / steps:6.1f} calls/step  {kname}")
    print("   cudagraph counters:", {k: v for k, v in counters["inductor"].items() if "cudagraph" in k})
    print("   graph breaks:", dict(counters["graph_break"]) or "none", "| unique graphs:", counters["stats"]["unique_graphs"])
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/{name.replace(' ', '_')}.json")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--top", type=int, default=14, help="how many kernels to list")
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="also profile Inductor dense")
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate() with both backends")
    ap.add_argument("--sync-debug", action="store_true", help="print the Python stack of every host-device sync")
    ap.add_argument("--weights", choices=["int8", "int4"], default=None, help="teal on weights quantized in place")
    ap.add_argument("--activations", choices=["int8"], default=None, help="with --weights: x rounded to int8")
    ap.add_argument("--quantize-lm-head", nargs="?", const="int8", default=None, choices=["int8", "int4"],
                    help="with --weights: the output head quantized too, int8 (the flag alone) or int4")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                    help="profile the teal path with these backend options (Inductor config patches included), "
                         "e.g. 'combo={\"combo_kernels\": true}'; repeatable; default: one run with no options")
    args = ap.parse_args()
    torch._logging.set_logs(perf_hints=True)
    torch.manual_seed(0)
    model = build_model(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda")
    if args.dense:
        profile_path("inductor dense", model, ids, args.steps, "inductor", args.trace_dir, args.sync_debug, args.top)
    plan = teal_fx.calibrate(model, torch.randint(0, model.config.vocab_size, (2, 256)), sparsity=args.sparsity,
                             method="uniform", num_sequences=2, seq_len=256, progress=False, weights=args.weights,
                             quantize_lm_head=args.quantize_lm_head, activations=args.activations)
    torch.compiler.reset()
    teal_fx.attach_plan(model, plan, check=False)
    for label, options in [v.split("=", 1) for v in args.variant] or [("", "{}")]:
        torch.compiler.reset()
        name = (f"teal {args.sparsity:.0%}" + (f" {args.weights}" if args.weights else "")
                + (" x int8" if args.activations else "") + (f" {label}" if label else ""))
        profile_path(name, model, ids, args.steps, "teal", args.trace_dir, args.sync_debug, args.top,
                     json.loads(options) or None)
    if args.hf:
        for backend in ("teal", "inductor"):
            torch.compiler.reset()
            tok_s, _ = decode_speed(hf(model, ids, backend, ids.shape[1] + args.steps), args.steps)
            print(f"== HF generate + {backend}: {1e3 / tok_s:.3f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
