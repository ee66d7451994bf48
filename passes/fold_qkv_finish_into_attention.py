"""Fold the q/k/v + RoPE finish into the decode attention: ``teal::sparse_linear_qkv_rope`` whose only user is the
``teal::decode_attention`` over the caches it writes becomes one ``teal::sparse_qkv_rope_attention``.

Why: as ``fold_swiglu_into_down`` for the MLP (docs/perf-log.md v49): the q/k/v finishing launch is one of a layer's
chain of dependent launches, and every attention program can form its own query heads from the q/k/v sums; the
program whose cache slice holds the new position also forms and writes the new k/v row before reading it, and the
last program of each KV head zeroes the sums (``decode_attention_from_qkv_sums``). One launch a layer fewer.

Invariants:
* Matches only ``decode_attention(q, k, v, mask, scale)`` where ``q = sparse_linear_qkv_rope(...)`` has no other
  user and ``k`` / ``v`` are the very cache nodes that op writes; it runs after ``fold_rope_into_qkv_finish`` and
  ``replace_decode_attention``, whose invariants already hold (decode graphs, no grad).
* The new node is inserted where the attention was, so the cache writes move from the q/k/v op to it: refused if a
  node between the two reads or writes either cache. It computes what the two computed (its reference is the two
  ops), takes over the attention node's ``meta`` (so ``meta["val"]`` stays right) and the q/k/v op's
  ``meta["teal"]`` label. The two nodes are erased.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.passes.analysis.dataflow import read_between
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_QKV_ARGS = ("x", "weights", "biases", "thresholds", "prefill_sparse_from", "sparsities", "scales", "shared", "x_int8",
             "head_dim", "cos", "sin", "cache_position", "k_cache", "v_cache", "q_norm", "k_norm", "norm_eps")


def fold_qkv_finish_into_attention(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    qkv_op = torch.ops.teal.sparse_linear_qkv_rope.default
    folded = 0
    for attn in list(gm.graph.nodes):
        if attn.op != "call_function" or attn.target is not torch.ops.teal.decode_attention.default:
            continue
        q, k, v, mask, scale = attn.args
        if not isinstance(q, fx.Node) or q.target is not qkv_op or len(q.users) != 1 or len(q.args) != len(_QKV_ARGS):
            continue
        args = dict(zip(_QKV_ARGS, q.args))
        if args["k_cache"] is not k or args["v_cache"] is not v:
            continue
        if read_between(q, attn, {k, v}):
            continue
        with gm.graph.inserting_before(attn):
            new = gm.graph.call_function(torch.ops.teal.sparse_qkv_rope_attention.default, (*q.args, mask, scale))
        new.meta.update(attn.meta)
        if q.meta.get("teal") is not None:
            new.meta["teal"] = q.meta["teal"]
        attn.replace_all_uses_with(new)
        gm.graph.erase_node(attn)
        gm.graph.erase_node(q)
        folded += 1
    return finish(gm, "qkv_finish_folded", folded,
                  "%d q/k/v + RoPE finishes folded into their decode attentions -> teal::sparse_qkv_rope_attention",
                  folded)
