"""Rewrite: attention of one query position (a decode step) becomes ``teal::decode_attention``, which reads the KV
cache with its own heads instead of the copies that ``repeat_kv`` makes for grouped-query attention.

Matches ``scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0, is_causal=False, scale=s, enable_gqa=g)``
with q statically [B, H, 1, D]. K and V are taken from before a ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, n, L,
D).reshape(B, Hkv * n, L, D)``, recognised by the shapes along the chain) when they come out of one; otherwise as
they are (``enable_gqa``, or as many KV heads as query heads).

Invariants:
* The new node computes what sdpa computed: same shape and dtype (``meta`` copied from the sdpa node). The op's
  reference, and its path on CPU, is sdpa on K/V repeated to the query heads.
* Prefill graphs (more than one query position), dropout, ``is_causal=True``, a mask that does not broadcast to
  [B, H, 1, L], symbolic shapes: left to sdpa. Nothing else in the graph changes; repeat nodes left without users
  are erased (``finish``).
* On CUDA the kernel's split-K scratch is reserved here, before any CUDA graph is captured.
"""
from __future__ import annotations

import logging
import math
import operator
from typing import Optional

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.kernels import decode_attention as kernel
from teal_fx.passes.analysis.dataflow import fake_value, is_sdpa, static_shape
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_FULL = slice(None, None, None)


def _sdpa_args(node: fx.Node) -> dict:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _before_repeat_kv(rep: fx.Node) -> Optional[fx.Node]:
    """The [B, Hkv, L, D] tensor that ``rep`` [B, Hkv * n, L, D] repeats head by head, if it is a repeat_kv chain."""
    if not (rep.op == "call_method" and rep.target in ("reshape", "view")) or not isinstance(rep.args[0], fx.Node):
        return None
    exp = rep.args[0]
    if not (exp.op == "call_method" and exp.target == "expand") or not isinstance(exp.args[0], fx.Node):
        return None
    ins = exp.args[0]
    if ins.op == "call_function" and ins.target is operator.getitem and ins.args[1] == (_FULL, _FULL, None, _FULL, _FULL):
        src = ins.args[0]
    elif ins.op == "call_method" and ins.target == "unsqueeze" and tuple(ins.args[1:]) == (2,):
        src = ins.args[0]
    else:
        return None
    shapes = [static_shape(n) for n in (src, ins, exp, rep)]
    if any(s is None for s in shapes) or len(shapes[0]) != 4:
        return None
    (b, hkv, length, d), unsq, expd, out = shapes
    n_rep = expd[2] if len(expd) == 5 else 0
    if unsq != (b, hkv, 1, length, d) or expd != (b, hkv, n_rep, length, d) or out != (b, hkv * n_rep, length, d):
        return None
    return src


def replace_decode_attention(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    op = torch.ops.teal.decode_attention.default
    replaced = 0
    for node in list(gm.graph.nodes):
        if not is_sdpa(node):
            continue
        a = _sdpa_args(node)
        q_shape = static_shape(a["query"])
        if q_shape is None or len(q_shape) != 4 or q_shape[2] != 1:
            continue  # a prefill (or a symbolic length): sdpa's flash kernels are the right tool
        if a["dropout_p"] != 0.0 or a["is_causal"] is not False or isinstance(a["scale"], fx.Node):
            continue
        k, v = a["key"], a["value"]
        if not a["enable_gqa"]:
            k, v = _before_repeat_kv(k) or k, _before_repeat_kv(v) or v
        k_shape, v_shape = static_shape(k), static_shape(v)
        b, h, _, d = q_shape
        if k_shape is None or k_shape != v_shape or len(k_shape) != 4 or k_shape[0] != b or k_shape[3] != d:
            continue
        if h % k_shape[1] != 0:
            continue
        length = k_shape[2]
        mask = a["attn_mask"]
        if mask is not None:
            m_shape = static_shape(mask)
            try:
                fits = m_shape is not None and torch.broadcast_shapes(m_shape, (b, h, 1, length)) == (b, h, 1, length)
            except RuntimeError:
                fits = False
            if not fits:
                continue
        scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(d)
        device = fake_value(a["query"]).device
        if device.type == "cuda":
            kernel.reserve_workspace(device, b, h, k_shape[1], length, d)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(op, (a["query"], k, v, mask, scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
        log.debug("teal: %s -> teal::decode_attention (%d query heads on %d KV heads, cache %d)", node.name, h,
                  k_shape[1], length)
    return finish(gm, "decode_attentions", replaced, "%d decode attentions -> teal::decode_attention", replaced)
