"""Greedy text from SmolLM2-135M, dense and through backend="teal" at 40/50% (the committed WikiText-2 plan).

    python examples/smollm2_samples.py [--tokens 64] [--out examples/results/smollm2_samples.md]

A check by eye that decoding stays fluent at TEAL's sparsities on a trained model (CPU; the op runs its reference).
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

import teal_fx
from teal_fx.models import load_model

PROMPTS = [
    "The history of the Roman Empire",
    "To make a good cup of tea, you should",
    "Photosynthesis is the process by which",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="examples/results/smollm2_plan.json")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--out", default="examples/results/smollm2_samples.md")
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    full = teal_fx.Plan.load(args.plan)
    lines = [
        "# SmolLM2-135M: greedy continuations, dense and through the teal backend",
        "",
        f"- date {datetime.date.today()}; torch {torch.__version__}; CPU; plan `{args.plan}` (greedy allocation, "
        "calibrated on WikiText-2 valid) re-derived with `plan.at(s)`; the decode steps are sparse, the prompt dense",
        f"- command: `python examples/smollm2_samples.py`; {args.tokens} new tokens, greedy",
        "",
    ]
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        lines.append(f"## {prompt!r}")
        dense = teal_fx.generate(model, ids, args.tokens, backend="none")
        lines += ["", f"**dense**: {tok.decode(dense[0], skip_special_tokens=True)!r}", ""]
        for s in [float(x) for x in args.sparsities.split(",")]:
            teal_fx.attach_plan(model, full.at(s, "greedy"), check=False)
            out = teal_fx.generate(model, ids, args.tokens, options={"compiler": "eager"})
            lines += [f"**teal {s:.0%}**: {tok.decode(out[0], skip_special_tokens=True)!r}", ""]
            print(prompt, s, flush=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
