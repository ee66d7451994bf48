"""Sparsity allocation across the linears of a block: uniform, or TEAL's greedy search (§4.3).

Greedy, per block: start with every linear dense; at each step try raising each linear's sparsity by a step
inversely proportional to its weight size (so every candidate removes the same number of weight reads), but by at
most ``max_step``; keep the candidate whose block output moves least per weight read removed (L2 against the dense
block output, on the later positions of each calibration sequence, as TEAL), and record the row.

The cap: a small linear's proportional step is huge (GQA's k and v are 1/7 of q in Llama-3 and Qwen2, so with TEAL's
rule one step took them from dense to 80-99% sparse, and o and q by 0.27 on SmolLM2), so the path never visited the
points between and a target in between was a linear interpolation of two allocations far apart. With capped steps
candidates remove different numbers of weight reads, hence the comparison per weight removed.

The rows form the block's path; a model-level target picks, in every block, the point of the path whose
parameter-weighted sparsity equals it.
"""
from __future__ import annotations

from typing import Callable, Optional

from teal_fx.errors import PlanError

Row = dict[str, float]


def block_sparsity(row: Row, numel: dict[str, int]) -> float:
    return sum(numel[k] * s for k, s in row.items()) / sum(numel[k] for k in row)


def greedy_path(
    evaluate: Callable[[Row], float],
    numel: dict[str, int],
    *,
    step: float = 0.01,
    max_sparsity: float = 0.9,
    cap: float = 0.99,
    max_step: Optional[float] = None,
    accept: Optional[Callable[[Row], None]] = None,
) -> list[Row]:
    """The greedy path of one block.

    ``evaluate(row)`` is the block's output error with the linears at the sparsities of ``row``; ``step`` is the
    block-level (parameter-weighted) sparsity a step of the largest linear adds; no linear moves by more than
    ``max_step`` (default 4 x step) in one step; ``cap`` bounds any linear. ``accept(row)`` is told each row the
    path moves to (an evaluator that runs candidates from the current row: teal_fx/block_error.py).
    """
    if not 0 < step < 1:
        raise ValueError(f"step must be in (0, 1), got {step}")
    max_step = 4 * step if max_step is None else max_step
    total = sum(numel.values())
    inc = {k: min(max_step, step * total / n) for k, n in numel.items()}
    row = {k: 0.0 for k in numel}
    path = [dict(row)]
    err_now = evaluate(row)
    while block_sparsity(row, numel) < max_sparsity - 1e-9:
        best, best_err, best_cost = None, float("inf"), float("inf")
        for k in numel:
            if row[k] >= cap:
                continue
            cand = dict(row)
            cand[k] = min(cap, row[k] + inc[k])
            err = evaluate(cand)
            cost = (err - err_now) / ((cand[k] - row[k]) * numel[k])  # error added per weight read removed
            if cost < best_cost:
                best, best_err, best_cost = cand, err, cost
        if best is None:
            break
        row, err_now = best, best_err
        path.append(dict(row))
        if accept is not None:
            accept(row)
    return path


def row_at(path: list[Row], numel: dict[str, int], target: float) -> Row:
    """The point of a path at block sparsity ``target`` (linear interpolation between its two nearest rows)."""
    levels = [block_sparsity(r, numel) for r in path]
    if target > levels[-1] + 1e-9:
        raise PlanError(
            f"the greedy path stops at sparsity {levels[-1]:.3f}; re-calibrate with max_sparsity >= {target}"
        )
    for (a, la), (b, lb) in zip(zip(path, levels), zip(path[1:], levels[1:])):
        if la - 1e-12 <= target <= lb + 1e-12:
            w = 0.0 if lb == la else (target - la) / (lb - la)
            return {k: a[k] + w * (b[k] - a[k]) for k in a}
    return dict(path[0])


def sparsities_at(numel: dict[str, int], greedy_paths: dict[int, list[Row]], target: float,
                  method: str) -> dict[str, float]:
    """Per-key sparsity at a model-level target for the linears of ``numel`` (key -> weight size), from the greedy
    paths of their blocks (or uniform)."""
    if method == "uniform":
        return {k: target for k in numel}
    if method != "greedy":
        raise ValueError(f"method must be 'greedy' or 'uniform', got {method!r}")
    out: dict[str, float] = {}
    for path in greedy_paths.values():
        out.update(row_at(path, {k: numel[k] for k in path[0]}, target))
    missing = set(numel) - set(out)
    if missing:
        raise PlanError(f"no greedy path for {sorted(missing)[:3]}")
    return out
