"""Fold a gated MLP's SwiGLU finish into its down launch: ``teal::sparse_swiglu`` whose only user is the
``teal::sparse_linear_add_rmsnorm`` of down becomes one ``teal::sparse_mlp_add_rmsnorm``.

Why: a decode step's layer is a chain of dependent launches, and what a launch costs beyond its bytes (its start,
its wait, its first round trips) is most of what separates a quantized block from its roofline (docs/perf-log.md
v48). The SwiGLU finish is the only launch of the chain that needs no global result: each down program can form
its own K split of x = silu(gate) * up from the gate/up sums, so the finish goes and the down finish zeroes the sums
(``sparse_gemv_mlp_add_rmsnorm``). One launch a layer fewer.

Invariants:
* Matches only ``sparse_linear_add_rmsnorm(a, ...)`` where ``a = sparse_swiglu(...)`` has no other user, with the
  same ``prefill_sparse_from``, ``shared`` and ``x_int8`` in both (the new op decides decode or prefill once); it
  runs after ``fuse_swiglu`` and ``fuse_add_rmsnorm``, whose invariants already hold (decode graphs, no grad).
* The new node is inserted where the add + RMSNorm node was (every operand of both is defined before it), computes
  what the two computed (its reference is the two ops), takes over the add + RMSNorm node's ``meta`` (so
  ``meta["val"]``, the (h, norm) pair, stays right) with the gate's ``meta["teal"]`` label and the up's and down's as
  ``meta["teal_up"]`` / ``meta["teal_down"]``; its getitems are the old node's. The two nodes are erased.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")


def fold_swiglu_into_down(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    swiglu_op = torch.ops.teal.sparse_swiglu.default
    folded = 0
    for down in list(gm.graph.nodes):
        if down.op != "call_function" or down.target is not torch.ops.teal.sparse_linear_add_rmsnorm.default:
            continue
        act = down.args[0]
        if not isinstance(act, fx.Node) or act.target is not swiglu_op or len(act.users) != 1:
            continue
        x, w_gate, w_up, t_gate, t_up, psf, sparsities, scales_gate, scales_up, shared, x_int8 = act.args
        _, w_down, b_down, t_down, psf_down, sparsity, residual, norm_weight, eps, scales_down, shared_down, \
            x_int8_down = down.args
        if (psf, shared, x_int8) != (psf_down, shared_down, x_int8_down):
            continue
        with gm.graph.inserting_before(down):
            new = gm.graph.call_function(
                torch.ops.teal.sparse_mlp_add_rmsnorm.default,
                (x, w_gate, w_up, w_down, b_down, t_gate, t_up, t_down, psf, [*sparsities, sparsity], residual,
                 norm_weight, eps, scales_gate, scales_up, scales_down, shared, x_int8),
            )
        new.meta.update(down.meta)
        new.meta.pop("teal", None)
        for key, node in (("teal", act), ("teal_up", act), ("teal_down", down)):
            label = node.meta.get("teal_up" if key == "teal_up" else "teal")
            if label is not None:
                new.meta[key] = label
        down.replace_all_uses_with(new)
        gm.graph.erase_node(down)
        gm.graph.erase_node(act)
        folded += 1
    return finish(gm, "swiglu_folded", folded,
                  "%d SwiGLU finishes folded into their down launches -> teal::sparse_mlp_add_rmsnorm", folded)
