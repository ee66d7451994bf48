"""The ``teal`` Dynamo backend: discover the block linears, rewrite them to sparse ops, hand the graph on.

    torch.compile(model, backend="teal")                                   # plan attached by teal_fx.calibrate
    torch.compile(model, backend="teal", options={"plan": "plan.json", "dump": "dump/"})
    torch.compile(model, backend="teal", mode="reduce-overhead")          # CUDA graphs through Inductor

Options: ``plan`` (a Plan or a path), ``dump`` (a folder), ``compiler`` (``inductor`` | ``aot_eager`` | ``eager``),
``group_shared_input`` (default True: q/k/v and gate/up each in one launch), ``fuse_swiglu`` (default True: the
gate/up launch also forms ``silu(gate) * up``), ``fuse_add_rmsnorm`` (default True: in decode graphs the o and down
launches also add the residual and apply the RMSNorm after them), ``decode_attention`` (default True:
the attention of a decode step runs ``teal::decode_attention``, with or without a plan),
``inductor_pdl`` (default True: on Hopper and newer, in graphs compiled without gradients, Inductor's kernels too
launch early and wait before their first access, ``kernels/pdl.py``),
``mode`` (Inductor's modes, since torch.compile takes either ``mode`` or ``options``, not both); any other key is
an Inductor config patch (``{"max_autotune": True}``; on CUDA ``CUDA_INDUCTOR_DEFAULTS`` apply unless overridden).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from teal_fx.passes import PassContext, run_passes
from teal_fx.plan import Plan, PlanLike, as_plan

log = logging.getLogger("teal_fx")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")

# Inductor settings the backend turns on for graphs on CUDA (an option of the same name overrides). combo_kernels: one
# launch for the independent pointwise kernels between two extern calls; in a decode step that is q's RoPE, k's RoPE
# and the K/V cache writes, three launches of ~1.2 us per layer becoming one (NOTES.md v9). Inductor's programmatic
# dependent launch (triton.enable_pdl) is not among them: as it comes, its kernels can read a custom op's outputs
# before they are complete (NOTES.md v12); the backend turns it on only with its kernels waiting before their first
# access (option ``inductor_pdl``, ``_inductor_pdl``).
CUDA_INDUCTOR_DEFAULTS = {"combo_kernels": True}

# how many graphs the backend has rewritten (callers that must not silently run uncompiled check that it moved)
REWRITTEN_GRAPHS = [0]

# weight tensor -> the plan attached to the model that owns it. Dynamo hands the backend the parameters
# themselves as example inputs, which is how a bare torch.compile(model, backend="teal") finds its plan.
_PLAN_BY_WEIGHT: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def attach_plan(model: nn.Module, plan: PlanLike, *, check: bool = True) -> Plan:
    """Attach ``plan`` to ``model`` so that ``torch.compile(model, backend="teal")`` uses it.

    With ``check`` the model's graph is captured and the plan must fit it exactly (same keys, same shapes).
    Compiled graphs bake thresholds in, and Dynamo would serve a model's old graphs to a new
    ``torch.compile(model, backend="teal")`` with the same options; so replacing a plan already attached to this
    model resets torch.compile's caches (everything recompiles on its next call), never leaving old thresholds.
    """
    plan = as_plan(plan)
    previous = getattr(model, "_teal_plan", None)
    if previous is not None and previous is not plan:
        warnings.warn("teal: replacing the plan attached to this model: resetting torch.compile caches", stacklevel=2)
        torch.compiler.reset()
    if check:
        from teal_fx.capture import find_linears

        plan.check_fits(find_linears(model))
    for key in plan.linears:
        try:
            w = model.get_parameter(key)
        except AttributeError as e:
            raise ValueError(f"plan key {key!r} is not a parameter of {type(model).__name__}") from e
        make_column_major_(w)
        _PLAN_BY_WEIGHT[w] = plan
    model._teal_plan = plan
    return plan


def make_column_major_(weight: torch.Tensor) -> bool:
    """Store a CUDA weight [N, K] column-major, in place (one matrix at a time, no second copy kept).

    The sparse GEMV skips one contiguous row of W^T per zero input; prefill keeps using cuBLAS, which reads the
    transposed layout natively. CPU weights are left alone (the CPU path is the dense reference).
    """
    if not weight.is_cuda or weight.dim() != 2 or weight.stride() == (1, weight.shape[0]):
        return False
    with torch.no_grad():
        weight.data = weight.data.t().contiguous().t()
    return True


def detach_plan(model: nn.Module) -> None:
    plan = getattr(model, "_teal_plan", None)
    if plan is None:
        return
    for key in plan.linears:
        try:
            _PLAN_BY_WEIGHT.pop(model.get_parameter(key), None)
        except AttributeError:
            pass
    del model._teal_plan


def plan_for_weights(weights: list[torch.Tensor]) -> Optional[Plan]:
    plans = {id(p): p for w in weights if (p := _PLAN_BY_WEIGHT.get(w)) is not None}
    if len(plans) > 1:
        raise ValueError("the linears of this graph belong to models with different attached plans")
    return next(iter(plans.values()), None)


@dataclass
class TealOptions:
    plan: Optional[Plan] = None
    dump: Optional[Path] = None
    compiler: str = "inductor"
    mode: Optional[str] = None
    group_shared_input: bool = True
    fuse_swiglu: bool = True
    fuse_add_rmsnorm: bool = True
    decode_attention: bool = True
    inductor_pdl: bool = True
    inductor: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Optional[dict], mode: Optional[str]) -> "TealOptions":
        opts = dict(options or {})
        out = cls()
        if "plan" in opts and opts["plan"] is not None:
            out.plan = as_plan(opts.pop("plan"))
        else:
            opts.pop("plan", None)
        if opts.get("dump"):
            out.dump = Path(opts.pop("dump"))
        opts.pop("dump", None)
        out.compiler = opts.pop("compiler", "inductor")
        if out.compiler not in INNER_COMPILERS:
            raise ValueError(f"teal: options['compiler'] must be one of {INNER_COMPILERS}, got {out.compiler!r}")
        out.mode = opts.pop("mode", mode)
        out.group_shared_input = bool(opts.pop("group_shared_input", True))
        out.fuse_swiglu = bool(opts.pop("fuse_swiglu", True))
        out.fuse_add_rmsnorm = bool(opts.pop("fuse_add_rmsnorm", True))
        out.decode_attention = bool(opts.pop("decode_attention", True))
        out.inductor_pdl = bool(opts.pop("inductor_pdl", True))
        if opts and out.compiler != "inductor":
            raise ValueError(f"teal: unknown options {sorted(opts)} (Inductor config patches need compiler='inductor')")
        out.inductor = opts
        return out


def _placeholder_tensors(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, Any]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(phs, example_inputs))


def _plan_resolver(example_inputs: list, opts: TealOptions):
    """Find the plan for a graph: the one in the options, else the one attached to the owner of its weights."""

    def resolve(gm: fx.GraphModule, discovery) -> Optional[Plan]:
        tensors = _placeholder_tensors(gm, example_inputs)
        weights = [tensors.get(m.node.args[1]) for m in discovery.matched]
        weights = [w for w in weights if isinstance(w, torch.Tensor)]
        plan = plan_for_weights(weights) if opts.plan is None else opts.plan
        converted = sum(make_column_major_(w) for w in weights) if plan is not None else 0
        cuda = [w for w in weights if w.is_cuda]
        if plan is not None and cuda:
            from teal_fx.kernels import sparse_gemv

            sparse_gemv.reserve_workspace(cuda[0].device, max(w.shape[0] for w in cuda), max(w.shape[1] for w in cuda))
        if converted:
            log.info("teal: stored %d weights column-major in place; Dynamo recompiles once for the new strides", converted)
        if plan is None:
            warnings.warn(
                "teal: no plan for this model (run teal_fx.calibrate(model, ...) or pass options={'plan': ...}); "
                "compiling dense",
                stacklevel=2,
            )
        return plan

    return resolve


def _inner_compile(gm: fx.GraphModule, example_inputs: list, opts: TealOptions):
    if opts.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(opts.mode)) if opts.mode else {}
        cuda = [t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda]
        if cuda:
            patches.update(CUDA_INDUCTOR_DEFAULTS)
        patches.update(opts.inductor)
        with _inductor_pdl(patches, cuda[0] if cuda and opts.inductor_pdl else None):
            return compile_fx(gm, example_inputs, config_patches=patches)
    if opts.mode == "reduce-overhead" and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        return torch._dynamo.lookup_backend("cudagraphs")(gm, example_inputs)
    if opts.compiler == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


@contextlib.contextmanager
def _inductor_pdl(patches: dict, device: Optional[torch.device]):
    """Inductor's programmatic dependent launch, made safe next to the teal ops: on for ``device`` (a CUDA device
    where the teal kernels use PDL, ``pdl.enabled``) in graphs compiled without gradients (decoding runs under
    ``no_grad``), with every Inductor kernel waiting for the previous kernel
    before its first memory access (``pdl.inductor_kernels_wait_first``); the same wait whenever the caller turns
    ``triton.enable_pdl`` on (an option or Inductor's global config). Edits ``patches`` in place. Inductor's kernels
    then launch during the tail of the kernel before them: ~3% of a decode step (NOTES.md, v14)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from teal_fx.kernels import pdl

    # not where gradients are on: AOT autograd would compile the backward later, outside ``inductor_kernels_wait_first``
    hook = pdl.inductor_supports_wait_first()
    if (hook and device is not None and pdl.enabled(device) and "triton.enable_pdl" not in patches
            and not torch.is_grad_enabled()):
        patches["triton.enable_pdl"] = True
    if not patches.get("triton.enable_pdl", getattr(inductor_config.triton, "enable_pdl", False)):  # theirs, or global
        yield
        return
    if not hook:  # only the caller's own setting gets here without it
        raise ValueError("teal: triton.enable_pdl needs Inductor's PDL codegen hook, which this torch lacks, to make "
                         "its kernels wait before reading the teal ops' outputs")
    marker = pdl.inductor_cache_marker()
    taken = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass) is not None
    with contextlib.ExitStack() as stack:
        if marker is None or taken:  # no room for the marker in the cache keys: no caching of these compiles
            patches["fx_graph_cache"] = False
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        else:
            patches["post_grad_custom_post_pass"] = marker
        stack.enter_context(pdl.inductor_kernels_wait_first())
        yield


