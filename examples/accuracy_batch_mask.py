"""Shared batch masks (paper §5.4.4) against TEAL's per-row masks: SmolLM2-135M's perplexity on WikiText-2 test when
the rows of a batch of 4, 8 or 16 windows from different places in the text share one mask, at 25/40/50%; and the
realised sparsity of the shared mask at batch 2, 4, 8 and 16 on held-out text, in a sparse run (every linear's input
masked as the plan masks it: what a sparse model drops) and on the dense model's inputs. Uniform allocation and the "all"
protocol (every token sparsified, as decoding sees it) by default: the question is the mask, not the allocation.

    python examples/accuracy_batch_mask.py        # examples/results/smollm2_batch_mask_wikitext2.md
"""
import argparse
import datetime
import shlex
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

import teal_fx
from bench_common import add_evaluation_arguments  # examples/, on the script's path
from teal_fx.allocate import block_sparsity
from teal_fx.evaluate import evaluate_perplexity
from teal_fx.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_evaluation_arguments(ap)
    ap.add_argument("--batches", default="4,8,16")
    ap.add_argument("--method", default="uniform", choices=("uniform", "greedy"))
    ap.add_argument("--protocols", default="all", help="comma-separated: all, teal")
    ap.add_argument("--realised-windows", type=int, default=64)
    ap.add_argument("--out", default="examples/results/smollm2_batch_mask_wikitext2.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    test = Path(args.data) / "test.txt"
    t0 = time.time()
    plan = teal_fx.calibrate(model, Path(args.data) / "valid.txt", sparsity=0.5, tokenizer=tok, max_sparsity=0.6,
                             method=args.method, batch_mask="shared", progress=False)
    protocols = args.protocols.split(",")
    calib_s = time.time() - t0
    seq_len = plan.notes["calibration"]["seq_len"]
    realised = {}
    for b in (1, 2, 4, 8, 16):  # windows of test.txt, in batches of b spread over the file
        got = {sr: teal_fx.realised_sparsity(model, plan, test, tokenizer=tok, num_sequences=args.realised_windows,
                                             seq_len=seq_len, batch=b, sparse_run=sr) for sr in (True, False)}
        errs = [abs(v - plan.linears[k].sparsity) for k, v in got[True].items()]
        model_level = {sr: block_sparsity(g, {k: plan.linears[k].numel for k in g})  # weighted by weight size
                       for sr, g in got.items()}
        realised[b] = (sum(errs) / len(errs), max(errs), sum(e <= 0.01 for e in errs), len(errs), model_level[True],
                       model_level[False], plan.model_sparsity())
        print("realised", b, realised[b], flush=True)
    kw = dict(tokenizer=tok, window=args.window, max_tokens=args.max_tokens, progress=False)
    dense = evaluate_perplexity(model, test, None, **kw).perplexity
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for s in [float(x) for x in args.sparsities.split(",")]:
        with warnings.catch_warnings():  # shared thresholds hold where they were read: re-read them at s
            warnings.filterwarnings("ignore", message="this shared plan")
            p = plan.at(s, args.method)
        if abs(s - plan.batch_read_at) > 1e-9:
            p = teal_fx.read_batch_thresholds(model, p, Path(args.data) / "valid.txt", tokenizer=tok, progress=False)
        per_row = replace(p, batch_mask="per_row")
        res = {"per row": {pr: evaluate_perplexity(model, test, per_row, protocol=pr, **kw).perplexity
                           for pr in protocols}}
        for b in batches:
            res[f"shared, batch {b}"] = {pr: evaluate_perplexity(model, test, p, protocol=pr, batch_size=b, spread=True,
                                                                 **kw).perplexity for pr in protocols}
        for name, r in res.items():
            rows.append((s, name, r))
            print(s, name, r, flush=True)

    lines = [
        "# SmolLM2-135M on WikiText-2: one mask per batch (shared) vs one per row",
        "",
        f"- date {datetime.date.today()}; torch {torch.__version__}; CPU; model: SmolLM2-135M-Instruct (fp32)",
        f"- calibration: `valid.txt` with `batch_mask=\"shared\"` ({calib_s:.0f} s): {args.method} allocation, the same "
        "per-linear sparsities for both masks; the thresholds of the rows' mean |x| for batches of 2/4/8/16 read in a "
        "sparse run of the calibration text, batches of windows from different places, at each sparsity "
        "(`teal_fx.read_batch_thresholds`)",
        f"- evaluation: first {args.max_tokens} tokens of `test.txt`, windows of {args.window} advancing by "
        f"{args.window // 2}; a shared batch holds windows from different places in the text (`spread=True`); "
        f"protocol(s): {', '.join(protocols)} (all: every token sparsified; teal: only the scored half)",
        "",
        f"Realised sparsity of the plan at 50% on {args.realised_windows} windows of `test.txt` (held out), batches "
        "spread over the file: "
        "the model-level sparsity (linears weighted by their weights' sizes) against the plan's, in a sparse run "
        "(every linear's input masked as the plan masks it: what the sparse model drops) and on the dense model's "
        "inputs (what TEAL's per-row thresholds are read on); the error of each linear's realised fraction in the "
        "sparse run against its planned sparsity:",
        "",
        "| batch | mask | model level, sparse run: realised (planned) | model level, dense inputs | mean error "
        "(points) | worst (points) | linears within 1 point |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, (mean, worst, within, n, sparse_run, dense_inputs, planned) in realised.items():
        lines.append(f"| {b} | {'per row' if b == 1 else 'shared'} | {sparse_run:.2%} ({planned:.2%}) | "
                     f"{dense_inputs:.2%} | {100 * mean:.2f} | {100 * worst:.2f} | {within} of {n} |")
    lines += ["", "| sparsity | mask | " + " | ".join(f"ppl ({pr}) | vs dense | vs per row" for pr in protocols) + " |",
              "| --- | --- | " + " | ".join("--- | --- | ---" for _ in protocols) + " |",
              "| 0 | dense | " + " | ".join(f"{dense:.3f} | |" for _ in protocols) + " |"]
    base = {s: r for s, name, r in rows if name == "per row"}
    for s, name, r in rows:
        cells = [f"{r[pr]:.3f} | {r[pr] / dense - 1:+.1%} | {r[pr] / base[s][pr] - 1:+.1%}" for pr in protocols]
        lines.append(f"| {s:.0%} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{shlex.join(['python', 'examples/accuracy_batch_mask.py', *sys.argv[1:]])}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
