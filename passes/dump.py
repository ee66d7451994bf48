"""The graph dump of ``options["dump"]``: per compiled graph the code before and after the passes, the table of
matched linears with their thresholds, a summary, and Graphviz DOT of one block with its roles coloured."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import fx

from teal_fx.passes.context import PassContext
from teal_fx.plan import found_table

_ROLE_COLOURS = {
    "q": "#8ecae6", "k": "#219ebc", "v": "#5fa8d3", "qkv": "#8ecae6", "o": "#023047",
    "gate": "#ffb703", "up": "#fb8500", "gate_up": "#ffb703", "down": "#e76f51",
}


def block_dot(gm: fx.GraphModule, block: int) -> str:
    """Graphviz DOT of the nodes of one block (from its first linear's input to its last linear), roles coloured."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    mine = [n for n in nodes if getattr(n.meta.get("teal"), "block", None) == block]
    if not mine:
        return f'digraph "block_{block}" {{ label="block {block}: nothing matched"; }}\n'
    first = min(pos[a] for n in mine for a in n.all_input_nodes if a.op != "placeholder")
    last = max(pos[n] for n in mine)
    keep = [n for n in nodes[first : last + 1] if n.op not in ("placeholder", "get_attr")]
    keep_set = set(keep)
    lines = [f'digraph "block_{block}" {{', "  rankdir=TB; node [shape=box, fontsize=10, style=filled, fillcolor=white];"]
    for n in keep:
        m = n.meta.get("teal")
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if m is not None:  # a fused or folded op stands for several linears: gate+up, gate+up+down
            roles = "+".join(lab.role for lab in (m, n.meta.get("teal_up"), n.meta.get("teal_down")) if lab is not None)
            label = f"{roles}\\n{n.name}\\n{m.shape[0]}x{m.shape[1]}"
            lines.append(f'  "{n.name}" [label="{label}", fillcolor="{_ROLE_COLOURS.get(m.role, "#dddddd")}", penwidth=2];')
        else:
            lines.append(f'  "{n.name}" [label="{n.name}\\n{target}"];')
    for n in keep:
        for a in n.all_input_nodes:
            if a in keep_set:
                lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def teal_op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many of each ``teal::`` op the graph calls: what the fusing passes made of the rewritten linears."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "teal":
            name = n.target._schema.name.split("::")[-1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def write_dump(folder: Path, before_code: Optional[str], gm: fx.GraphModule, ctx: PassContext) -> Path:
    """Write before.py, after.py, linears.txt, summary.txt and block_<first>.dot for one compiled graph."""
    folder.mkdir(parents=True, exist_ok=True)
    if before_code is not None:
        (folder / "before.py").write_text(before_code)
    (folder / "after.py").write_text(gm.code)
    disc = ctx.discovery
    plan = ctx.plan
    rewritten = {m.key for m in ctx.rewritten}
    (folder / "linears.txt").write_text(found_table(disc.matched if disc else [], plan) + "\n")
    summary = disc.summary() if disc else "no discovery"
    summary += f"\nrewritten to teal::sparse_linear: {len(rewritten)}"
    summary += "" if plan is not None else "\nno plan: compiled dense"
    summary += "\nteal ops in the graph after the passes: " + (", ".join(
        f"{name} x{n}" for name, n in sorted(teal_op_counts(gm).items())) or "none")
    (folder / "summary.txt").write_text(summary + "\n")
    if disc and disc.matched:
        b = min(m.block for m in disc.matched)
        (folder / f"block_{b}.dot").write_text(block_dot(gm, b))
    return folder