def teal_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None, mode: Optional[str] = None):
    """The Dynamo backend registered as ``"teal"``."""
    opts = TealOptions.parse(options, mode)
    ctx = PassContext(plan_resolver=_plan_resolver(example_inputs, opts), dump_dir=opts.dump,
                      group_shared_input=opts.group_shared_input, fuse_swiglu=opts.fuse_swiglu,
                      fuse_add_rmsnorm=opts.fuse_add_rmsnorm, decode_attention=opts.decode_attention)
    gm = run_passes(gm, ctx)
    if ctx.rewritten:
        REWRITTEN_GRAPHS[0] += 1
    summary = ctx.discovery.summary()
    disc = ctx.discovery
    unplaced = [k for k, why in disc.unmatched if "output projection" not in why]
    if disc.problems or (not disc.matched and unplaced):
        warnings.warn(summary, stacklevel=2)
    else:
        log.info(summary)
    return _inner_compile(gm, example_inputs, opts)


def register() -> None:
    """Register ``"teal"`` with Dynamo unless its entry point is about to do so (no duplicate registration)."""
    from torch._dynamo.backends import registry

    fns = getattr(registry, "_COMPILER_FNS", {})
    pending_entry_point = getattr(registry, "_BACKENDS", {}).get("teal") is not None
    if "teal" in fns or pending_entry_point:
        return
    try:
        registry.register_backend(compiler_fn=teal_backend, name="teal")
    except AssertionError:  # registered meanwhile
        pass
