"""Fold the decode attention's split merge into o's launch: ``teal::sparse_qkv_rope_attention`` whose output reaches
o's ``teal::sparse_linear_add_rmsnorm`` only through views becomes one ``teal::sparse_attention_add_rmsnorm``.

Why: the attention splits each KV head's cache among programs, and the last of them to arrive merges their softmax
states: a barrier, a counter's round trip, the merge's reads and a store at the end of the launch, 2.0 of its 5.4 µs
in a chain on an H100 (docs/perf-log.md v56). Each o program can merge the states of its own K split of the
attention's output as it forms its x (``sparse_gemv_merged_add_rmsnorm``), as down forms silu(gate) * up
(``fold_swiglu_into_down``): the tail leaves the attention's launch for one more round trip in o's prologue.

Invariants:
* Matches only ``sparse_linear_add_rmsnorm(v, ...)`` where ``v`` comes from ``a = sparse_qkv_rope_attention(...)``
  through a chain of views (reshape, view, transpose, permute, contiguous, ...), each node of it and ``a`` with one
  user, that puts the heads side by side: run on an index tensor of ``a``'s shape, the chain must give what
  ``ops.o_input`` gives (the op's reference). Both ops share ``prefill_sparse_from``, ``shared`` and ``x_int8``. It
  runs after ``fold_qkv_finish_into_attention``, whose invariants already hold (decode graphs, no grad).
* The new node is inserted where o was, so the cache writes move from the attention to it: refused if a node
  between the two reads or writes either cache. It computes what the two computed (its reference is the two ops),
  takes over o's ``meta`` (so ``meta["val"]``, the (h, norm) pair, stays right) with the attention's ``meta["teal"]``
  label and o's as ``meta["teal_o"]``; its getitems are o's. The attention, the views and o are erased.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.kernels.ops import o_input
from teal_fx.passes.analysis.dataflow import is_call, read_between, static_shape
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_VIEW_METHODS = {"reshape", "view", "transpose", "permute", "contiguous", "flatten", "unflatten", "squeeze",
                 "unsqueeze"}
_VIEW_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze, torch.unsqueeze}
_ATTENTION_ARGS = 20  # sparse_qkv_rope_attention's: x ... mask, scale


def fold_attention_merge_into_o(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    attention_op = torch.ops.teal.sparse_qkv_rope_attention.default
    folded = 0
    for o in list(gm.graph.nodes):
        if o.op != "call_function" or o.target is not torch.ops.teal.sparse_linear_add_rmsnorm.default:
            continue
        found = _views_from(o.args[0], attention_op)
        if found is None:
            continue
        attn, views = found
        if len(attn.args) != _ATTENTION_ARGS or not _puts_heads_side_by_side(attn, views):
            continue
        _, w_o, b_o, t_o, psf_o, sparsity_o, residual, norm_weight, eps, scales_o, shared_o, x_int8_o = o.args
        psf, shared, x_int8 = attn.args[4], attn.args[7], attn.args[8]
        if (psf, shared, x_int8) != (psf_o, shared_o, x_int8_o):
            continue
        if read_between(attn, o, {attn.args[13], attn.args[14]}, skip=views):  # the k and v caches
            continue
        with gm.graph.inserting_before(o):
            new = gm.graph.call_function(
                torch.ops.teal.sparse_attention_add_rmsnorm.default,
                (*attn.args, w_o, b_o, t_o, sparsity_o, scales_o, residual, norm_weight, eps),
            )
        new.meta.update(o.meta)
        new.meta.pop("teal", None)
        if attn.meta.get("teal") is not None:
            new.meta["teal"] = attn.meta["teal"]
        if o.meta.get("teal") is not None:
            new.meta["teal_o"] = o.meta["teal"]
        o.replace_all_uses_with(new)
        for n in (o, *reversed(views), attn):
            gm.graph.erase_node(n)
        folded += 1
    return finish(gm, "attention_merge_folded", folded,
                  "%d attention merges folded into their o launches -> teal::sparse_attention_add_rmsnorm", folded)


def _views_from(node: object, attention_op) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(the attention, the views from it to ``node`` in order) if ``node`` is reached from one only through view
    nodes of one user each, else None."""
    views = []
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_function" and node.target is attention_op:
            return node, views[::-1]
        if not is_call(node, _VIEW_FUNCTIONS, _VIEW_METHODS) or not node.args or \
                any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            return None
        views.append(node)
        node = node.args[0]
    return None


def _puts_heads_side_by_side(attn: fx.Node, views: list[fx.Node]) -> bool:
    """Whether ``views`` map the attention's output as ``o_input`` does: checked by running them on an index tensor
    of its shape (from the graph's example value). Symbolic or unknown shapes are refused."""
    shape = static_shape(attn)
    if shape is None or len(shape) != 4:
        return False
    index = torch.arange(math.prod(shape)).reshape(shape)
    got = index
    try:
        for v in views:
            if v.op == "call_method":
                got = getattr(got, v.target)(*v.args[1:], **v.kwargs)
            else:
                got = v.target(got, *v.args[1:], **v.kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    want = o_input(index)
    return got.shape == want.shape and torch.equal(got, want)
