"""Fold a decode step's RoPE and static-cache writes into the q/k/v launch: ``teal::sparse_linear_group`` (q, k, v)
followed by the heads' ``view`` / ``transpose``, transformers' ``apply_rotary_pos_emb`` on q and k and the two
``index_copy_`` of a static cache becomes one ``teal::sparse_linear_qkv_rope``.

Why: between the q/k/v launch and the attention a decode step ran Inductor's RoPE kernel and the cache writes
(~1.4 µs a layer on the H200, mostly waiting for the launch before); the grouped launch's finishing launch already
holds every head's sums, and cos, sin and the position are ready before it starts (docs/perf-log.md, v38/v40).

Invariants:
* Matches only a decode graph's pattern, exactly: the group has three segments labelled q, k, v, each read by one
  ``getitem`` -> ``view`` [B, 1, H, D] -> ``transpose(1, 2)`` [B, H, 1, D], q and k with Llama's RMSNorm of each head
  between view and transpose (Qwen3's q/k norms, same eps) or neither; q's and k's heads go only into
  ``t * cos + cat((-t[..., D/2:], t[..., :D/2]), -1) * sin`` (either operand order) with the same cos and sin,
  [B or 1, 1, 1, D] in the heads' dtype; the rotated k and v go only into ``k_cache.index_copy_(2, pos, k)`` and
  ``v_cache.index_copy_(2, pos, v)`` (same ``pos``, results unused). Nothing requires grad (the op has no autograd).
  Anything else (partial rotary, another norm, interleaved RoPE, a dynamic cache, a prefill) is left alone.
* The new node is inserted before the first ``index_copy_``; it is refused if a user of the rotated q comes before
  that point, or if a node between it and the last ``index_copy_`` touches either cache, so every read of the caches
  still sees the same writes. It computes what the matched nodes computed (its reference is those ops,
  ``reference_qkv_rope_``), takes over the rotated q's fake value, and carries the q label (``meta["teal"]``); the
  matched nodes are erased.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
from torch import fx

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.passes.analysis.dataflow import (
    ADD_TARGETS,
    MUL_TARGETS,
    carry_fake_value,
    fake_value,
    is_call,
    only_user,
    other_operand,
    read_between,
    static_shape,
)
from teal_fx.passes.analysis.rmsnorm import RMSNormMatch, llama_rmsnorm_of
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")

_NEG = {operator.neg, torch.neg}


def _heads(item: fx.Node) -> Optional[tuple[fx.Node, list[fx.Node], Optional[RMSNormMatch]]]:
    """(the [B, H, 1, D] heads, the matched nodes, Qwen3's per-head RMSNorm or None) of a group's [B, 1, N] segment,
    if it is split into heads (``view``, a norm of each head at most, ``transpose(1, 2)``) and nothing else."""
    shape = static_shape(item)
    if shape is None or len(shape) != 3 or shape[1] != 1:
        return None
    view = only_user(item)
    if view is None or not is_call(view, set(), ("view", "reshape")):
        return None
    norm = llama_rmsnorm_of(view) if len(view.users) == 1 else None
    tr = only_user(norm.out if norm is not None else view)
    if tr is None or not is_call(tr, {torch.transpose}, ("transpose",)) or tr.kwargs:
        return None
    dims = tr.args[1:]
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims) or {d % 4 for d in dims} != {1, 2}:
        return None
    v, t = static_shape(view), static_shape(tr)
    if v is None or t is None or len(v) != 4 or v[1] != 1 or t != (v[0], v[2], 1, v[3]):
        return None
    return tr, [view, *(norm.chain if norm is not None else []), tr], norm


def _half(u: fx.Node, t: fx.Node) -> Optional[tuple]:
    """(start, stop) of ``t[..., start:stop]`` when ``u`` is that slice of ``t``, else None."""
    if u.op != "call_function" or u.target is not operator.getitem or u.kwargs or u.args[0] is not t:
        return None
    idx = u.args[1] if len(u.args) == 2 else None
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)):
        return None
    return (idx[1].start, idx[1].stop) if idx[1].step is None else None


def _rope(t: fx.Node, D: int) -> Optional[tuple[fx.Node, fx.Node, fx.Node, list[fx.Node]]]:
    """(rotated, cos, sin, matched nodes) where ``t``'s only users form ``t * cos + rotate_half(t) * sin``."""
    if len(t.users) != 3:
        return None
    halves = {_half(u, t): u for u in t.users}
    x1, x2 = halves.get((None, D // 2)), halves.get((D // 2, None))
    m1 = next((u for u in t.users if is_call(u, MUL_TARGETS, ("mul", "__mul__"))), None)
    if m1 is None or x1 is None or x2 is None:
        return None
    cos = other_operand(m1, t)
    neg = only_user(x2)
    if neg is None or not is_call(neg, _NEG, ("neg", "__neg__")) or tuple(neg.args) != (x2,) or neg.kwargs:
        return None
    cat = only_user(neg)
    if cat is None or only_user(x1) is not cat or not is_call(cat, {torch.cat}, ("cat",)):
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if tuple(cat.args[0]) != (neg, x1) or dim not in (-1, 3):
        return None
    m2 = only_user(cat)
    if m2 is None or not is_call(m2, MUL_TARGETS, ("mul", "__mul__")):
        return None
    sin = other_operand(m2, cat)
    add = only_user(m1)
    if add is None or only_user(m2) is not add or not is_call(add, ADD_TARGETS, ("add", "__add__")) \
            or other_operand(add, m1) is not m2:
        return None
    if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
        return None
    return add, cos, sin, [x1, x2, neg, cat, m1, m2, add]


def _cache_write(n: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(cache, pos, write) when ``n`` is only written into a cache by ``cache.index_copy_(2, pos, n)``."""
    w = only_user(n)
    if w is None or w.op != "call_method" or w.target != "index_copy_" or w.users or w.kwargs or len(w.args) != 4:
        return None
    cache, dim, pos, src = w.args
    if src is not n or dim not in (2, -2) or not isinstance(cache, fx.Node) or not isinstance(pos, fx.Node):
        return None
    return cache, pos, w


def _match(group: fx.Node, order: dict) -> Optional[dict]:
    weights = group.args[1]
    if len(weights) != 3 or len(group.users) != 3:
        return None
    items = {}
    for u in group.users:
        label = u.meta.get("teal")
        if u.op != "call_function" or u.target is not operator.getitem or label is None:
            return None
        items[label.role] = u
    if set(items) != {"q", "k", "v"}:
        return None
    heads = {r: _heads(items[r]) for r in "qkv"}
    if any(h is None for h in heads.values()):
        return None
    (q, q_nodes, q_norm), (k, k_nodes, k_norm), (v, v_nodes, v_norm) = (heads[r] for r in "qkv")
    if v_norm is not None or (q_norm is None) != (k_norm is None) or (q_norm and q_norm.eps != k_norm.eps):
        return None
    D = static_shape(q)[3]
    if D % 2 or static_shape(k)[3] != D or static_shape(v) != static_shape(k):
        return None
    rq, rk = _rope(q, D), _rope(k, D)
    if rq is None or rk is None or rq[1:3] != rk[1:3]:
        return None
    q_rot, cos, sin, q_rope = rq
    k_rot, _, _, k_rope = rk
    dtype = getattr(fake_value(q), "dtype", None)
    for c in (cos, sin):
        cs = static_shape(c)
        if cs is None or len(cs) != 4 or cs[0] not in (1, static_shape(q)[0]) or cs[1:] != (1, 1, D) \
                or getattr(fake_value(c), "dtype", None) != dtype:
            return None
    kw, vw = _cache_write(k_rot), _cache_write(v)
    if kw is None or vw is None or kw[1] is not vw[1] or kw[0] is vw[0]:
        return None
    nodes = [*items.values(), *q_nodes, *k_nodes, *v_nodes, *q_rope, *k_rope]
    if any(getattr(fake_value(n), "requires_grad", False) for n in nodes):
        return None
    first, last = sorted((kw[2], vw[2]), key=order.__getitem__)
    if any(order[u] < order[first] for u in q_rot.users):
        return None
    if read_between(first, last, {kw[0], vw[0]}):  # the caches read between their two writes
        return None
    norms = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else (None, None, 0.0)
    if any(isinstance(n, fx.Node) and order[n] > order[first] for n in norms):
        return None
    return dict(norms=norms, index={r: items[r].args[1] for r in "qkv"}, D=D, cos=cos, sin=sin, pos=kw[1], k_cache=kw[0],
                v_cache=vw[0], q_rot=q_rot, first=first, erase=[kw[2], vw[2], *nodes], q_item=items["q"])


def fold_rope_into_qkv_finish(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    op = torch.ops.teal.sparse_linear_group.default
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    folded = 0
    for group in list(gm.graph.nodes):
        if group.op != "call_function" or group.target is not op:
            continue
        m = _match(group, order)
        if m is None:
            continue
        x, weights, biases, thresholds, psf, sparsities, scales, shared, x_int8 = group.args
        idx = [m["index"][r] for r in "qkv"]
        with gm.graph.inserting_before(m["first"]):
            new = gm.graph.call_function(
                torch.ops.teal.sparse_linear_qkv_rope.default,
                (x, [weights[i] for i in idx], [biases[i] for i in idx], [thresholds[i] for i in idx], psf,
                 [sparsities[i] for i in idx], [scales[i] for i in idx], shared, x_int8, m["D"], m["cos"], m["sin"],
                 m["pos"], m["k_cache"], m["v_cache"], *m["norms"]),
            )
        carry_fake_value(new, m["q_rot"])
        if m["q_item"].meta.get("teal") is not None:
            new.meta["teal"] = m["q_item"].meta["teal"]
        m["q_rot"].replace_all_uses_with(new)
        for n in sorted(m["erase"], key=order.__getitem__, reverse=True):
            gm.graph.erase_node(n)
        gm.graph.erase_node(group)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        folded += 1
    return finish(gm, "rope_folded", folded,
                  "%d q/k/v groups with RoPE and the cache writes -> teal::sparse_linear_qkv_rope", folded)
