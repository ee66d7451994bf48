"""The errors teal-fx raises for bad input, in one leaf module every layer can import."""
from __future__ import annotations


class PlanError(ValueError):
    """A plan that cannot be read, or that does not fit the model it is used with."""


class CalibrationDataError(ValueError):
    """Activations or data that calibration cannot use (NaN/inf, nothing recorded, too little text)."""
