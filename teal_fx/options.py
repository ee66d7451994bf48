"""The backend's options: the one list of what ``torch.compile(model, backend="teal", options={...})`` takes.

Parsed once per compiled graph in the backend (``TealOptions.parse``), then read by the pass manager (which passes
run) and by the inner compile (Inductor's settings). README's option table describes the same fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from teal_fx.plan import Plan, as_plan

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class TealOptions:
    plan: Optional[Plan] = None  # a plan, or a path to one; None: the plan attached to the model (teal_fx.state)
    plan_path: Optional[Path] = None  # where ``plan`` was read from, if a path was given: read again when it changes
    dump: Optional[Path] = None  # per compiled graph: before.py, after.py, linears.txt, summary.txt, block_<n>.dot
    compiler: str = "inductor"  # the inner compiler: one of INNER_COMPILERS
    mode: Optional[str] = None  # Inductor's mode ("reduce-overhead": CUDA graphs)
    group_shared_input: bool = True  # q/k/v and gate/up each in one launch (passes/group_shared_input.py)
    fuse_swiglu: bool = True  # the gate/up launch forms silu(gate) * up (passes/fuse_swiglu.py)
    fuse_add_rmsnorm: bool = True  # o and down launches add the residual and apply the RMSNorm (passes/fuse_add_rmsnorm.py)
    # the down launch forms silu(gate) * up itself, one launch a layer fewer (passes/fold_swiglu_into_down.py);
    # docs/perf-log.md v49: int4 + 50% decode +5.8%, int8 +1.5%, bf16 +0.6% (H100)
    fold_swiglu: bool = True
    fold_rope: bool = True  # RoPE + static-cache writes in the q/k/v launch's finish (passes/fold_rope_into_qkv_finish.py)
    decode_attention: bool = True  # decode-step sdpa -> teal::decode_attention (passes/replace_decode_attention.py)
    # the attention forms q and the new k/v row itself, one launch a layer fewer
    # (passes/fold_qkv_finish_into_attention.py); docs/perf-log.md v52: int4 + 50% decode +0.6 / +0.7%, int8 +0.5 /
    # +0.8% (two A/Bs, H100)
    fold_qkv_attention: bool = True
    # o's launch merges the attention's cache splits, whose launch then ends as soon as its splits are done
    # (passes/fold_attention_merge_into_o.py); docs/perf-log.md v56: int4 + 50% decode +3.7%, int8 +2.4% (H100)
    fold_attention_merge: bool = True
    outer_product_multiply: bool = True  # a matmul over a dimension of 1 -> a multiply (passes/replace_outer_product_matmul.py)
    inductor_pdl: bool = True  # on Hopper+, Inductor's kernels launch early and wait first (teal_fx/inductor.py)
    inductor: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # any other key: Inductor config

    @classmethod
    def parse(cls, options: Optional[Mapping[str, Any]], mode: Optional[str] = None) -> "TealOptions":
        """From ``torch.compile``'s ``options`` (and ``mode``: torch.compile takes one or the other, not both)."""
        opts = dict(options or {})
        plan = opts.pop("plan", None)
        dump = opts.pop("dump", None)
        compiler = opts.pop("compiler", "inductor")
        if compiler not in INNER_COMPILERS:
            raise ValueError(f"teal: options['compiler'] must be one of {INNER_COMPILERS}, got {compiler!r}")
        flags = {f.name: bool(opts.pop(f.name, f.default)) for f in fields(cls) if isinstance(f.default, bool)}
        mode = opts.pop("mode", mode)
        if opts and compiler != "inductor":
            raise ValueError(f"teal: unknown options {sorted(opts)} (Inductor config patches need compiler='inductor')")
        plan_path = Path(plan) if isinstance(plan, (str, Path)) else None
        return cls(plan=None if plan is None else as_plan(plan), plan_path=plan_path, dump=Path(dump) if dump else None,
                   compiler=compiler,
                   mode=mode, inductor=MappingProxyType(opts), **flags)
