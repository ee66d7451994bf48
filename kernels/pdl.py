"""Programmatic dependent launch (PDL, Hopper and newer) for the teal kernels.

A kernel launched with PDL may start while the kernel before it finishes: its programs become resident and run up
to ``gdc_wait``, which returns once the previous grid has completed and its writes are visible. A kernel lets the
next one start early with ``gdc_launch_dependents``. Every teal kernel waits before its first read of anything (the
input, the workspace) and lets dependents launch only after that wait, once its main loop's loads are issued; so
each waits, transitively, for everything before it, and the launch cost and ramp of each overlap the tail of the one
before (NOTES.md, v10). Kernels launched without PDL (Inductor's, cuBLAS) start after the previous one completes.

Inductor's own PDL (``torch._inductor.config.triton.enable_pdl``) is not turned on: its kernels wait only before
reading what the node just before them wrote, not before reading the outputs of an opaque custom op two launches
back, nor the outputs a teal kernel stores after letting dependents launch. With it on, the 32-layer 8B decode gave
tokens that changed between identical calls (NOTES.md, v12).

``TEAL_PDL=0`` in the environment turns it off for the teal kernels.
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
