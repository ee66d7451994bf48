"""Rewrite: ``torch.arange(1) + p``, p a one-element int64 tensor, becomes ``p.reshape(1)``: the position of a
decode step's one token read from the counter it is made of, not computed into a new tensor.

Why: transformers' static cache (5.x) writes each layer's new key/value row at ``arange(S) + cumulative_length``, the
layer's own counter. In a decode step S is 1, and each of 32 layers' ``arange(1) + counter`` is a tensor Inductor
forms with a kernel before that layer's attention op reads it: on the GPU, small launches inside the step's chain
of dependent launches (with the per-layer copies of cos, sin and the mask that kernels/ops.py's ``ANY_STRIDES``
removes; together 8-9 launches, 13 µs of a step on an H100, docs/perf-log.md v62). As a view of the counter there
is nothing to form.

Matches ``add`` (``operator.add`` or ``torch.add`` without ``alpha``/``out``) of ``torch.arange(1)`` (no start, step
or dtype other than int64) and a node whose fake value is a 0-d or one-element int64 tensor on the same device.

Invariants:
* ``arange(1)`` is ``[0]``, so the sum equals ``p`` as a one-element tensor: same value, shape [1], dtype int64.
* The view aliases ``p`` where the sum did not: the rewrite is refused unless nothing that may write ``p``'s storage
  (an in-place method or function, a mutable op, a module call) lies after the sum and before its last reader, and
  every reader of the sum only reads it (an op whose schema neither writes nor aliases that argument, or plain
  arithmetic: no view, no in-place method, no graph output). ``batch_input_increments`` runs first, so the
  counters' increments already sit at the end of the graph, after every reader.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
from torch import fx

from teal_fx.passes.analysis.dataflow import fake_value, is_call, mutated_arg, storage_of
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

_ADD = {operator.add, torch.add}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}


def _is_arange_1(n: object) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.arange and n.args == (1,)):
        return False
    if set(n.kwargs) - {"device", "dtype", "requires_grad"} or n.kwargs.get("requires_grad", False):
        return False
    return n.kwargs.get("dtype", torch.int64) == torch.int64


def _one_int64(n: object, device: torch.device) -> bool:
    v = fake_value(n) if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.numel() == 1 and v.dim() <= 1 \
        and v.device == device


def _may_write(n: fx.Node) -> bool:
    """Whether ``n`` may write any of its inputs: what ``dataflow.mutated_arg`` finds (``x += y`` too), and beyond
    its first tensor argument, conservatively, any in-place name, mutable schema or module call (a foreach op's list,
    a custom op's cache)."""
    if n.op == "call_module" or mutated_arg(n) is not None:
        return True
    if n.op == "call_method":
        return n.target.endswith("_") or n.target == "__setitem__"
    if n.op == "call_function":
        t = n.target
        if t is operator.setitem or getattr(t, "__name__", "").endswith("_"):
            return True
        schema = getattr(t, "_schema", None)
        return schema is not None and schema.is_mutable
    return False


def _only_reads(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` only reads ``value`` and returns nothing that aliases it: an op whose schema neither writes nor
    aliases the argument ``value`` is passed as (a custom op's cache position), or plain arithmetic. Anything else
    (a view, an in-place method, a module) might let the counter be written through the sum once it is a view."""
    if user.op != "call_function":
        return False
    if user.target in _ARITHMETIC:
        return not user.kwargs
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        given = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
        if (given is value or (isinstance(given, (list, tuple)) and value in given)) and arg.alias_info is not None:
            return False
    return True


def replace_position_arange(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = defaultdict(list)  # storage -> the nodes that take a tensor of it
    for n in graph.nodes:
        s = storage_of(n)
        if s is not None:
            readers[s].extend(n.users)
    replaced = 0
    for add in list(graph.nodes):
        if not is_call(add, _ADD) or len(add.args) != 2 or add.kwargs:
            continue
        a, b = add.args
        arange, p = (a, b) if _is_arange_1(a) else (b, a)
        out = fake_value(add)
        if not _is_arange_1(arange) or not isinstance(out, torch.Tensor) or tuple(out.shape) != (1,) \
                or not _one_int64(p, out.device) or not add.users or not all(_only_reads(u, add) for u in add.users):
            continue
        s = storage_of(p)
        last = max(order[u] for u in add.users)
        if s is None or any(order[add] < order[w] <= last and _may_write(w) for w in readers[s]):
            continue
        with graph.inserting_before(add):
            view = graph.call_method("reshape", (p, 1))
        view.meta["val"] = view.meta["example_value"] = fake_value(p).reshape(1)  # a view of p's, as the node is
        add.replace_all_uses_with(view)
        graph.erase_node(add)
        if not arange.users:
            graph.erase_node(arange)
        replaced += 1
    return finish(gm, "position_aranges", replaced,
                  "%d arange(1) + counter -> a view of the counter (a decode step's position)", replaced)
