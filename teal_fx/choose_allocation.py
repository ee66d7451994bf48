"""The safeguard after the greedy search: greedy or uniform, whichever predicts held-back calibration text better.

Why: the greedy search ranks candidates by one block's output error on a few cached sequences; a block-local error can
rank allocations differently from the model's loss, and on one real model (issue 24) the greedy plan at 50% had a
higher perplexity than the uniform one. The calibration text set aside for this check was never seen by the
histograms or the search, so the choice is measured, not assumed, and the plan's notes say which was kept and why.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teal_fx.capture import recompile_limits
from teal_fx.plan import Plan


def held_out_nll(model: nn.Module, plan: Plan, seqs: Tensor) -> float:
    """Mean next-token NLL over the later half of each of ``seqs`` [N, L], every token sparsified by ``plan`` (what
    decoding sees), through the teal backend's rewritten graph."""
    plan = replace(plan, prefill_sparse_from=0.0)
    run = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager"}, dynamic=False)
    device = next(model.parameters()).device
    half = seqs.shape[1] // 2
    total, count = 0.0, 0
    with torch.no_grad(), recompile_limits(4096, 65536):
        for row in seqs:
            ids = row[None].to(device)
            logits = run(input_ids=ids, use_cache=False).logits[0, half - 1 : -1].float()
            total += float(F.cross_entropy(logits, ids[0, half:], reduction="sum"))
            count += ids.shape[1] - half
    return total / count


def choose_allocation(model: nn.Module, plan: Plan, sparsity: float, held: Tensor) -> Plan:
    """``plan`` at ``sparsity`` with greedy or uniform allocation, whichever has the lower NLL on ``held``; the plan's
    ``notes["allocation"]`` records both NLLs and the choice."""
    nll = {m: held_out_nll(model, plan.at(sparsity, m), held) for m in ("greedy", "uniform")}
    kept = "greedy" if nll["greedy"] <= nll["uniform"] else "uniform"
    chosen = plan.at(sparsity, kept)
    chosen.notes = {**plan.notes, "allocation": {
        "kept": kept, "sparsity": sparsity, "held_out_sequences": int(held.shape[0]), "seq_len": int(held.shape[1]),
        "nll": {m: round(v, 5) for m, v in nll.items()},
        "perplexity": {m: round(math.exp(v), 4) for m, v in nll.items()},
    }}
    return chosen
