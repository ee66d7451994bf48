"""Quickstart: SmolLM2-135M, data-free calibration, then the same prompt decoded dense and through backend="teal".

    python examples/quickstart.py                                   # CPU: the workflow, the text, the perplexity
    python examples/quickstart.py --device cuda --dtype bfloat16    # a CUDA GPU: also tokens/s, dense vs sparse

No dataset is needed: the model calibrates on text it generates itself. It prints what is true of the result: the
continuation dense and sparse, the perplexity of both on a paragraph the calibration never saw, and the sparsity
the plan realises on it. The default sparsity, 25%, is where SmolLM2's text stays fluent (measured on this CPU: the
continuation follows dense's, perplexity +1.1%; at 35% it turns repetitive, +9.1%): it is a 135M model, whose
activations are less sparse than an 8B model's (TEAL reports 40-50% on 7-8B models with little loss); try --sparsity.
On a CPU the sparse op runs its reference (a masked dense matmul): the speed-up needs a CUDA GPU.
"""
import argparse
import time

import torch

import teal_fx
from teal_fx.evaluate import evaluate_perplexity
from teal_fx.models import load_model

# a paragraph to score, not from the calibration (data-free) nor, as far as can be told, from any model's training set
PARAGRAPH = """The village sat at the edge of a wide valley, where the river slowed and spread into a chain of shallow
pools. In spring the water rose over the lower fields, and the farmers waited for it to fall before they planted.
Most families kept a few goats and a small orchard of apple and plum trees, and on market days they carried baskets of
fruit, cheese and wool down the road to the town. The road was narrow and crossed the river twice on old stone bridges
that had been repaired so many times that no one remembered who had built them. Children walked to the school in the
town each morning and came back in the afternoon, stopping at the second bridge to throw sticks into the current and
watch which one reached the bend first. In the evenings the older people sat outside their doors and talked about the
weather, the price of grain and the news that travellers brought from the cities beyond the hills. When the first
snow came, the road was often closed for weeks, and the village lived on what it had stored: potatoes, dried beans,
smoked meat and the last of the apples, kept in straw in the cellars. Those weeks were quiet but rarely lonely,
because neighbours visited one another to share bread, mend tools and tell the old stories again. By the time the
snow melted, everyone was eager to see the road open, to hear the bells of the first cart and to learn what had
changed in the world while the valley slept."""


def tokens_per_second(model, ids, n: int, **kw) -> float:
    """Decode tokens/s of the lean loop: (n - 1) / (T(n) - T(1)), after a warm-up, so prefill and compile are out."""
    teal_fx.generate(model, ids, n, eos_token_id=-1, **kw)

    def timed(k: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        teal_fx.generate(model, ids, k, eos_token_id=-1, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.25, help="model-level sparsity (default 0.25)")
    ap.add_argument("--method", default="greedy", choices=["greedy", "uniform"], help="allocation (default greedy)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens to generate (default 48)")
    ap.add_argument("--prompt", default="The three most important inventions of the nineteenth century were")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--plan-out", default=None, help="also save the plan here")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA device")
    gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))

    torch.manual_seed(0)
    model, tok = load_model("smollm2", dtype=dtype, device=args.device)
    print(f"loaded SmolLM2-135M ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {dtype}, "
          f"{args.device})")

    t = time.time()
    plan = teal_fx.calibrate(model, None, sparsity=args.sparsity, method=args.method, tokenizer=tok,
                             num_sequences=8, seq_len=128, step=0.05, max_sparsity=max(0.6, args.sparsity))
    print(f"calibrated in {time.time() - t:.0f}s: {len(plan)} linears, {plan.method} allocation, model-level "
          f"sparsity {plan.model_sparsity():.2f}")
    if args.plan_out:
        print(f"plan saved to {plan.save(args.plan_out)}")

    ids = tok(args.prompt, return_tensors="pt").input_ids
    # on a CPU the eager inner compiler: Inductor's CPU build of a 30-layer model takes minutes on 2 cores, and the
    # CPU op is the masked reference anyway
    # on a GPU both runs take the CUDA-graph mode the speed figure uses, so each model compiles once, here
    dense_kw = dict(backend="inductor", mode="reduce-overhead") if gpu else dict(backend="none")
    sparse_kw = dict(mode="reduce-overhead") if gpu else dict(options={"compiler": "eager"})
    dense = teal_fx.generate(model, ids, args.tokens, **dense_kw)
    sparse = teal_fx.generate(model, ids, args.tokens, **sparse_kw)
    if gpu:  # measured before the perplexity, whose own compiles would evict these graphs
        speed = tokens_per_second(model, ids, 128, **dense_kw), tokens_per_second(model, ids, 128, **sparse_kw)
    print(f"\n[dense]     {tok.decode(dense[0], skip_special_tokens=True)}")
    print(f"\n[teal {args.sparsity:.0%}]  {tok.decode(sparse[0], skip_special_tokens=True)}")

    text = PARAGRAPH.replace("\n", " ")
    kw = dict(tokenizer=tok, window=128, progress=False, compiler="eager")
    ppl_dense = evaluate_perplexity(model, text, None, **kw).perplexity
    ppl_sparse = evaluate_perplexity(model, text, plan, **kw).perplexity
    real = teal_fx.realised_sparsity(model, plan, text, tokenizer=tok, num_sequences=2, seq_len=128)
    weights = {k: lp.numel for k, lp in plan.linears.items()}
    realised = sum(real[k] * n for k, n in weights.items()) / sum(weights.values())
    print(f"\nperplexity on a paragraph the calibration never saw: dense {ppl_dense:.2f}, teal {ppl_sparse:.2f} "
          f"({ppl_sparse / ppl_dense - 1:+.1%}); sparsity realised on it {realised:.2f} (planned {plan.model_sparsity():.2f})")

    if gpu:
        d, s = speed
        print(f"decode speed, lean loop with CUDA graphs: dense {d:.0f} tok/s, teal {s:.0f} tok/s ({s / d:.2f}x); a "
              "135M model is launch-bound, the gain grows with the model (examples/bench_decode.py: 8B shape)")
    else:
        print("speed: on a CPU the sparse op is a masked dense matmul, no faster than dense. The speed-up needs a "
              "CUDA GPU (python examples/quickstart.py --device cuda; examples/bench_decode.py for an 8B-shaped model)")


if __name__ == "__main__":
    main()
