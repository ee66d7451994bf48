"""Fold o's add + RMSNorm finish into the MLP after it: ``teal::sparse_linear_add_rmsnorm`` (o) whose (h, norm) pair
is read only by a ``teal::sparse_mlp_add_rmsnorm`` (norm as its x, h as its residual) becomes one
``teal::sparse_o_mlp_add_rmsnorm``.

Why: a decode step's layer is a chain of dependent launches whose fixed costs, not their bytes, separate a quantized
block from its roofline (docs/perf-log.md v48). o's add + RMSNorm finish is one program that every gate/up program
then waits for; where gate/up's grid is small (int4's packed loop at 50%: 448 programs), each of its programs can
read o's whole row of sums itself, form the norm's statistic and write its own K split of x, and down's finish forms
h from o's sums again for the second residual add (``sparse_gemv_o_mlp_add_rmsnorm``). One launch a layer fewer. The
op decides at run time (``sparse_gemv.folds_mlp_norm``): batches and large grids run the two ops unfolded.

Invariants:
* Matches only ``sparse_mlp_add_rmsnorm(getitem(o, 1), ..., residual=getitem(o, 0), ...)`` where ``o`` is a
  ``sparse_linear_add_rmsnorm`` whose only users are those two getitems, each read once and only there, with the
  same ``prefill_sparse_from``, ``shared`` and ``x_int8`` in both; it runs after ``fold_swiglu_into_down``.
* The new node is inserted where the MLP node was (every operand of both is defined before it), computes what the
  two computed (its reference is the two ops), takes over the MLP node's ``meta`` (so ``meta["val"]``, the MLP's
  (h, norm) pair, stays right) with o's label as ``meta["teal"]`` and the MLP's gate label as ``meta["teal_gate"]``;
  its getitems are the MLP node's. The o node and its getitems are erased.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")


def _only_reader_at(node: fx.Node, index: int, reader: fx.Node) -> Optional[fx.Node]:
    """The getitem(node, index) among node's users if it is read once, by ``reader``; else None."""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == index:
            return user if list(user.users) == [reader] and len(user.users) == 1 else None
    return None


def fold_mlp_norm_into_gate_up(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    o_op = torch.ops.teal.sparse_linear_add_rmsnorm.default
    folded = 0
    for mlp in list(gm.graph.nodes):
        if mlp.op != "call_function" or mlp.target is not torch.ops.teal.sparse_mlp_add_rmsnorm.default:
            continue
        x, w_gate, w_up, w_down, b_down, t_gate, t_up, t_down, psf, sparsities, residual, mlp_norm_weight, mlp_eps, \
            scales_gate, scales_up, scales_down, shared, x_int8 = mlp.args
        if not (isinstance(x, fx.Node) and isinstance(residual, fx.Node) and x.target is operator.getitem
                and residual.target is operator.getitem and x.args[0] is residual.args[0]):
            continue
        o = x.args[0]
        if o.target is not o_op or len(o.users) != 2 or x.args[1] != 1 or residual.args[1] != 0:
            continue
        if _only_reader_at(o, 1, mlp) is not x or _only_reader_at(o, 0, mlp) is not residual \
                or sum(a is x or a is residual for a in mlp.args) != 2:
            continue
        a, w_o, b_o, t_o, psf_o, sparsity_o, residual_o, attn_norm_weight, attn_eps, scales_o, shared_o, \
            x_int8_o = o.args
        if (psf, shared, x_int8) != (psf_o, shared_o, x_int8_o):
            continue
        with gm.graph.inserting_before(mlp):
            new = gm.graph.call_function(
                torch.ops.teal.sparse_o_mlp_add_rmsnorm.default,
                (a, w_o, b_o, t_o, residual_o, attn_norm_weight, attn_eps, w_gate, w_up, w_down, b_down, t_gate,
                 t_up, t_down, psf, [sparsity_o, *sparsities], mlp_norm_weight, mlp_eps, scales_o, scales_gate,
                 scales_up, scales_down, shared, x_int8),
            )
        new.meta.update(mlp.meta)
        new.meta.pop("teal", None)
        if o.meta.get("teal") is not None:
            new.meta["teal"] = o.meta["teal"]
        if mlp.meta.get("teal") is not None:
            new.meta["teal_gate"] = mlp.meta["teal"]
        mlp.replace_all_uses_with(new)
        gm.graph.erase_node(mlp)
        gm.graph.erase_node(x)
        gm.graph.erase_node(residual)
        gm.graph.erase_node(o)
        folded += 1
    return finish(gm, "mlp_norm_folded", folded,
                  "%d o add + RMSNorm finishes folded into their MLPs -> teal::sparse_o_mlp_add_rmsnorm", folded)
