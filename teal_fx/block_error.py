"""The greedy allocator's measure of one block: how far its output moves from dense for a row of sparsities.

Why incremental: every greedy step tries each linear one bump above the accepted row, so a candidate differs from
that row in one threshold and only the nodes downstream of that linear change. The values that such nodes read from
outside their own downstream set (the *frontier*: the norm before gate/up, the other projections' outputs, the
residual) are kept for the accepted row, and a candidate recomputes only its linear's downstream nodes: gate, up
and down skip the attention half, down skips the whole block but itself. The chosen candidate is run once more to
advance the kept values (``accept``).

Invariants: ``error(row)`` is bit for bit what running the whole block subgraph gives (the same ops on the same
values); the block subgraph is not changed; a graph with a node that mutates its inputs is always run whole (a
partial run could change a kept value).
"""
from __future__ import annotations

from typing import Any, Optional

import networkx as nx
import torch
from torch import fx

from teal_fx.allocate import Row
from teal_fx.extract_blocks import BlockSubgraph, ThresholdedLinear
from teal_fx.histogram import AbsHistogram
from teal_fx.passes.analysis.dataflow import dataflow_graph, mutated_arg


def _mutates(n: fx.Node) -> bool:
    """Whether ``n`` may write to one of its inputs: an in-place op (``mutated_arg``), or any submodule but
    ``ThresholdedLinear`` (not looked into)."""
    if n.op == "call_module":
        return not isinstance(n.graph.owning_module.get_submodule(n.target), ThresholdedLinear)
    return mutated_arg(n) is not None


class _PartialRun(fx.Interpreter):
    """Runs only ``recompute`` (and placeholders, attributes, the output); every other value the recomputed nodes read
    is in the initial environment, which holds none of ``recompute`` (the interpreter skips what it holds). Records
    the values of ``record`` it computes."""

    def __init__(self, gm: fx.GraphModule, recompute: Optional[set], record: set) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.recompute, self.record = recompute, record
        self.recorded: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.recompute is not None and n not in self.recompute and n.op not in ("placeholder", "get_attr", "output"):
            return None  # not downstream of a changed threshold, and read by nothing that is
        out = super().run_node(n)
        if n in self.record:
            self.recorded[n] = out
        return out


class BlockError:
    """``error(row)``: the squared L2 distance of the block's output from dense on its cached inputs, over the last
    ``error_fraction`` of positions (TEAL: early positions, and the first token's outsized activations, would dominate
    otherwise). ``accept(row)``: the greedy search moved to ``row``; later rows are run from it."""

    def __init__(self, block: BlockSubgraph, inputs: list[list], histograms: dict[str, AbsHistogram],
                 error_fraction: float = 0.25) -> None:
        self.block, self.inputs, self.histograms, self.error_fraction = block, inputs, histograms, error_fraction
        gm = block.gm
        nodes = list(gm.graph.nodes)
        g = dataflow_graph(gm.graph)
        self.downstream: dict[str, set] = {}
        for n in nodes:
            mod = gm.get_submodule(n.target) if n.op == "call_module" else None
            if isinstance(mod, ThresholdedLinear):
                self.downstream[mod.key] = self.downstream.get(mod.key, set()) | nx.descendants(g, n) | {n}
        self.frontier = {a for down in self.downstream.values() for n in down for a in n.all_input_nodes
                         if a not in down and a.op not in ("placeholder", "get_attr")}
        self.incremental = not any(_mutates(n) for n in nodes)
        self.row: Row = {}
        self.kept: list[dict[fx.Node, Any]] = [{} for _ in inputs]  # per sequence: the accepted row's frontier
        self.dense = self.outs = self._run({}, None, keep=self.incremental)  # the accepted row's tails: dense

    def _tail(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() < 3:
            return y.float()
        start = int(y.shape[-2] * (1 - self.error_fraction))
        return y[..., start:, :].float()

    def _run(self, row: Row, recompute: Optional[set], keep: bool = False) -> list[torch.Tensor]:
        """The block's output tails for ``row``, recomputing only ``recompute`` from the kept values (None: whole runs).
        ``keep``: ``row`` becomes the kept one (its frontier values recorded)."""
        self.block.thresholds.clear()
        self.block.thresholds.update({k: self.histograms[k].quantile(s) for k, s in row.items() if s > 0})
        outs = []
        with torch.no_grad():
            for vals, kept in zip(self.inputs, self.kept):
                record = (self.frontier if recompute is None else self.frontier & recompute) if keep else set()
                run = _PartialRun(self.block.gm, recompute, record)
                env = None if recompute is None else {n: v for n, v in kept.items() if n not in recompute}
                outs.append(self._tail(run.run(*vals, initial_env=env)))
                kept.update(run.recorded)
        return outs

    def _recompute(self, row: Row) -> Optional[set]:
        """The nodes whose values ``row`` changes from the accepted row's (None: run whole)."""
        if not self.incremental:
            return None
        changed = [k for k in set(row) | set(self.row) if row.get(k, 0.0) != self.row.get(k, 0.0)]
        return set().union(*(self.downstream[k] for k in changed))

    def __call__(self, row: Row) -> float:
        recompute = self._recompute(row)
        outs = self.outs if recompute == set() else self._run(row, recompute)
        return float(sum(((y - d) ** 2).sum() for y, d in zip(outs, self.dense)))

    def accept(self, row: Row) -> None:
        if self.incremental:
            recompute = self._recompute(row)
            if recompute:
                self.outs = self._run(row, recompute, keep=True)
            self.row = dict(row)
