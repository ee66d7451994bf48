"""Rewrite: ``x @ W.T`` with W a 2-D graph input becomes ``F.linear(x, W)``.

Why: some decoders write their projections as a matmul with the transposed weight rather than through
``nn.Linear``'s ``F.linear`` (Falcon's ``FalconLinear``: ``input @ self.weight.T``, then ``+ self.bias``). Discovery,
calibration and the sparse rewrite recognise linears by ``F.linear``; in this form the same projection is one.

Matches ``operator.matmul`` / ``torch.matmul`` / the ``matmul`` method with no keyword arguments, whose second operand
is W transposed (``W.T``, ``W.t()``, ``torch.t(W)``, ``W.transpose(0, 1)`` in any spelling of the two dimensions,
``W.permute(1, 0)``) of a placeholder or ``get_attr`` whose fake value is 2-D, in the first operand's dtype. A bias
added after it stays an add: ``F.linear`` with a bias adds it before rounding (addmm), one rounding fewer in bf16.

Invariants:
* ``F.linear(x, W)`` is ``x @ W.T``, the same product (bit for bit on the CPU in fp32 and bf16, a property test); the
  new node carries the old node's metadata (``meta["example_value"]`` / ``meta["val"]``, the module stack).
* Nothing else is touched; the transpose is left for dead-code elimination (``finish``).
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

from teal_fx.passes.analysis.dataflow import fake_value
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_MATMULS = {operator.matmul, torch.matmul}


def _graph_input(n: object) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


def _transposed_weight(t: object) -> Optional[fx.Node]:
    """W where ``t`` is W transposed and W a 2-D graph input, else None."""
    if not isinstance(t, fx.Node) or t.kwargs:
        return None
    w, rest = (t.args[0], t.args[1:]) if t.args else (None, ())
    if t.op == "call_function" and t.target is getattr and rest == ("T",):
        pass
    elif (t.op == "call_method" and t.target == "t" or t.op == "call_function" and t.target is torch.t) and not rest:
        pass
    elif (t.op == "call_method" and t.target == "transpose" or t.op == "call_function" and t.target is torch.transpose) \
            and len(rest) == 2 and {d % 2 for d in rest if isinstance(d, int)} == {0, 1}:
        pass
    elif t.op == "call_method" and t.target == "permute" and tuple(rest) in (((1, 0),), (1, 0), ((-1, -2),), (-1, -2)):
        pass
    else:
        return None
    v = fake_value(w) if _graph_input(w) else None
    return w if isinstance(v, torch.Tensor) and v.dim() == 2 else None


def rewrite_matmul_as_linear(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    matched = []
    for mm in list(gm.graph.nodes):
        if not ((mm.op == "call_function" and mm.target in _MATMULS or mm.op == "call_method" and mm.target == "matmul")
                and len(mm.args) == 2 and not mm.kwargs):
            continue
        x, t = mm.args
        w = _transposed_weight(t)
        vx = fake_value(x) if isinstance(x, fx.Node) else None
        if w is None or not isinstance(vx, torch.Tensor) or vx.dtype != fake_value(w).dtype or vx.dim() < 1:
            continue
        with gm.graph.inserting_after(mm):
            linear = gm.graph.call_function(F.linear, (x, w))
        linear.meta.update(mm.meta)
        mm.replace_all_uses_with(linear)
        gm.graph.erase_node(mm)
        matched.append(str(w.target))
    return finish(gm, "matmuls_as_linear", len(matched), "%d matmuls with a transposed weight -> F.linear (%s)",
                  len(matched), ", ".join(matched[:3]) + (", ..." if len(matched) > 3 else ""))
