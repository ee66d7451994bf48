"""Rewrite: every matched block linear becomes ``teal::sparse_linear`` with its threshold from the plan.

A linear is ``F.linear`` or, on a quantized model, ``teal::quantized_linear``, whose scales become the sparse op's
seventh argument (always written positionally: the nine arguments, scales None for a float weight; the eighth says
whether the plan's mask is shared by the batch, the ninth whether its inputs are rounded to int8, ``Plan.activations``).

Invariants:
* Only nodes labelled by ``label_block_linears`` are touched; lm_head and every other op stay as they are.
* The new node computes the same shape and dtype as the linear it replaces: its ``meta["val"]`` /
  ``meta["example_value"]`` is the old node's fake tensor.
* The threshold is read from the plan by the linear's key, nowhere else (the plan is the one source of truth); a
  shared-mask plan's threshold is the one for the graph's static batch size (``LinearPlan.threshold_for``). Where
  a decode graph's batch is symbolic, the input is masked in the graph with the threshold chosen from the plan's
  table at run time (``reference.sparsify_shared_by_batch``) and the op keeps what survives (threshold 0): the
  same result, one small kernel more a linear. A symbolic batch of a prefill takes the one-row threshold, and says so.
* A graph whose token dimension is statically longer than one (a prefill) keeps its linears dense unless the plan
  asks for prefill sparsity: the op would take its dense branch anyway, and Inductor keeps cuBLAS and its fusions.
  The graph's token count is its 3-D linear inputs' [B, S, K]; a linear whose input is flattened to [B·S, K] (OPT's
  MLP) has lost the positions, so in a graph of several tokens (or a symbolic number) it stays dense unless the plan
  sparsifies every prefill token (``prefill_sparse_from`` 0), where a row is a token either way.
* On CUDA, where the sparse GEMV cannot beat cuBLAS for the graph's static rows at the plan's sparsity (per-row
  masks over several rows, whose union keeps nearly every weight row: ``sparse_gemv_config.kernel_pays``), a float
  linear keeps its node and gets its input masked in the graph (``reference.sparsify``): the same result, and
  Inductor fuses the mask and keeps cuBLAS, so a batch never runs slower than dense.
"""
from __future__ import annotations

import logging

import torch
from torch import fx
from torch._dynamo.utils import counters

import teal_fx.kernels  # noqa: F401  (registers torch.ops.teal)
from teal_fx.kernels.reference import sparsify, sparsify_shared_by_batch
from teal_fx.kernels.sparse_gemv_config import gpu_name, kernel_pays
from teal_fx.passes.analysis.dataflow import carry_fake_value, fake_value, linear_args, linear_scales
from teal_fx.passes.context import PassContext
from teal_fx.passes.finish import finish

log = logging.getLogger("teal_fx.passes")


def _static_tokens(x: fx.Node):
    v = fake_value(x)
    if v is None or v.dim() < 3:
        return 1
    s = v.shape[-2]
    return int(s) if isinstance(s, int) else None  # None: symbolic, decided at run time by the op


def _unflattened(x: fx.Node) -> fx.Node:
    """The [B, S, K] tensor a 2-D linear input was flattened from by a view or reshape (OPT's MLP, GPT-2's Conv1D),
    else ``x``."""
    if x.op in ("call_method", "call_function") and getattr(x.target, "__name__", x.target) in ("view", "reshape") \
            and x.args and isinstance(x.args[0], fx.Node):
        v = fake_value(x.args[0])
        if v is not None and v.dim() >= 3:
            return x.args[0]
    return x


def _graph_tokens(xs: list[fx.Node]):
    """The token count of a graph from its linears' inputs ``xs``: S of the [B, S, K] ones, or of the tensors the 2-D
    ones were flattened from (None: symbolic; 1 where there are none, as a decode step's rows)."""
    xs = [_unflattened(x) for x in xs]
    counts = {_static_tokens(x) for x in xs if (v := fake_value(x)) is not None and v.dim() >= 3}
    if None in counts:
        return None
    return max(counts, default=1)


def _flattened(x: fx.Node) -> bool:
    v = fake_value(x)
    return v is not None and v.dim() == 2


def _static_batch(x: fx.Node):
    """The rows a shared mask averages over: dim 0 of [B, S, K] or [M, K] (``reference.keep_mask``); None if
    symbolic."""
    v = fake_value(x)
    if v is None:
        return None
    rows = v.shape[0] if v.dim() >= 2 else 1
    return int(rows) if isinstance(rows, int) else None


