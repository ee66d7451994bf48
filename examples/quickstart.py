"""Quickstart: SmolLM2-135M, data-free calibration at 50% sparsity, decoding through backend="teal".

    python examples/quickstart.py [--sparsity 0.5] [--tokens 48] [--prompt "..."]

No dataset is needed: the model calibrates on text it generates itself. On a CPU the sparse op runs its
reference implementation (the speed comes from the GPU kernels); the point here is the workflow and the text.
"""
import argparse
import time

import torch

import teal_fx
from teal_fx.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--method", default="greedy", choices=["greedy", "uniform"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt", default="The three most important inventions of the nineteenth century were")
    ap.add_argument("--plan-out", default=None, help="also save the plan here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    print(f"loaded SmolLM2-135M ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")

    t = time.time()
    plan = teal_fx.calibrate(model, None, sparsity=args.sparsity, method=args.method, tokenizer=tok,
                             num_sequences=8, seq_len=128, max_sparsity=max(0.7, args.sparsity))
    print(f"calibrated in {time.time() - t:.0f}s: {len(plan)} linears, model-level sparsity {plan.model_sparsity():.2f}")
    print("\n".join(plan.table().splitlines()[:9]), "\n...")
    if args.plan_out:
        print(f"plan saved to {plan.save(args.plan_out)}")

    ids = tok(args.prompt, return_tensors="pt").input_ids
    dense = teal_fx.generate(model, ids, args.tokens, backend="none")
    t = time.time()
    # torch.compile(model, backend="teal") inside; on a CPU the eager inner compiler (Inductor's CPU build of a
    # 30-layer model takes minutes on 2 cores, and the CPU op is the dense reference anyway)
    options = {"compiler": "eager"} if next(model.parameters()).device.type == "cpu" else None
    sparse = teal_fx.generate(model, ids, args.tokens, options=options)
    print(f"\n[dense]  {tok.decode(dense[0], skip_special_tokens=True)}")
    print(f"\n[teal {args.sparsity:.0%}] {tok.decode(sparse[0], skip_special_tokens=True)}")
    print(f"\n(teal path incl. compilation: {time.time() - t:.1f}s)")


if __name__ == "__main__":
    main()
