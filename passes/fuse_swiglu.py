"""Fuse a gated MLP's activation into its gate/up launch: ``silu(g[0]) * g[1]`` of a two-linear
``teal::sparse_linear_group`` ``g`` (gate, up) becomes one ``teal::sparse_swiglu``.

Why: between the gate/up launch and the down projection a decode step ran an Inductor kernel for ``silu(gate) * up``
(~1.3 µs a layer, mostly launch and latency); the grouped kernel's last program per column tile can form the
product from the two sums it already holds (docs/design.md, "Grouped launches and fusions").

Invariants:
* Matches only: the group has exactly two segments, no biases; ``g[0]`` feeds only ``silu`` (``inplace`` false),
  whose result and ``g[1]`` feed only one ``mul``; none of these outputs requires grad (the fused op has no
  autograd). The segment under ``silu`` is the gate, whichever operand order the ``mul`` has.
* The new node computes what the ``mul`` computed (the op's reference is that expression, rounded as eager rounds
  it); it takes over the ``mul``'s ``meta`` (so ``meta["val"]`` stays right), the gate's ``meta["teal"]`` label and
  the up projection's as ``meta["teal_up"]``.
  The group, its getitems and the ``silu`` are erased.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.passes.analysis.dataflow import MUL_TARGETS, fake_value, is_call, only_user
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_SILU = {F.silu, torch.ops.aten.silu.default}


def _is_silu(n: fx.Node) -> bool:
    if not is_call(n, _SILU, ("silu",)) or len(n.args) != 1:
        return False
    return not n.kwargs.get("inplace", False)


def _match(group: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node, fx.Node, bool]]:
    """(gate item, up item, silu, mul, gate_first) of a fusable gate/up group, or None."""
    weights, biases = group.args[1:3]
    if len(weights) != 2 or any(b is not None for b in biases) or len(group.users) != 2:
        return None
    if any(u.op != "call_function" or u.target is not operator.getitem for u in group.users):
        return None
    items = {u.args[1]: u for u in group.users}
    if set(items) != {0, 1}:
        return None
    for gate_i in (0, 1):
        gate, up = items[gate_i], items[1 - gate_i]
        act = only_user(gate)
        if act is None or not _is_silu(act):
            continue
        mul = only_user(act)
        if mul is None or only_user(up) is not mul or not is_call(mul, MUL_TARGETS, ("mul",)) or mul.kwargs:
            continue
        if set(mul.args) != {act, up} or len(mul.args) != 2:
            continue
        # outputs carry requires_grad when the graph records autograd (weights are Parameters either way)
        if any(getattr(fake_value(n), "requires_grad", False) for n in (gate, up, act, mul)):
            return None
        return gate, up, act, mul, gate_i == 0
    return None


def fuse_swiglu(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    op = torch.ops.teal.sparse_linear_group.default
    fused = 0
    for group in list(gm.graph.nodes):
        if group.op != "call_function" or group.target is not op:
            continue
        found = _match(group)
        if found is None:
            continue
        gate, up, act, mul, gate_first = found
        x, weights, _, thresholds, psf, sparsities, scales, shared, x_int8 = group.args
        gi, ui = (0, 1) if gate_first else (1, 0)
        with gm.graph.inserting_before(mul):
            new = gm.graph.call_function(
                torch.ops.teal.sparse_swiglu.default,
                (x, weights[gi], weights[ui], thresholds[gi], thresholds[ui], psf, [sparsities[gi], sparsities[ui]],
                 scales[gi], scales[ui], shared, x_int8),
            )
        new.meta.update(mul.meta)
        if gate.meta.get("teal") is not None:
            new.meta["teal"], new.meta["teal_up"] = gate.meta["teal"], up.meta.get("teal")
        mul.replace_all_uses_with(new)
        for n in (mul, act, gate, up, group):
            gm.graph.erase_node(n)
        fused += 1
    return finish(gm, "swiglu_fused", fused, "%d gate/up groups with silu(gate) * up -> teal::sparse_swiglu", fused)
