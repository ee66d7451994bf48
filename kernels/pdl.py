"""Programmatic dependent launch (PDL, Hopper and newer) for the teal kernels.

A kernel launched with PDL may start while the kernel before it finishes: its programs become resident and run up
to ``gdc_wait``, which returns once the previous grid has completed and its writes are visible. A kernel lets the
next one start early with ``gdc_launch_dependents``. The teal kernels follow the protocol of Inductor's own PDL code
(``torch._inductor.config.triton.enable_pdl``): wait before the first read of anything an earlier kernel wrote (the
input, the workspace), let dependents launch once the main loop's loads are issued. The launch cost and ramp of each
kernel then overlap the tail of the one before (NOTES.md, v10). Kernels that do not take part (cuBLAS) wait as usual.

``TEAL_PDL=0`` in the environment turns it off for the teal kernels; the backend then also leaves Inductor's off.
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


def inductor_patch(device: torch.device) -> dict:
    """The Inductor config patch that makes Inductor's kernels take part (empty where this torch lacks the option or
    PDL is off), so that a teal kernel and the Inductor kernels around it overlap in both directions."""
    from torch._inductor import config

    if not enabled(device) or not hasattr(config.triton, "enable_pdl"):
        return {}
    return {"triton.enable_pdl": True}
