"""Rewrite: in-place increments of graph inputs by a number (a static cache's per-layer length counters:
``self.cumulative_length.add_(1)`` in every layer of transformers 5) become one ``torch._foreach_add_`` at the end.

Why: Inductor writes each mutated input back with its own kernel, so a 32-layer decode step launched 32 kernels of
~1.2 µs to add 1 to 32 one-element tensors; a foreach op is one launch.

Matches ``x.add_(c)`` (``call_method``, or ``torch.Tensor.add_`` as a function) with ``x`` a placeholder, ``c`` an int
or float, no ``alpha``, and the result unused. An increment is moved only when nothing reads ``x``, or any tensor
that shares its storage, after it; moved increments of the same number, dtype and device become one call placed
just before the output.

Invariants:
* Every read of a moved counter happens before its increment, in the original graph as in the new one, so every
  value the graph computes is unchanged; the inputs end with the same values (each got the same increment).
* Anything the rule does not cover (a read after the increment, ``alpha``, a tensor increment, an increment of an
  intermediate) stays where it was.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Optional

import torch
from torch import fx

from teal_fx.passes.analysis.dataflow import fake_value, storage_of
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")


def _is_number_increment(n: fx.Node) -> bool:
    is_add_ = (n.op == "call_method" and n.target == "add_") or (n.op == "call_function" and n.target is torch.Tensor.add_)
    return (
        is_add_ and len(n.args) == 2 and not n.kwargs and not n.users
        and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"
        and isinstance(n.args[1], (int, float)) and not isinstance(n.args[1], bool)
    )


def batch_input_increments(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = [n for n in graph.nodes if _is_number_increment(n)]
    if len(candidates) < 2:
        return gm
    by_storage = defaultdict(list)
    for n in graph.nodes:
        s = storage_of(n)
        if s is not None:
            by_storage[s].append(n)

    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for inc in candidates:
        x = inc.args[0]
        s = storage_of(x)
        if s is None:
            continue
        aliases = by_storage[s]
        if any(order[u] > order[inc] for a in aliases for u in a.users if u is not inc):
            continue  # something reads the counter after its increment: leave it
        v = fake_value(x)
        amount = inc.args[1]  # its type is part of the key: 1 and 1.0 hash alike but are different increments
        groups[(amount, type(amount), v.dtype, v.device)].append(inc)

    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    moved = 0
    for (value, _, _, _), incs in groups.items():
        if len(incs) < 2:
            continue
        with graph.inserting_before(output):
            batch = graph.call_function(torch._foreach_add_, ([i.args[0] for i in incs], value))
        batch.meta["example_value"] = batch.meta["val"] = None
        for inc in incs:
            graph.erase_node(inc)
        moved += len(incs)
        log.info("teal: %d in-place increments by %r of graph inputs -> one torch._foreach_add_ at the end", len(incs),
                 value)
    return finish(gm, "increments_batched", moved)
