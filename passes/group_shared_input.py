"""Group the sparse linears that read the same input (q/k/v, gate/up) into one ``teal::sparse_linear_group``.

Why: on the decode path each linear is one kernel launch with a fixed cost (ramp-up, tail, epilogue) of a few µs;
k and v of Llama-3-8B (1024x4096) are mostly that fixed cost. One grouped launch pays it once (docs/design.md, "Launch boundaries").

Invariants:
* Only ``teal::sparse_linear`` nodes written by ``insert_sparse_linear`` are touched, grouped by identical input
  node, ``prefill_sparse_from``, shared mask and int8 rounding of x, with every member's bias (and quantization
  scales) present or every member's absent, up to
  ``MAX_SEGMENTS`` per group (larger sets are cut into consecutive groups).
* Each member keeps its own weight and threshold; its users now read ``getitem(group, i)``, which carries the
  member's old ``meta`` (so ``meta["val"]`` stays right) and its ``meta["teal"]`` label.
* The group node is inserted before the first member, after every argument it reads (checked, else no group); a
  tensor-parallel rank's ``w.to_local()`` traced after the first member is moved up to it (a view of a parameter).
"""
from __future__ import annotations

import logging
import operator
from collections import defaultdict
from typing import Optional

import torch
from torch import fx

from teal_fx.kernels.sparse_gemv import MAX_SEGMENTS  # importing teal_fx.kernels registers torch.ops.teal
from teal_fx.passes.analysis.discovery import unsharded
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")


def _members_by_input(gm: fx.GraphModule) -> dict:
    op = torch.ops.teal.sparse_linear.default
    groups: dict = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is op:
            x, w, b, t, psf = n.args[:5]
            scales = n.args[6] if len(n.args) > 6 else None
            shared = bool(n.args[7]) if len(n.args) > 7 else False
            x_int8 = bool(n.args[8]) if len(n.args) > 8 else False
            groups[(x, psf, b is None, scales is None, shared, x_int8)].append(n)
    return groups


def _hoistable_shard(a: fx.Node, order: dict, before: int) -> bool:
    """``w.to_local()`` of a parameter defined before position ``before``: a view with no other input."""
    return (unsharded(a) is not a and len(a.args) == 1 and not a.kwargs
            and isinstance(a.args[0], fx.Node) and order.get(a.args[0], before) < before)


def _replace_with_group(gm: fx.GraphModule, chunk: list, x: fx.Node, psf: float, shared: bool, x_int8: bool) -> None:
    """One group node before the first member; each member's users read ``getitem(group, i)`` instead."""
    with gm.graph.inserting_before(chunk[0]):
        weights, biases, thresholds, sparsities = ([n.args[i] for n in chunk] for i in (1, 2, 3, 5))
        scales = [n.args[6] if len(n.args) > 6 else None for n in chunk]
        group = gm.graph.call_function(
            torch.ops.teal.sparse_linear_group.default, (x, weights, biases, thresholds, psf, sparsities, scales, shared,
                                                           x_int8)
        )
        vals = [n.meta.get("val") for n in chunk]
        if all(v is not None for v in vals):
            group.meta["val"] = vals
        items = []
        for i, n in enumerate(chunk):
            item = gm.graph.call_function(operator.getitem, (group, i))
            item.meta.update(n.meta)
            items.append(item)
    for n, item in zip(chunk, items):
        n.replace_all_uses_with(item)
        label = n.meta.get("teal")
        if label is not None:
            label.node = item
        gm.graph.erase_node(n)
    log.debug("teal: grouped %s into one launch", [getattr(n.meta.get("teal"), "role", "?") for n in chunk])


def group_shared_input(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    made = 0
    for (x, psf, _, _, shared, x_int8), members in _members_by_input(gm).items():
        members.sort(key=order.__getitem__)
        for start in range(0, len(members), MAX_SEGMENTS):
            chunk = members[start:start + MAX_SEGMENTS]
            if len(chunk) < 2:
                continue
            args = [a for n in chunk for a in (*n.args[:3], *n.args[6:7]) if isinstance(a, fx.Node)]
            for a in args:  # a TP rank's w.to_local(), traced next to its own linear: hoisted, it is a pure view
                if order.get(a, len(order)) > order[chunk[0]] and _hoistable_shard(a, order, order[chunk[0]]):
                    chunk[0].prepend(a)
                    order[a] = order[chunk[0]] - 0.5
            if any(order.get(a, len(order)) >= order[chunk[0]] for a in args):  # a node made by this pass: later
                log.debug("teal: not grouping %s: an argument is defined after the first member", [n.name for n in chunk])
                continue
            _replace_with_group(gm, chunk, x, psf, shared, x_int8)
            made += 1
    return finish(gm, "groups", made, "%d groups of linears sharing an input -> teal::sparse_linear_group", made)
