"""Programmatic dependent launch (PDL, Hopper and newer) for the teal kernels.

A kernel launched with PDL may start while the kernel before it finishes: its programs become resident and run up
to ``gdc_wait``, which returns once the previous grid has completed and its writes are visible. A kernel lets the
next one start early with ``gdc_launch_dependents``. Every teal kernel waits before its first read of what the kernel
before it may write (the input, the workspace) and lets dependents launch only after that wait, once its main loop's
loads are issued; so each waits, transitively, for everything before it, and the launch cost and ramp of each overlap
the tail of the one before. Kernels launched without PDL (cuBLAS, cuDNN) start after the previous one completes. It
follows that when a kernel starts, every kernel two launches back or earlier has completed: the finishing launch of
an op reads the op's own inputs (a residual, a norm weight, a bias; all written before the op's first kernel passed
its wait) before it waits, through L2 (``.cg``), off the critical path (docs/design.md, "Launch boundaries").

Inductor's kernels around the teal ops follow the same protocol through the backend (``teal_fx/inductor.py``).
``TEAL_PDL=0`` in the environment turns PDL off for the teal kernels (and for Inductor's, through the backend).
"""
from __future__ import annotations

import os

import torch

_CAPABLE: dict = {}


def enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL: a CUDA device of compute capability 9 or more, not the CPU
    interpreter, and ``TEAL_PDL`` not "0"."""
    if device.type != "cuda" or os.environ.get("TEAL_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]
