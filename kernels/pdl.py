"""Programmatic dependent launch (PDL, Hopper and newer) for the teal kernels and Inductor's around them.

A kernel launched with PDL may start while the kernel before it finishes: its programs become resident and run up
to ``gdc_wait``, which returns once the previous grid has completed and its writes are visible. A kernel lets the
next one start early with ``gdc_launch_dependents``. Every teal kernel waits before its first read of what the kernel
before it may write (the input, the workspace) and lets dependents launch only after that wait, once its main loop's
loads are issued; so each waits, transitively, for everything before it, and the launch cost and ramp of each overlap
the tail of the one before (NOTES.md, v10). Kernels launched without PDL (cuBLAS, cuDNN) start after the previous one
completes. It follows that when a kernel starts, every kernel two launches back or earlier has completed: the
finishing launch of an op reads the op's own inputs (a residual, a norm weight, a bias; all written before the op's
first kernel passed its wait) before it waits, through L2 (``.cg``), off the critical path (NOTES.md, v16).

Inductor's own PDL (``torch._inductor.config.triton.enable_pdl``) is not used as it comes: its kernels wait only
before reading what the node just before them wrote, not before reading the outputs of an opaque custom op two
launches back, nor the outputs a teal kernel stores after letting dependents launch. With it on, the 32-layer 8B
decode gave tokens that changed between identical calls (NOTES.md, v12). ``inductor_kernels_wait_first`` makes
Inductor's kernels follow the teal protocol instead: each waits before its first memory access, whatever it reads
(the backend's default on sm_90+; NOTES.md, v14: -3% of a decode step at 50%, the same as Inductor's PDL as it comes).

``TEAL_PDL=0`` in the environment turns PDL off for the teal kernels (and for Inductor's, through the backend).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

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


def _wait_before_any_access(self, wait_buffer, *dependencies, consider_reads=False) -> None:
    """Replaces ``TritonKernel._handle_pdl_before_access`` (called before every load, store and bucketize): wait
    whatever the access depends on, so no access precedes the kernel's first ``gdc_wait``."""
    if not self._enable_pdl_codegen():
        return
    if self.inside_reduction and self.range_trees[-1].is_loop:  # as Inductor does: hoisted before the loop
        wait_buffer = self.body
    wait_buffer.writeline(self.GDC_WAIT)


def inductor_supports_wait_first() -> bool:
    """Whether this torch's Inductor has the PDL codegen hook that ``inductor_kernels_wait_first`` replaces."""
    try:
        from torch._inductor.codegen.triton import TritonKernel
    except ImportError:  # pragma: no cover
        return False
    return callable(getattr(TritonKernel, "_handle_pdl_before_access", None)) and hasattr(TritonKernel, "GDC_WAIT")


@contextlib.contextmanager
def inductor_kernels_wait_first() -> Iterator[None]:
    """While Inductor generates code (with ``triton.enable_pdl``), make each of its Triton kernels wait for the
    previous kernel before its first memory access, as the teal kernels do.

    Inductor's kernels still let the next kernel launch after their loads, so every launch boundary overlaps as
    with Inductor's own PDL, and every wait is transitive: a kernel waits for the one before it to complete, which
    could not start a single access before the one before it had completed. What is given up is only the loads
    Inductor would hoist above the wait (those of buffers it believes the previous kernel did not write), which is
    exactly what raced with the teal ops' outputs (NOTES.md, v12, v14)."""
    from torch._inductor.codegen.triton import TritonKernel

    original = TritonKernel.__dict__["_handle_pdl_before_access"]
    TritonKernel._handle_pdl_before_access = _wait_before_any_access
    try:
        yield
    finally:
        TritonKernel._handle_pdl_before_access = original


def inductor_cache_marker():
    """A no-op post-grad pass whose uuid enters Inductor's cache keys, so code generated with
    ``inductor_kernels_wait_first`` and code generated without it (same graph, same config) never stand in for each
    other in the FX graph and AOT autograd caches. None where this torch has no ``CustomGraphPass``."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover
        return None

    class InductorKernelsWaitFirst(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return "teal-fx: Inductor kernels wait for the previous kernel before their first access (v1)"

    return InductorKernelsWaitFirst()
