"""A picture of a plan's allocation: blocks x roles, coloured by sparsity (as in TEAL's figure)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from teal_fx.plan import ROLES, Plan, PlanError


def plot_allocation(plan: Plan, out: Union[str, Path]) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'teal-fx[plot]'") from e
    if any(lp.sparsity is None for lp in plan.linears.values()):
        raise PlanError("this plan has no sparsities to plot (made from explicit thresholds)")
    roles = [r for r in ROLES if any(lp.role == r for lp in plan.linears.values())]
    blocks = plan.blocks
    grid = [[float("nan")] * len(blocks) for _ in roles]
    for lp in plan.linears.values():
        grid[roles.index(lp.role)][blocks.index(lp.block)] = lp.sparsity
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(blocks) + 2), 0.45 * len(roles) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(roles)), roles)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_xlabel("block")
    title = f"{plan.method} allocation"
    if plan.target_sparsity is not None:
        title += f" at {plan.target_sparsity:.0%} model-level sparsity"
    ax.set_title(f"{title}\n{plan.model}", fontsize=9)
    fig.colorbar(im, ax=ax, label="sparsity")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
