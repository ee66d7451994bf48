"""Shared-mask thresholds, read in a sparse run.

Why: a shared mask (``batch_mask="shared"``) drops the channels whose mean |x| over the batch's rows is at or below a
threshold per batch size. Read on the dense model's inputs, as per-row thresholds are, those thresholds drop far more
than planned once the model runs sparse: every mask shrinks the inputs of the linears after it a little, and the mean
of B rows is narrow, so that small shift moves many channels below the threshold (SmolLM2-135M, a 50% plan: 59-65%
dropped at batch 2-16; docs/perf-log.md v30).

How: the calibration windows run B at a time, a batch's rows from different places in the text, with every planned
linear's input masked as a shared mask masks it. Each batch drops exactly the linear's planned fraction of its own
means (the batch's quantile, not a threshold), so one pass gives every linear the inputs a sparse run at the plan's
sparsities feeds it, whatever the thresholds were before. The histograms of those means give the thresholds.

Under tensor parallelism each rank masks a row-sharded input (o, down) at the quantile of its own slice, and the
ranks' histograms are summed: close to the whole input's quantile for a slice of thousands of channels; not measured.

The thresholds hold at the plan's sparsities: ``Plan.batch_read_at`` records the model-level sparsity they were read
at, and ``Plan.at`` warns when asked for another (``teal_fx.read_batch_thresholds`` re-reads the plan it returns).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from teal_fx.capture import discover_captured, recompile_limits
from teal_fx.errors import CalibrationDataError, PlanError
from teal_fx.histogram import AbsHistogram
from teal_fx.passes.analysis.discovery import parameter_names
from teal_fx.plan import BATCH_SIZES, Plan
from teal_fx.tensor_parallel import reduce_histograms, tp_group

MIN_WINDOW = 256  # tokens: calibration windows are split down to this to give 2 x 16 rows from different windows


def with_batch_histograms(plan: Plan, histograms: dict[str, dict[int, AbsHistogram]]) -> Plan:
    """``plan`` with ``histograms`` (read at its sparsities) as its batch histograms, and the thresholds from them."""
    out = replace(plan, batch_histograms=histograms, batch_read_at=plan.target_sparsity if plan.target_sparsity
                  is not None else plan.model_sparsity())
    return replace(out, linears={k: replace(lp, batch_thresholds=out.batch_thresholds_at(k, lp.sparsity))
                                 for k, lp in plan.linears.items()})


def read_batch_histograms(model: nn.Module, plan: Plan, seqs: torch.Tensor, *,
                          batch_sizes: Sequence[int] = BATCH_SIZES, progress: bool = True) -> dict[str, dict[int, AbsHistogram]]:
    """Per planned linear and batch size B: the histogram of the rows' mean |x| per channel and position, ``seqs``
    (token windows [n, L]) run B at a time with every linear masked at its planned sparsity (module docstring)."""
    if plan.batch_mask != "shared":
        raise PlanError(f"batch thresholds are for shared-mask plans; this plan has batch_mask={plan.batch_mask!r}")
    if any(lp.sparsity is None for lp in plan.linears.values()):
        raise PlanError("reading batch thresholds needs the plan's per-linear sparsities (this plan was made from "
                        "explicit thresholds)")
    seqs = split_windows(seqs, rows=2 * max(batch_sizes))
    if len(seqs) < max(batch_sizes):
        raise CalibrationDataError(f"{len(seqs)} calibration windows cannot fill a batch of {max(batch_sizes)} rows "
                                   f"from different windows: a shared mask needs more text (at least "
                                   f"{max(batch_sizes)} windows of {MIN_WINDOW}+ tokens)")
    device = next(model.parameters()).device
    histograms: dict[str, dict[int, AbsHistogram]] = {}
    work = [(b, rows) for b in batch_sizes for rows in spread_batches(len(seqs), b)]
    reader = _SparseRunReader(model, {k: lp.sparsity for k, lp in plan.linears.items()})
    compiled = torch.compile(model, backend=reader, dynamic=False)
    with torch.no_grad(), recompile_limits(1024, 4096):
        for b, rows in tqdm(work, desc="teal: shared thresholds (sparse run)", disable=not progress):
            reader.histograms = {}
            compiled(input_ids=seqs[rows].to(device), use_cache=False)
            for k, h in reader.histograms.items():
                per_b = histograms.setdefault(k, {})
                per_b[b] = per_b[b].merge(h) if b in per_b else h
    missing = sorted(set(plan.linears) - set(histograms))
    if missing:
        raise PlanError(f"the plan's linears {missing[:3]} were not found in {type(model).__name__}'s graph: "
                        "a plan from another model?")
    group = tp_group(model)
    if group is not None:  # a row-sharded input's means are of this rank's slice: every rank reads the sums
        for per_b in histograms.values():
            reduce_histograms(per_b, group)
    return histograms


def split_windows(seqs: torch.Tensor, rows: int) -> torch.Tensor:
    """``seqs`` [n, L] cut into shorter windows (no shorter than ``MIN_WINDOW``) until there are ``rows`` of them, so
    that batches of up to rows / 2 take their rows from different windows (a GPU calibrates on 10 x 2048 tokens)."""
    n, length = seqs.shape
    pieces = min(-(-rows // n), max(1, length // MIN_WINDOW))
    if pieces <= 1:
        return seqs
    cut = length // pieces
    return seqs[:, : cut * pieces].reshape(n * pieces, cut)


def spread_batches(n: int, batch: int) -> list[torch.Tensor]:
    """Indices of ``n // batch`` batches of ``batch`` windows out of ``n``, each batch spread over the windows
    (batch j: windows j, j + n / batch, ...), so that its rows come from different places in the data."""
    m = n // batch * batch
    order = torch.arange(m).reshape(batch, -1).t().reshape(-1)
    return [order[i : i + batch] for i in range(0, m, batch)]


def batch_quantile_mask(means: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 where ``means`` is above its own ``sparsity`` quantile: drops exactly round(sparsity * numel) entries (more
    on ties at the quantile)."""
    k = round(sparsity * means.numel())
    if k <= 0:
        return torch.ones_like(means, dtype=torch.bool)
    return means > means.reshape(-1).kthvalue(k).values


class _SparseRunReader:
    """A Dynamo backend: interprets each captured graph with every planned linear's input masked by the batch's mean
    |x| at the linear's sparsity (``batch_quantile_mask``), recording the histogram of those means."""

    def __init__(self, model: nn.Module, sparsities: dict[str, float]) -> None:
        self.name_of = parameter_names(model)
        self.sparsities = sparsities
        self.histograms: dict[str, AbsHistogram] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs):
        gm, discovery = discover_captured(gm, example_inputs, self.name_of)
        keys = {m.node: m.key for m in discovery.matched if m.key in self.sparsities}
        return lambda *args: _MaskedBatchInterpreter(gm, keys, self).run(*args)


class _MaskedBatchInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keys: dict[fx.Node, str], reader: _SparseRunReader) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.keys, self.reader = keys, reader

    def run_node(self, n: fx.Node) -> Any:
        key = self.keys.get(n)
        if key is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        means = x.detach().abs().float().mean(dim=0)  # over the batch's rows, per position and channel
        h = AbsHistogram()
        h.add(means, name=key)
        self.reader.histograms[key] = h
        x = x * batch_quantile_mask(means, self.reader.sparsities[key]).to(x.dtype)  # broadcast over the rows
        return getattr(self, n.op)(n.target, (x, *args[1:]), kwargs)
