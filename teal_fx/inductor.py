"""The backend's Inductor settings: what it turns on for decode graphs, and Inductor's PDL made safe next to the
teal ops.

Inductor's programmatic dependent launch (``triton.enable_pdl``) as it comes is not used: its kernels wait only before
reading what the node just before them wrote, not before reading the outputs of an opaque custom op two launches
back, nor the outputs a teal kernel stores after letting dependents launch. With it on, the 32-layer 8B decode gave
tokens that changed between identical calls. ``inductor_kernels_wait_first`` makes Inductor's kernels follow the teal
protocol (``kernels/pdl.py``) instead: each waits before its first memory access, whatever it reads (the backend's
default on sm_90+: -3% of a decode step at 50%, the same as Inductor's PDL as it comes; docs/design.md, "Launch
boundaries").
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import fx

from teal_fx.kernels import pdl
from teal_fx.kernels.ops import registered_ops
from teal_fx.options import TealOptions

# Inductor settings the backend turns on for graphs on CUDA (an option of the same name overrides). combo_kernels: one
# launch for the independent pointwise kernels between two extern calls; in a decode step that is q's RoPE, k's RoPE
# and the K/V cache writes, three launches of ~1.2 us per layer becoming one (docs/design.md, "Launch boundaries").
CUDA_INDUCTOR_DEFAULTS = {"combo_kernels": True}


def compile_graph(gm: fx.GraphModule, example_inputs: list, opts: TealOptions) -> Callable:
    """Hand the rewritten graph to the inner compiler of ``opts``."""
    if opts.compiler == "inductor":
        # Inductor is imported on first use, as torch.compile does: importing it costs seconds
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(opts.mode)) if opts.mode else {}
        cuda = [t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda]
        if cuda:
            patches.update(CUDA_INDUCTOR_DEFAULTS)
        patches.update(opts.inductor)
        register_fallbacks()
        with inductor_pdl(patches, cuda[0] if cuda and opts.inductor_pdl else None):
            return compile_fx(gm, example_inputs, config_patches=patches)
    if opts.mode == "reduce-overhead" and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        return torch._dynamo.lookup_backend("cudagraphs")(gm, example_inputs)
    if opts.compiler == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


def register_fallbacks() -> None:
    """Give every ``teal::`` op Inductor's fallback lowering before Inductor lowers a graph, with the layout constraint
    its implicit fallback would choose (the op's tag, else ``custom_op_default_layout_constraint``).

    Why: Inductor creates an implicit fallback when it first lowers a call of an op it has no lowering for, and before
    torch 2.13 (pytorch PR 185951) it formats that call's IR arguments for an INFO log even with the log off. An IR
    node's text holds its inputs' texts, and each layer's op takes two outputs of the op before it, so for an op first
    met deep in a decode graph the text doubles with every layer: with an int8 lm_head, whose ``quantized_linear``
    first appears at the end of the decode graph when the prefill graph comes from Inductor's cache, compiling the
    32-layer step hung (torch 2.11 on an H100; on the CPU with the log on, 8 layers; docs/perf-log.md v63).
    Registered here, no teal op takes that path."""
    try:
        from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # pragma: no cover - a torch without them keeps the implicit path
        return
    for op in registered_ops():
        if op not in lowerings:
            make_fallback(op, layout_constraint=tag_to_layout_constraint(get_layout_constraint_tag(op)), warn=False)


@contextlib.contextmanager
def inductor_pdl(patches: dict, device: Optional[torch.device]) -> Iterator[None]:
    """Inductor's programmatic dependent launch, made safe next to the teal ops: on for ``device`` (a CUDA device
    where the teal kernels use PDL, ``pdl.enabled``) in graphs compiled without gradients (decoding runs under
    ``no_grad``), with every Inductor kernel waiting for the previous kernel
    before its first memory access (``inductor_kernels_wait_first``); the same wait whenever the caller turns
    ``triton.enable_pdl`` on (an option or Inductor's global config). Edits ``patches`` in place. Inductor's kernels
    then launch during the tail of the kernel before them: ~3% of a decode step (docs/design.md, "Launch boundaries")."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # not where gradients are on: AOT autograd would compile the backward later, outside ``inductor_kernels_wait_first``
    hook = inductor_supports_wait_first()
    if (hook and device is not None and pdl.enabled(device) and "triton.enable_pdl" not in patches
            and not torch.is_grad_enabled()):
        patches["triton.enable_pdl"] = True
    if not patches.get("triton.enable_pdl", getattr(inductor_config.triton, "enable_pdl", False)):  # theirs, or global
        yield
        return
    if not hook:  # only the caller's own setting gets here without it
        raise ValueError("teal: triton.enable_pdl needs Inductor's PDL codegen hook, which this torch lacks, to make "
                         "its kernels wait before reading the teal ops' outputs")
    marker = inductor_cache_marker()
    taken = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass) is not None
    with contextlib.ExitStack() as stack:
        if marker is None or taken:  # no room for the marker in the cache keys: no caching of these compiles
            patches["fx_graph_cache"] = False
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        else:
            patches["post_grad_custom_post_pass"] = marker
        stack.enter_context(inductor_kernels_wait_first())
        yield



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
    exactly what raced with the teal ops' outputs (docs/design.md, "Launch boundaries")."""
    from torch._inductor.codegen.triton import TritonKernel

    original = TritonKernel.__dict__["_handle_pdl_before_access"]
    TritonKernel._handle_pdl_before_access = _wait_before_any_access
    try:
        yield
    finally:
        TritonKernel._handle_pdl_before_access = original


def inductor_cache_marker() -> Optional[object]:
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
