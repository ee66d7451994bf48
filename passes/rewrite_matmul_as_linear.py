"""Rewrite: a projection written as a matmul with a weight becomes ``F.linear``, the form discovery reads.

Why: some decoders do not call ``nn.Linear``. Falcon's ``FalconLinear`` computes ``input @ self.weight.T`` (then
``+ self.bias``); GPT-2's ``Conv1D`` stores its weight [in, out] and computes ``torch.addmm(bias, x2d, weight)``.
Discovery, calibration and the sparse rewrite recognise linears by ``F.linear``; in these forms the same projections
are ones.

Matches, with no keyword arguments (``addmm``'s beta and alpha left at 1):
* ``x @ W.T`` (``operator.matmul``, ``torch.matmul``, the ``matmul`` method; W transposed in any spelling,
  ``dataflow.transposed_input``) -> ``F.linear(x, W)``. A bias added after it stays an add: ``F.linear`` with a bias
  adds it before rounding (addmm), one rounding fewer in bf16.
* ``torch.addmm(b, x, W)`` (x 2-D) -> ``F.linear(x, torch.t(W), b)``, which is ``addmm(b, x, W)`` again.
W is a 2-D graph input (placeholder or ``get_attr``) in x's dtype; b (if any) a 1-D graph input.

Invariants:
* Each rewrite is the same computation (bit for bit on the CPU in fp32 and bf16, a property test); the new node
  carries the old node's metadata (``meta["example_value"]`` / ``meta["val"]``, the module stack), and a new
  ``torch.t(W)`` node the fake value of W transposed. A linear's weight may therefore be a transposed view of the
  parameter: ``discovery.weight_param`` looks through it for the parameter's name.
* Nothing else is touched; a transpose left without users goes at dead-code elimination (``finish``).
* It runs before discovery wherever discovery runs (the backend's passes, calibration, capture), so all of them see
  the same linears and keys.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from teal_fx.passes.analysis.dataflow import fake_value, graph_input_value, transposed_input
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_MATMULS = {operator.matmul, torch.matmul}


def _same_dtype(x: object, w: fx.Node) -> bool:
    vx = fake_value(x) if isinstance(x, fx.Node) else None
    return isinstance(vx, torch.Tensor) and vx.dtype == fake_value(w).dtype


def _as_linear(gm: fx.GraphModule, n: fx.Node) -> Optional[str]:
    """Rewrite ``n`` if it is one of the matched forms; the weight's name, or None."""
    if n.kwargs or len(n.args) != (3 if n.target is torch.addmm else 2):
        return None
    if n.op == "call_function" and n.target in _MATMULS or n.op == "call_method" and n.target == "matmul":
        x, t = n.args
        w = transposed_input(t)
        if w is None or not _same_dtype(x, w):
            return None
        args = (x, w)
    elif n.op == "call_function" and n.target is torch.addmm:
        b, x, w = n.args
        vx, vw = fake_value(x) if isinstance(x, fx.Node) else None, graph_input_value(w, 2)
        if vw is None or not isinstance(vx, torch.Tensor) or vx.dim() != 2 or not _same_dtype(x, w) \
                or b is not None and graph_input_value(b, 1) is None:
            return None
        with gm.graph.inserting_before(n):
            wt = gm.graph.call_function(torch.t, (w,))
        wt.meta["example_value"] = vw.t()
        args = (x, wt, b)
    else:
        return None
    with gm.graph.inserting_after(n):
        linear = gm.graph.call_function(F.linear, args)
    linear.meta.update(n.meta)
    n.replace_all_uses_with(linear)
    gm.graph.erase_node(n)
    return str(w.target)


def rewrite_matmul_as_linear(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    matched = [name for n in list(gm.graph.nodes) if n.op in ("call_function", "call_method")
               and (name := _as_linear(gm, n)) is not None]
    return finish(gm, "matmuls_as_linear", len(matched), "%d matmuls with a weight -> F.linear (%s)",
                  len(matched), ", ".join(matched[:3]) + (", ..." if len(matched) > 3 else ""))
