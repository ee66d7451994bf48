"""Rewrite: a matmul whose contracted dimension is 1 (an outer product) becomes a broadcast multiply.

Why: transformers' rotary embedding (up to at least 5.17) computes its angles as ``inv_freq[:, None] @
position[None, :]`` in fp32, and Inductor sends every matmul to cuBLAS: an extern kernel it cannot fuse, launched
once per decode step outside the chain of dependent launches (3.3 µs a step on the H200, docs/perf-log.md v36). As a
multiply it fuses into Inductor's cos/sin kernel. (transformers 5.25 already writes the multiply.)

Matches ``a @ b`` (``operator.matmul``, ``torch.matmul``, ``torch.bmm``, ``torch.mm``, or the ``matmul`` / ``bmm``
methods) on two tensors of at least two dimensions, of one floating dtype, where a's last dimension and b's
second-to-last are both the plain int 1 and whose result has their dtype; no keyword arguments (``out=``).

Invariants:
* Every output element is one product and no sum, so the multiply gives the matmul's value (cuBLAS with TF32 off;
  where TF32 is allowed the matmul may round its fp32 inputs first and the multiply does not).
* matmul broadcasts the batch dimensions as a multiply does (bmm takes equal ones), so the shape and dtype are the
  matmul's: checked on the fake values, and the new node carries the matmul's fake value.
* Inside an enabled autocast region a matmul runs in the lower precision and a multiply does not: its result's dtype
  differs from its inputs', so it is left alone.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
from torch import fx

from teal_fx.passes.analysis.dataflow import carry_fake_value, fake_value
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_METHODS = {"matmul", "bmm"}


def _is_matmul(n: fx.Node) -> bool:
    return ((n.op == "call_function" and n.target in _FUNCTIONS) or (n.op == "call_method" and n.target in _METHODS)) \
        and len(n.args) == 2 and not n.kwargs


def _outer_product(n: fx.Node) -> bool:
    a, b = n.args
    va, vb, vo = (fake_value(x) if isinstance(x, fx.Node) else None for x in (a, b, n))
    if not all(isinstance(v, torch.Tensor) for v in (va, vb, vo)):
        return False
    if va.dim() < 2 or vb.dim() < 2 or va.dtype != vb.dtype or not va.dtype.is_floating_point:
        return False
    k_a, k_b = va.shape[-1], vb.shape[-2]
    if not (type(k_a) is int and type(k_b) is int and k_a == 1 and k_b == 1):
        return False
    try:  # the multiply's broadcast must be the matmul's result shape
        shape = torch.broadcast_shapes(va.shape, vb.shape)
    except RuntimeError:
        return False
    return shape == vo.shape and vo.dtype == va.dtype  # (an enabled autocast region changes the dtype)


def replace_outer_product_matmul(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    graph = gm.graph
    matched = 0
    for n in list(graph.nodes):
        if _is_matmul(n) and _outer_product(n):
            with graph.inserting_before(n):
                mul = graph.call_function(operator.mul, tuple(n.args))
            carry_fake_value(mul, n)  # the same value, shape and dtype
            n.replace_all_uses_with(mul)
            graph.erase_node(n)
            matched += 1
    return finish(gm, "outer_product_matmuls", matched,
                  "%d matmuls over a dimension of 1 (outer products) -> broadcast multiplies", matched)
