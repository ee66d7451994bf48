"""Group the sparse linears that read the same input (q/k/v, gate/up) into one ``teal::sparse_linear_group``.

Why: on the decode path each linear is one kernel launch with a fixed cost (ramp-up, tail, epilogue) of a few µs;
k and v of Llama-3-8B (1024x4096) are mostly that fixed cost. One grouped launch pays it once (NOTES.md).

Invariants:
* Only ``teal::sparse_linear`` nodes written by ``insert_sparse_linear`` are touched, grouped by identical input
  node and ``prefill_sparse_from``, with every member's bias present or every member's absent, up to
  ``MAX_SEGMENTS`` per group (larger sets are cut into consecutive groups).
* Each member keeps its own weight and threshold; its users now read ``getitem(group, i)``, which carries the
  member's old ``meta`` (so ``meta["val"]`` stays right) and its ``meta["teal"]`` label.
* The group node is inserted before the first member, after every argument it reads (checked, else no group).
"""
from __future__ import annotations

import logging
import operator
from collections import defaultdict

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.kernels.sparse_gemv import MAX_SEGMENTS

log = logging.getLogger("teal_fx.passes")


def _members_by_input(gm: fx.GraphModule) -> dict:
    op = torch.ops.teal.sparse_linear.default
    groups: dict = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is op:
            x, w, b, t, psf = n.args
            groups[(x, psf, b is None)].append(n)
    return groups


def group_shared_input(gm: fx.GraphModule, ctx=None) -> fx.GraphModule:
    if ctx is not None and not getattr(ctx, "group_shared_input", True):
        return gm
    group_op = torch.ops.teal.sparse_linear_group.default
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    made = 0
    for (x, psf, _), members in _members_by_input(gm).items():
        members.sort(key=order.__getitem__)
        for start in range(0, len(members), MAX_SEGMENTS):
            chunk = members[start:start + MAX_SEGMENTS]
            if len(chunk) < 2:
                continue
            first = chunk[0]
            args = [a for n in chunk for a in n.args[:3] if isinstance(a, fx.Node)]
            if any(order[a] >= order[first] for a in args):
                log.debug("teal: not grouping %s: an argument is defined after the first member", [n.name for n in chunk])
                continue
            with gm.graph.inserting_before(first):
                group = gm.graph.call_function(
                    group_op,
                    (x, [n.args[1] for n in chunk], [n.args[2] for n in chunk], [n.args[3] for n in chunk], psf),
                )
                vals = [n.meta.get("val") for n in chunk]
                if all(v is not None for v in vals):
                    group.meta["val"] = vals
                outs = []
                for i, n in enumerate(chunk):
                    item = gm.graph.call_function(operator.getitem, (group, i))
                    item.meta.update(n.meta)
                    outs.append(item)
            for n, item in zip(chunk, outs):
                n.replace_all_uses_with(item)
                label = n.meta.get("teal")
                if label is not None:
                    label.node = item
                gm.graph.erase_node(n)
            made += 1
            log.debug("teal: grouped %s into one launch", [n.meta.get("teal").role if n.meta.get("teal") else "?" for n in chunk])
    if made:
        gm.graph.lint()
        gm.recompile()
        log.info("teal: %d groups of linears sharing an input -> teal::sparse_linear_group", made)
    return gm
