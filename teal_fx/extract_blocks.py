"""Calibration: cut a labelled graph into one subgraph per decoder block, for the greedy allocator.

A block's output is the residual stream after it: the last node on the post-dominator chain of its last matched
linear, ``down`` (every path from it to the graph output passes through it), that no later linear feeds (of a later
block, the lm_head, a mixture's router). In a block whose MLP is not matched (a mixture of experts) the last is
``o``, and its output the residual stream after the attention: the greedy search weighs the attention's linears
alone, and the next block's subgraph runs the experts, dense. A block's subgraph is every node that output needs and
the previous block's output does not; everything it reads from outside (the previous block's output, RoPE tables,
masks, weights) becomes a placeholder.

Invariants: the source graph is not changed; each block subgraph computes exactly the values the full graph
computes for its output, given the same external values; its matched linears are ``call_module`` nodes to
``ThresholdedLinear`` so thresholds can change between runs without recompiling anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from teal_fx.kernels.reference import sparsify
from teal_fx.passes.analysis.dataflow import dataflow_graph, is_linear, linear_args, linear_scales
from teal_fx.passes.analysis.discovery import MatchedLinear


class BlockExtractionError(RuntimeError):
    pass


class ThresholdedLinear(nn.Module):
    """F.linear (or ``teal::quantized_linear``, given scales) with its input masked by ``thresholds[key]`` (0 or
    absent: dense). ``thresholds`` is shared."""

    def __init__(self, key: str, thresholds: dict) -> None:
        super().__init__()
        self.key = key
        self.thresholds = thresholds

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                scales: Optional[Tensor] = None) -> Tensor:
        t = self.thresholds.get(self.key, 0.0)
        if t > 0:
            x = sparsify(x, t)
        if scales is not None:
            return torch.ops.teal.quantized_linear(x, weight, scales, bias)
        return F.linear(x, weight, bias)


@dataclass
class BlockSubgraph:
    block: int
    gm: fx.GraphModule  # placeholders: the external values, in ``inputs`` order; output: the block output
    inputs: list[fx.Node]  # nodes of the source graph whose values the block reads
    output: fx.Node  # node of the source graph
    linears: list[MatchedLinear]
    thresholds: dict  # key -> threshold used by the ThresholdedLinear modules


def _block_outputs(gm: fx.GraphModule, matched: list[MatchedLinear]) -> dict[int, fx.Node]:
    g = dataflow_graph(gm.graph)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    ipdom = nx.immediate_dominators(g.reverse(copy=False), out_node)
    by_block: dict[int, list[MatchedLinear]] = {}
    for m in matched:
        by_block.setdefault(m.block, []).append(m)
    blocks = sorted(by_block)
    other_linears = [n for n in gm.graph.nodes if is_linear(n) and "teal" not in n.meta]
    outputs = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for i, b in enumerate(blocks):
        last = max((m.node for m in by_block[b]), key=order.get)
        # linears after this block's last: later blocks', and unmatched ones (lm_head, a mixture's router)
        later = [m.node for bb in blocks[i + 1 :] for m in by_block[bb]] + [n for n in other_linears
                                                                            if order[n] > order[last]]
        foreign = set(later)
        for n in later:
            foreign |= nx.descendants(g, n)
        chain, n = [], last
        while n in ipdom and ipdom[n] is not n and ipdom[n] is not out_node:
            n = ipdom[n]
            if n in foreign:
                break
            chain.append(n)
        if not chain:
            raise BlockExtractionError(f"block {b}: could not find where its output rejoins the residual stream")
        outputs[b] = chain[-1]
    return outputs


def extract_blocks(gm: fx.GraphModule, matched: list[MatchedLinear]) -> list[BlockSubgraph]:
    """One ``BlockSubgraph`` per block of ``matched`` (which must all come from ``gm``), in block order."""
    outputs = _block_outputs(gm, matched)
    g = dataflow_graph(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_key = {m.node: m for m in matched}
    result, prev_needed = [], set()
    for b in sorted(outputs):
        out = outputs[b]
        needed = nx.ancestors(g, out) | {out}
        own = {n for n in needed - prev_needed if n.op not in ("placeholder", "get_attr", "output")}
        prev_needed |= needed
        nodes = sorted(own, key=order.get)
        inputs = sorted({a for n in nodes for a in n.all_input_nodes if a not in own}, key=order.get)
        thresholds: dict[str, float] = {}
        graph = fx.Graph()
        root = nn.Module()
        env = {}
        for a in inputs:
            env[a] = graph.placeholder(a.name)
        linears = []
        for n in nodes:
            if n in by_key:
                m = by_key[n]
                x, w, bias = linear_args(n)
                name = f"teal_{len(linears)}"
                root.add_module(name, ThresholdedLinear(m.key, thresholds))
                scales = linear_scales(n)
                env[n] = graph.call_module(name, (env[x], env[w], env[bias] if bias is not None else None,
                                                  env[scales] if scales is not None else None))
                env[n].meta.update(n.meta)
                linears.append(m)
            else:
                env[n] = graph.node_copy(n, env.__getitem__)
        graph.output(env[out])
        for n in nodes:  # get_attr targets and submodules of the source graph stay reachable
            if n.op == "call_module" and not hasattr(root, n.target):
                root.add_module(n.target.replace(".", "_"), gm.get_submodule(n.target))
                env[n].target = n.target.replace(".", "_")
        sub = fx.GraphModule(root, graph)
        result.append(BlockSubgraph(b, sub, inputs, out, linears, thresholds))
    return result
