"""The plan: one object that says, for every matched block linear, how sparse its input is made.

It is the single source of truth for thresholds. The backend reads it, calibration writes it, and it is saved as
versioned JSON (no pickle). A calibrated plan also keeps what is needed to re-derive itself at another sparsity
without touching the model again (the |x| histograms and the greedy paths), so ``plan.at(0.4)`` is instant.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from teal_fx.allocate import sparsities_at
from teal_fx.errors import PlanError
from teal_fx.histogram import AbsHistogram

PLAN_FORMAT = "teal-fx-plan"
# 2: the weight format (``weights``, ``lm_head``); version 1 plans load as float weights. 3: ``activations``, which
# changes results, so a teal-fx that would ignore it refuses the plan; versions 1-2 load with activations None
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ACTIVATION_FORMATS = ("int8",)  # kernels/reference.py, ``masked_input``
WEIGHT_FORMATS = ("int8", "int4")  # kernels/quantize.py
BATCH_MASKS = ("per_row", "shared")
BATCH_SIZES = (2, 4, 8, 16)  # a shared mask's thresholds are calibrated for these batch sizes

ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")


def lm_head_format(quantize_lm_head: Union[bool, str, None]) -> Optional[str]:
    """The output head's format from ``calibrate(quantize_lm_head=...)``: True is "int8" (the first format offered),
    a format names itself, False / None keep the head as loaded."""
    if quantize_lm_head is True:
        return "int8"
    if quantize_lm_head is False or quantize_lm_head is None:
        return None
    if quantize_lm_head not in WEIGHT_FORMATS:
        raise ValueError(f"quantize_lm_head must be True, False or one of {WEIGHT_FORMATS}, got {quantize_lm_head!r}")
    return quantize_lm_head


@dataclass(frozen=True)
class LinearPlan:
    """What the plan says about one block linear, keyed by its weight's qualified name."""

    key: str
    block: int
    role: str
    shape: tuple[int, int]  # (out_features, in_features), as the weight is stored in the model
    sparsity: Optional[float]  # None: unknown (a plan made from explicit thresholds)
    threshold: float
    # batch_mask="shared": ((B, threshold on the mean |x| of B rows), ...) for BATCH_SIZES; None otherwise
    batch_thresholds: Optional[tuple[tuple[int, float], ...]] = None

    def threshold_for(self, batch: Optional[int]) -> float:
        """The threshold a shared mask over ``batch`` rows compares the rows' mean |x| with: the calibrated batch
        size nearest in log scale (one row, or no table: ``threshold``)."""
        if not self.batch_thresholds or not batch or batch <= 1:
            return self.threshold
        # the distance in log scale as the ratio max / min (log2 of it, monotonic): one correctly rounded division,
        # so a size exactly as far as another (4 and 9 from 6) ties here and in ``sparsify_shared_by_batch`` alike,
        # and both take the first; differences of log2s round apart (the in-graph fp32 took 9, this took 4)
        return min(self.batch_thresholds, key=lambda bt: max(bt[0], batch) / min(bt[0], batch))[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Plan:
    """Per-linear sparsities and thresholds, plus (after calibration) the data to re-derive them.

    ``prefill_sparse_from`` is the fraction of a prefill's positions from which tokens are sparsified
    (1.0: prefill stays dense; see ``teal::sparse_linear``). ``weights``: the format the block linears' weights are
    stored in when the plan runs (None: as they are; "int8"/"int4": attaching the plan quantizes them, and the
    thresholds were calibrated on the quantized model); ``lm_head``: "int8" or "int4" to quantize the output head too;
    ``activations``: "int8" rounds each sparse linear's masked input to int8 per 32 inputs on the sparsified tokens
    (W8A8 / W4A8: dp4a products in the one-row GEMV; int8/int4 weights only). The threshold applies before the
    rounding, so it does not change calibration.
    """

    linears: dict[str, LinearPlan]
    model: str = ""
    method: str = "manual"
    target_sparsity: Optional[float] = None
    prefill_sparse_from: float = 1.0
    histograms: dict[str, AbsHistogram] = field(default_factory=dict, repr=False)
    # block index -> list of rows; a row maps key -> sparsity along the greedy path (row 0: all dense)
    greedy_paths: dict[int, list[dict[str, float]]] = field(default_factory=dict, repr=False)
    notes: dict = field(default_factory=dict)
    weights: Optional[str] = None
    lm_head: Optional[str] = None
    activations: Optional[str] = None
    # "per_row" (TEAL: each row its own mask) or "shared" (one mask per step for the batch: the channels whose mean |x|
    # over the rows is at or below the batch size's threshold; paper §5.4.4)
    batch_mask: str = "per_row"
    # shared: key -> batch size -> histogram of the mean |x| over that many rows (re-derives batch thresholds), read in
    # a sparse run at the model-level sparsity ``batch_read_at`` (teal_fx/shared_thresholds.py; None: read on the
    # dense model's inputs, as plans before that were)
    batch_histograms: dict[str, dict[int, AbsHistogram]] = field(default_factory=dict, repr=False)
    batch_read_at: Optional[float] = None

    def __post_init__(self) -> None:
        if self.batch_mask not in BATCH_MASKS:
            raise PlanError(f"batch_mask must be one of {BATCH_MASKS}, got {self.batch_mask!r}")
        if self.weights not in (None, *WEIGHT_FORMATS):
            raise PlanError(f"unknown weight format {self.weights!r} (one of {WEIGHT_FORMATS}, or None)")
        if self.lm_head not in (None, *WEIGHT_FORMATS):
            raise PlanError(f"lm_head is one of {WEIGHT_FORMATS} or None (as loaded), got {self.lm_head!r}")
        if self.activations not in (None, *ACTIVATION_FORMATS):
            raise PlanError(f"activations may be {ACTIVATION_FORMATS} or None, got {self.activations!r}")
        if self.activations is not None and self.weights is None:
            raise PlanError(f"activations={self.activations!r} needs quantized weights (weights='int8' or 'int4'): "
                            "the int8-x kernel multiplies integers by integers")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_thresholds(
        cls,
        linears: Iterable["MatchedLinearInfo"],
        thresholds: Union[float, Mapping[str, float]],
        *,
        model: str = "",
        prefill_sparse_from: float = 1.0,
    ) -> "Plan":
        """A plan with explicit thresholds (one for all, or per key), before any calibration exists.

        ``linears`` is what discovery found (``teal_fx.find_linears(model)``); sparsity is unknown (NaN).
        """
        entries = {}
        for m in linears:
            t = thresholds if isinstance(thresholds, (int, float)) else thresholds.get(m.key)
            if t is None:
                raise PlanError(f"no threshold given for {m.key}")
            if not math.isfinite(float(t)) or float(t) < 0:
                raise PlanError(f"threshold for {m.key} must be finite and >= 0, got {t}")
            entries[m.key] = LinearPlan(m.key, m.block, m.role, tuple(m.shape), None, float(t))
        if not entries:
            raise PlanError("no block linears to make a plan for")
        return cls(entries, model=model, method="manual", prefill_sparse_from=prefill_sparse_from)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.linears)

    def __contains__(self, key: str) -> bool:
        return key in self.linears

    def threshold(self, key: str) -> float:
        return self.linears[key].threshold

    @property
    def blocks(self) -> list[int]:
        return sorted({lp.block for lp in self.linears.values()})

    def model_sparsity(self) -> float:
        """Parameter-weighted sparsity over the planned linears (what the target refers to)."""
        if any(lp.sparsity is None for lp in self.linears.values()):
            raise PlanError("this plan has no sparsities (made from explicit thresholds)")
        total = sum(lp.numel for lp in self.linears.values())
        return sum(lp.numel * lp.sparsity for lp in self.linears.values()) / total

    def table(self) -> str:
        """A fixed-width table of the plan, one row per linear, in block order."""
        rows = sorted(self.linears.values(), key=_table_order)
        return format_linear_table(
            [(lp.block, lp.role, lp.key, f"{lp.shape[0]}x{lp.shape[1]}", lp.sparsity, lp.threshold) for lp in rows]
        )

    # ------------------------------------------------------------------ re-derivation
    def at(self, sparsity: float, method: Optional[str] = None) -> "Plan":
        """The plan at another model-level sparsity, from the stored histograms and greedy paths (no model run)."""
        if not self.histograms:
            raise PlanError("this plan has no calibration histograms; re-derive it with teal_fx.calibrate")
        if not 0.0 <= sparsity < 1.0:
            raise PlanError(f"sparsity must be in [0, 1), got {sparsity}")
        if method is None:  # the plan's own allocation (calibration may have kept uniform over greedy)
            method = self.method if self.method in ("greedy", "uniform") else "uniform"
            method = method if self.greedy_paths or method == "uniform" else "uniform"
        if method == "greedy" and not self.greedy_paths:
            raise PlanError("this plan has no greedy paths (it was calibrated with method='uniform')")
        per_key = sparsities_at({k: lp.numel for k, lp in self.linears.items()}, self.greedy_paths, sparsity, method)
        linears = {
            k: replace(lp, sparsity=per_key[k], threshold=self.histograms[k].quantile(per_key[k]),
                       batch_thresholds=self.batch_thresholds_at(k, per_key[k]))
            for k, lp in self.linears.items()
        }
        problem = self.batch_thresholds_problem(sparsity)
        if problem:
            warnings.warn(problem, stacklevel=2)
        return replace(self, linears=linears, method=method, target_sparsity=sparsity)

    def batch_thresholds_at(self, key: str, sparsity: float) -> Optional[tuple[tuple[int, float], ...]]:
        """Each batch size's threshold on the rows' mean |x| that drops ``sparsity`` of a shared mask's inputs (the
        per-linear sparsities come from the per-row allocation)."""
        hists = self.batch_histograms.get(key)
        if self.batch_mask != "shared" or not hists:
            return None
        return tuple((b, hists[b].quantile(sparsity)) for b in sorted(hists))

    def batch_thresholds_problem(self, sparsity: Optional[float] = None) -> Optional[str]:
        """Why this shared plan's batch thresholds (re-derived at ``sparsity``; None: as they are) would not drop
        what the plan says in a sparse run, or None."""
        if self.batch_mask != "shared" or not self.batch_histograms:
            return None
        if self.batch_read_at is None:
            return ("this shared plan's batch thresholds were read on the dense model's inputs (a plan made before "
                    "teal-fx read them in a sparse run): in a sparse run they drop more than planned. Re-read them: "
                    "plan = teal_fx.read_batch_thresholds(model, plan, data)")
        if sparsity is not None and abs(sparsity - self.batch_read_at) > 0.02:
            return (f"this shared plan's batch thresholds were read in a sparse run at {self.batch_read_at:.0%}: at "
                    f"{sparsity:.0%} they drop {'less' if sparsity < self.batch_read_at else 'more'} than planned. "
                    "Re-read them: plan = teal_fx.read_batch_thresholds(model, plan.at(s), data)")
        return None

    # ------------------------------------------------------------------ fitting a model
    def check_fits(self, found: Iterable["MatchedLinearInfo"], *, require_all: bool = True,
                   shards: bool = False) -> None:
        """Raise ``PlanError`` unless every found linear is in the plan with the same shape.

        With ``require_all`` the plan may not name linears the model does not have either (a whole-model check);
        a single compiled graph (after a graph break) only checks its own linears. With ``shards`` (a tensor-parallel
        rank's graph) a found shape may also be the planned one cut into equal parts along one dimension.
        """
        found = list(found)
        missing = [m.key for m in found if m.key not in self.linears]
        wrong = [
            f"{m.key}: model {tuple(m.shape)} vs plan {self.linears[m.key].shape}"
            for m in found
            if m.key in self.linears and not _fits(tuple(m.shape), tuple(self.linears[m.key].shape), shards)
        ]
        extra = sorted(set(self.linears) - {m.key for m in found}) if require_all else []
        if missing or wrong or extra:
            lines = [f"this plan does not fit the model (plan made for {self.model or 'an unnamed model'!r}):"]
            if missing:
                lines.append(f"  {len(missing)} linear(s) of the model are not in the plan, e.g. {missing[:3]}")
            if wrong:
                lines.append(f"  {len(wrong)} linear(s) have other shapes, e.g. {wrong[:3]}")
            if extra:
                lines.append(f"  {len(extra)} linear(s) of the plan are not in the model, e.g. {extra[:3]}")
            raise PlanError("\n".join(lines))

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "prefill_sparse_from": self.prefill_sparse_from,
            "weights": self.weights,
            "lm_head": self.lm_head,
            "activations": self.activations,
            "batch_mask": self.batch_mask,
            "batch_read_at": self.batch_read_at,
            "linears": [
                {**asdict(lp), "shape": list(lp.shape),
                 "batch_thresholds": None if lp.batch_thresholds is None else [list(bt) for bt in lp.batch_thresholds]}
                for lp in self.linears.values()
            ],
            "batch_histograms": {k: {str(b): h.to_json() for b, h in hs.items()}
                                 for k, hs in self.batch_histograms.items()},
            "histograms": {k: h.to_json() for k, h in self.histograms.items()},
            "greedy_paths": {str(b): rows for b, rows in self.greedy_paths.items()},
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError("not a teal-fx plan (missing or wrong 'format' field)")
        if data.get("version") not in READABLE_VERSIONS:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (this teal-fx reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
        try:
            linears = {}
            for e in data["linears"]:
                lp = LinearPlan(
                    key=str(e["key"]),
                    block=int(e["block"]),
                    role=str(e["role"]),
                    shape=(int(e["shape"][0]), int(e["shape"][1])),
                    sparsity=None if e.get("sparsity") is None else float(e["sparsity"]),
                    threshold=float(e["threshold"]),
                    batch_thresholds=None if e.get("batch_thresholds") is None else tuple(
                        (int(b), float(t)) for b, t in e["batch_thresholds"]),
                )
                if lp.batch_thresholds is not None and any(
                        b < 2 or not math.isfinite(t) or t < 0 for b, t in lp.batch_thresholds):
                    raise PlanError(f"bad batch thresholds {lp.batch_thresholds!r} for {lp.key}")
                if lp.role not in ROLES:
                    raise PlanError(f"unknown role {lp.role!r} for {lp.key}")
                if not math.isfinite(lp.threshold) or lp.threshold < 0:
                    raise PlanError(f"bad threshold {lp.threshold!r} for {lp.key}")
                if lp.sparsity is not None:
                    _check_fraction(lp.sparsity, f"sparsity of {lp.key}")
                if min(lp.shape) < 1:
                    raise PlanError(f"bad shape {lp.shape} for {lp.key}")
                if lp.key in linears:
                    raise PlanError(f"the plan names {lp.key} twice")
                linears[lp.key] = lp
            if not linears:
                raise PlanError("the plan has no linears")
            histograms = {k: AbsHistogram.from_json(h) for k, h in data.get("histograms", {}).items()}
            paths = {
                int(b): [{str(k): _check_fraction(float(s), f"greedy path of block {b}") for k, s in row.items()}
                         for row in rows]
                for b, rows in data.get("greedy_paths", {}).items()
            }
            target = data.get("target_sparsity")
            return cls(
                linears,
                model=str(data.get("model", "")),
                method=str(data.get("method", "manual")),
                target_sparsity=None if target is None else _check_fraction(float(target), "target_sparsity"),
                prefill_sparse_from=_check_fraction(float(data.get("prefill_sparse_from", 1.0)), "prefill_sparse_from"),
                histograms=histograms,
                greedy_paths=paths,
                notes=dict(data.get("notes", {})),
                weights=data.get("weights"),
                lm_head=data.get("lm_head"),
                activations=data.get("activations"),
                batch_mask=str(data.get("batch_mask", "per_row")),
                batch_histograms={str(k): {int(b): AbsHistogram.from_json(h) for b, h in hs.items()}
                                  for k, hs in data.get("batch_histograms", {}).items()},
                batch_read_at=None if data.get("batch_read_at") is None else _check_fraction(
                    float(data["batch_read_at"]), "batch_read_at"),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PlanError(f"corrupted plan: {type(e).__name__}: {e}") from e

    def save(self, path: Union[str, Path]) -> Path:
        """Write the plan as JSON, atomically: into a new temporary file of the same folder (never a path someone else
        could have placed, such as a symlink), flushed to disk, then renamed over ``path``. A reader sees the old
        plan or the new one, never half of one; of two writers, the last rename wins whole."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.to_json(), separators=(",", ":")))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from e
        return cls.from_json(data)


def _check_fraction(value: float, what: str) -> float:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise PlanError(f"{what} must be in [0, 1], got {value!r}")
    return value


def _table_order(m: "MatchedLinearInfo") -> tuple[int, int]:
    return m.block, ROLES.index(m.role) if m.role in ROLES else len(ROLES)


def found_table(found: Iterable["MatchedLinearInfo"], plan: Optional[Plan]) -> str:
    """The linears discovery found (block, role, key, shape), in block and role order, with ``plan``'s sparsity and
    threshold where it has them."""
    rows = []
    for m in sorted(found, key=_table_order):
        lp = plan.linears.get(m.key) if plan is not None else None
        rows.append((m.block, m.role, m.key, f"{m.shape[0]}x{m.shape[1]}", lp.sparsity if lp else None,
                     lp.threshold if lp else None))
    return format_linear_table(rows)


def format_linear_table(rows: list[tuple]) -> str:
    """rows of (block, role, key, shape, sparsity, threshold) as a fixed-width table."""
    header = ("block", "role", "key", "shape", "sparsity", "threshold")
    cells = [
        (
            str(b),
            r,
            k,
            s,
            "-" if sp is None or (isinstance(sp, float) and math.isnan(sp)) else f"{sp:.3f}",
            "-" if t is None else f"{t:.4g}",
        )
        for b, r, k, s, sp, t in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda c: "  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(c) for c in cells])


# For type hints only: the fields discovery gives (teal_fx.passes.label_block_linears.MatchedLinear).
class MatchedLinearInfo:  # pragma: no cover - protocol-like documentation class
    key: str
    block: int
    role: str
    shape: tuple[int, int]


PlanLike = Union[Plan, str, Path]


def as_plan(plan: PlanLike) -> Plan:
    """A Plan from a Plan or a path to a plan file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, Path)):
        return Plan.load(plan)
    raise TypeError(f"plan must be a teal_fx.Plan or a path to a plan file, not {type(plan).__name__}")


def _fits(found: tuple, planned: tuple, shards: bool) -> bool:
    """``found`` is ``planned``, or with ``shards`` one equal part of it along one dimension (a TP rank's weight)."""
    if found == planned:
        return True
    if not shards or len(found) != 2 or len(planned) != 2:
        return False
    return any(found[d] == planned[d] and found[1 - d] < planned[1 - d] and planned[1 - d] % found[1 - d] == 0
               for d in (0, 1))
