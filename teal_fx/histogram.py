"""A bounded-memory distribution of |x| from which any quantile can be read.

Bins are uniform in log2(|x|) (64 per octave, 2^-24 .. 2^16), so the relative width of a bin is 1.1% at every
scale: the error of a quantile read from it is below the 1-percentage-point target of the realised sparsity for
any unimodal activation distribution, whatever its scale, and the memory is a few KiB per linear regardless of
how many tokens are seen. Exact zeros (and |x| < 2^-24) go to an underflow bin.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from teal_fx.errors import CalibrationDataError

LOG2_LO = -24.0
LOG2_HI = 16.0
BINS_PER_OCTAVE = 64
NUM_BINS = int((LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE)


class AbsHistogram:
    """Counts of |x| in log-spaced bins; ``quantile(p)`` gives the threshold that zeroes a fraction p."""

    def __init__(self, counts: Tensor | None = None, underflow: float = 0.0, overflow: float = 0.0) -> None:
        self.counts = torch.zeros(NUM_BINS, dtype=torch.float64) if counts is None else counts.double().cpu()
        self.underflow = float(underflow)
        self.overflow = float(overflow)

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self.underflow + self.overflow

    def add(self, x: Tensor, name: str = "activation") -> None:
        """Record the magnitudes of every element of ``x`` (any shape, dtype, device)."""
        a = x.detach().abs().float().reshape(-1)
        if a.numel() == 0:
            return
        if not bool(torch.isfinite(a).all()):
            raise CalibrationDataError(f"non-finite values (NaN or inf) in the input of {name} during calibration")
        lg = torch.log2(a)
        counts = torch.histc(lg, bins=NUM_BINS, min=LOG2_LO, max=LOG2_HI)
        self.counts += counts.double().cpu()
        self.underflow += float((lg < LOG2_LO).sum())
        self.overflow += float((lg > LOG2_HI).sum())

    def quantile(self, p: float) -> float:
        """The value t with a fraction ``p`` of recorded |x| at or below it (log-linear inside a bin)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"quantile level must be in [0, 1], got {p}")
        total = self.total
        if total == 0:
            raise CalibrationDataError("quantile of an empty histogram: no activations were recorded")
        target = p * total
        if target <= self.underflow:
            return 0.0
        cum = torch.cumsum(self.counts, 0) + self.underflow
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
        if i >= NUM_BINS:
            return 2.0**LOG2_HI
        before = float(cum[i - 1]) if i > 0 else self.underflow
        in_bin = float(self.counts[i])
        frac = 0.0 if in_bin == 0 else min(1.0, max(0.0, (target - before) / in_bin))
        return 2.0 ** (LOG2_LO + (i + frac) / BINS_PER_OCTAVE)

    def fraction_at_or_below(self, t: float) -> float:
        """The inverse of ``quantile``: the recorded fraction with |x| <= t."""
        total = self.total
        if t <= 0:
            return self.underflow / total
        pos = (math.log2(t) - LOG2_LO) * BINS_PER_OCTAVE
        i = min(NUM_BINS, max(0, int(pos)))
        below = self.underflow + float(self.counts[:i].sum())
        if i < NUM_BINS:
            below += float(self.counts[i]) * (pos - i)
        else:
            below += self.overflow * 0.0
        return below / total

    def merge(self, other: "AbsHistogram") -> "AbsHistogram":
        return AbsHistogram(self.counts + other.counts, self.underflow + other.underflow, self.overflow + other.overflow)

    def to_json(self) -> dict:
        nz = torch.nonzero(self.counts).flatten()
        lo = int(nz[0]) if len(nz) else 0
        hi = int(nz[-1]) + 1 if len(nz) else 0
        return {
            "log2_lo": LOG2_LO,
            "log2_hi": LOG2_HI,
            "bins_per_octave": BINS_PER_OCTAVE,
            "underflow": self.underflow,
            "overflow": self.overflow,
            "offset": lo,
            "counts": [int(c) if float(c).is_integer() else float(c) for c in self.counts[lo:hi].tolist()],
        }

    @classmethod
    def from_json(cls, d: dict) -> "AbsHistogram":
        if (d["log2_lo"], d["log2_hi"], d["bins_per_octave"]) != (LOG2_LO, LOG2_HI, BINS_PER_OCTAVE):
            raise ValueError("histogram was written with another binning")
        counts = torch.zeros(NUM_BINS, dtype=torch.float64)
        vals = torch.tensor(d["counts"], dtype=torch.float64)
        off = int(d["offset"])
        under, over = float(d["underflow"]), float(d["overflow"])
        if off < 0 or off + len(vals) > NUM_BINS or not bool(torch.isfinite(vals).all()) or bool((vals < 0).any()):
            raise ValueError("histogram counts out of range (negative, NaN or past the bins)")
        if not (math.isfinite(under) and math.isfinite(over) and under >= 0 and over >= 0):
            raise ValueError("histogram underflow/overflow counts must be finite and >= 0")
        counts[off : off + len(vals)] = vals
        return cls(counts, under, over)
