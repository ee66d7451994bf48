"""Fuse a block's residual add and the RMSNorm after it into the linear before them: ``h = r + sparse_linear(x)``
followed by Llama's ``w * (h.float() * rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)`` becomes
one ``teal::sparse_linear_add_rmsnorm`` returning (h, norm).

Why: after every o and down projection a decode step ran an Inductor reduction kernel for the add and the norm
(~2.5 µs a layer with its launch boundary) between two sparse launches; the linear's finishing launch already holds
the sums, and one program per row can add, normalise and write both (docs/design.md, "Grouped launches and fusions").

Invariants:
* Matches only decode graphs (the linear's input has one token per sequence, static shapes): prefill keeps
  Inductor's fused norm, the op's reference path there would run it eagerly.
* Matches only the exact eager chain of ``LlamaRMSNorm`` (Llama, Mistral, Qwen2/3, Phi-3; not Gemma's ``1 + w``):
  to float32, pow 2, mean over the last dim keeping it, + a constant eps, rsqrt, multiply, back to h's dtype,
  multiply by a [N] weight of h's dtype. The linear feeds only the add (through an eval-mode dropout at most: under
  tensor parallelism the row-sharded o/down output also feeds its all-reduce, so the add and norm stay after it); each
  link of the chain feeds only the next (h's float32 copy feeds the pow and the multiply); the residual has the
  linear's output shape and dtype.
  No output requires grad (the fused op has no autograd).
* The new node computes what the chain computed (its reference is that expression, rounded as eager rounds it);
  its two getitems take over the add's and the last multiply's ``meta`` (so ``meta["val"]`` stays right), the node
  the linear's ``meta["teal"]`` label. The linear, the add and the chain are erased.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.passes.analysis.dataflow import ADD_TARGETS, fake_value, is_call, only_user, other_operand
from teal_fx.passes.analysis.rmsnorm import llama_rmsnorm_of
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")


def _eval_dropout(n: fx.Node) -> bool:
    """``F.dropout(x, p, training=False)``: the identity (Phi-3 has one between each linear and its residual add)."""
    if not is_call(n, {F.dropout, torch.ops.aten.dropout.default}):
        return False
    args = list(n.args) + [None] * 4
    training = n.kwargs.get("training", args[2] if args[2] is not None else True)
    return training is False and not n.kwargs.get("inplace", args[3] or False)


def _match(lin: fx.Node) -> Optional[dict]:
    """The pieces of ``h = residual + lin; norm = w * rms(h)`` after a sparse linear, or None."""
    add = only_user(lin)
    dropout = None
    if add is not None and _eval_dropout(add):
        dropout, add = add, only_user(add)
    if add is None or not is_call(add, ADD_TARGETS, ("add", "__add__")):
        return None
    src = dropout if dropout is not None else lin
    residual = other_operand(add, src)
    h, r = fake_value(add), fake_value(residual) if isinstance(residual, fx.Node) else None
    x = fake_value(lin.args[0])
    if not all(isinstance(v, torch.Tensor) for v in (h, r, x)) or r.shape != h.shape or r.dtype != h.dtype:
        return None
    if not all(isinstance(s, int) for s in x.shape) or not (x.dim() == 2 or x.shape[-2] == 1):
        return None  # decode steps only (see the module docstring)
    norm = llama_rmsnorm_of(add)
    if norm is None:
        return None
    if any(getattr(fake_value(n), "requires_grad", False) for n in (lin, add, *norm.chain)):
        return None
    tail = [dropout] if dropout is not None else []
    return dict(add=add, residual=residual, weight=norm.weight, eps=norm.eps, out=norm.out, chain=norm.chain, tail=tail)


def fuse_add_rmsnorm(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    op = torch.ops.teal.sparse_linear_add_rmsnorm.default
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for lin in list(gm.graph.nodes):
        if lin.op != "call_function" or lin.target is not torch.ops.teal.sparse_linear.default:
            continue
        m = _match(lin)
        if m is None or order[m["weight"]] > order[m["add"]]:
            continue
        add = m["add"]
        with gm.graph.inserting_before(add):  # insert_sparse_linear writes the linear's nine arguments positionally
            scales, shared = (lin.args[6], lin.args[7]) if len(lin.args) > 7 else (None, False)
            x_int8 = lin.args[8] if len(lin.args) > 8 else False
            new = gm.graph.call_function(op, (*lin.args[:6], m["residual"], m["weight"], m["eps"], scales, shared,
                                              x_int8))
            h_new = gm.graph.call_function(operator.getitem, (new, 0))
            out_new = gm.graph.call_function(operator.getitem, (new, 1))
        key = "val" if "val" in add.meta else "example_value"
        new.meta[key] = (fake_value(add), fake_value(m["out"]))
        if lin.meta.get("teal") is not None:
            new.meta["teal"] = lin.meta["teal"]
        h_new.meta.update(add.meta)
        out_new.meta.update(m["out"].meta)
        m["out"].replace_all_uses_with(out_new)
        for n in m["chain"]:
            gm.graph.erase_node(n)
        add.replace_all_uses_with(h_new)
        for n in [add, *m["tail"], lin]:
            gm.graph.erase_node(n)
        fused += 1
    return finish(gm, "add_rmsnorm_fused", fused,
                  "%d linears with a residual add and an RMSNorm after them -> teal::sparse_linear_add_rmsnorm", fused)
