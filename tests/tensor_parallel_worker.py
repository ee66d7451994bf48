"""One rank of tests/test_tensor_parallel.py, started by ``torchrun --nproc-per-node 2`` (gloo, CPU).

    torchrun --standalone --nproc-per-node 2 tests/tensor_parallel_worker.py MODEL_DIR PLAN OUT_DIR

Loads MODEL_DIR sharded by transformers' tensor parallelism (``tp_plan="auto"``), calibrates it (greedy, the test's
seed and sizes) and saves that plan from rank 0; then, with PLAN (made by one process on the unsharded model)
attached at 0% and 50%, saves the teal backend's decode logits and the passes' counters of every rank, and at 50%
the logits of the graph as torch 2.11's Dynamo writes it (``teal_as_torch_2_11``).
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import fx
from torch._dynamo import register_backend
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import teal_fx
from teal_fx.backend import teal_backend
from teal_fx.generate import decode_logits
from teal_fx.plan import Plan

CALIBRATION = dict(sparsity=0.5, method="greedy", num_sequences=4, seq_len=48, progress=False, attach=False)


def calibration_data(vocab: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(3, vocab, (4, 48))


def decode_tokens(vocab: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, vocab, (1, 14))


def prim_to_local(t):
    return t.to_local()


# what torch 2.11's Dynamo writes for w.to_local(): this __name__, and a __qualname__ naming the function it wraps
prim_to_local.__qualname__ = "TensorVariable.method_to_local.<locals>.to_local_fn_with_prim_types"


@register_backend(name="teal_as_torch_2_11")
def teal_as_torch_2_11(gm: fx.GraphModule, example_inputs: list, options=None):
    """The teal backend on the graph torch 2.11's Dynamo writes for a TP rank: ``w.to_local()`` as a call of a
    function named ``prim_to_local`` (torch 2.13 writes a ``to_local`` method call)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_method" and n.target == "to_local":
            with gm.graph.inserting_before(n):
                fn = gm.graph.call_function(prim_to_local, n.args, n.kwargs)
            fn.meta = dict(n.meta)
            n.replace_all_uses_with(fn)
            gm.graph.erase_node(n)
    gm.recompile()
    return teal_backend(gm, example_inputs, options)


def main(model_dir: str, plan_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    plan = teal_fx.calibrate(model, calibration_data(vocab), **CALIBRATION)
    if rank == 0:
        plan.save(os.path.join(out, "plan_tp.json"))
    single = Plan.load(plan_path)
    result = {}
    for s in (0.0, 0.5):
        teal_fx.attach_plan(model, single.at(s, "greedy"))
        counters.clear()
        logits = decode_logits(model, decode_tokens(vocab), 8, options={"compiler": "eager"})
        torch.save(logits, os.path.join(out, f"logits_{s}_rank{rank}.pt"))
        result[str(s)] = dict(counters["teal"])
        if s > 0:
            logits = decode_logits(model, decode_tokens(vocab), 8, backend="teal_as_torch_2_11",
                                   options={"compiler": "eager"})
            torch.save(logits, os.path.join(out, f"logits_{s}_torch_2_11_rank{rank}.pt"))
            counters.clear()  # a rank's own heads: its q/k/v shards, its cache, the same cos and sin
            logits = decode_logits(model, decode_tokens(vocab), 8, options={"compiler": "eager", "fold_rope": True})
            torch.save(logits, os.path.join(out, f"logits_{s}_folded_rank{rank}.pt"))
            result[f"{s}_folded"] = dict(counters["teal"])
    with open(os.path.join(out, f"counters_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