def _kernel_pays(x: fx.Node, w: fx.Node, sparsity, shared: bool) -> bool:
    """Whether the sparse GEMV beats cuBLAS for a one-token input's static rows (its batch) against weight ``w`` on
    its GPU (True off CUDA, or where the rows are symbolic: the op decides then)."""
    v, wv, rows = fake_value(x), fake_value(w), _static_batch(x)
    if v is None or wv is None or v.device.type != "cuda" or rows is None:
        return True
    N, K = wv.shape
    return kernel_pays(rows, sparsity, shared, gpu_name(v.device), int(N), int(K))


def _mask_input(gm: fx.GraphModule, node: fx.Node, x: fx.Node, mask_fn, *args) -> fx.Node:
    """``node`` reads ``mask_fn(x, *args)`` instead of ``x`` (its other readers keep ``x``); the new node carries x's
    fake value (the same shape and dtype)."""
    with gm.graph.inserting_before(node):
        masked = gm.graph.call_function(mask_fn, (x, *args))
    carry_fake_value(masked, x)
    node.replace_input_with(x, masked)
    return masked


def insert_sparse_linear(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plan, discovery = ctx.plan, ctx.discovery
    if plan is None or discovery is None or not discovery.matched:
        return gm
    op = torch.ops.teal.sparse_linear.default
    shared = plan.batch_mask == "shared"
    x_int8 = plan.activations == "int8"
    rewritten, dense, runtime_batch, flattened = [], [], [], []
    graph_tokens = _graph_tokens([linear_args(m.node)[0] for m in discovery.matched])
    for m in discovery.matched:
        node = m.node
        x, w, b = linear_args(node)
        tokens = _static_tokens(x)
        if _flattened(x) and graph_tokens != 1:
            tokens = graph_tokens
            if plan.prefill_sparse_from > 0.0:
                flattened.append(m.key)
                continue
        if tokens is not None and tokens > 1 and plan.prefill_sparse_from >= 1.0:
            continue
        if shared:
            batch, lp = _static_batch(x), plan.linears[m.key]
            if batch is None and tokens == 1 and lp.batch_thresholds:
                # the batch's threshold chosen at run time, in the graph; the op keeps what survives
                x = _mask_input(gm, node, x, sparsify_shared_by_batch, tuple(lp.batch_thresholds), float(lp.threshold))
                threshold = 0.0
                runtime_batch.append(m.key)
            else:
                if batch is None and lp.batch_thresholds:
                    log.warning("teal: %s: batch size not static in a graph of several tokens (Hugging Face "
                                "generate() compiles one unless its CompileConfig has dynamic=False), the shared mask "
                                "uses the one-row threshold", m.key)
                threshold = float(lp.threshold_for(batch))
        else:
            threshold = float(plan.threshold(m.key))
        sparsity = plan.linears[m.key].sparsity  # picks the kernel variant only; None (unknown) -> -1
        if tokens == 1 and linear_scales(node) is None and not _kernel_pays(x, w, sparsity, shared):
            _mask_input(gm, node, x, sparsify, threshold, shared)
            dense.append(m.key)
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                op, (x, w, b, threshold, float(plan.prefill_sparse_from), -1.0 if sparsity is None else float(sparsity),
                     linear_scales(node), shared, x_int8))
        new.meta.update(node.meta)
        new.meta["teal"] = m
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        m.node = new
        rewritten.append(m)
        log.debug("teal: rewrote block %d %s (%s) t=%.4g", m.block, m.role, m.key, threshold)
    ctx.rewritten = rewritten
    if runtime_batch:
        counters["teal"]["runtime_batch_thresholds"] += len(runtime_batch)
        log.info("teal: batch size not static: %d shared masks take their threshold from the plan's batch table at run "
                 "time (one masking kernel a linear more; dynamic=False compiles the batch's threshold in)",
                 len(runtime_batch))
    if dense:
        log.info("teal: %d linears masked in the graph and left to cuBLAS (the sparse GEMV cannot win for these rows "
                 "at this sparsity): %s", len(dense), ", ".join(dense[:4]) + (", ..." if len(dense) > 4 else ""))
    if flattened:
        log.info("teal: %d linears read their tokens flattened to rows in a graph of several tokens (%s): left dense, "
                 "the prefill's positions are not known there", len(flattened), ", ".join(flattened[:4]))
    if not rewritten and not dense:
        log.info("teal: prefill graph (static length > 1): %d block linears left dense", len(discovery.matched))
    return finish(gm, "linears_rewritten", len(rewritten), "%d linears -> teal::sparse_linear", len(rewritten))
