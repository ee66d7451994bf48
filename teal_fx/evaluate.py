"""Perplexity through the compiled sparse path, on sliding windows.

Each window of ``window`` tokens advances by half a window and scores its later half (every scored token sees at
least half a window of context). Two protocols:

* ``"all"`` (default): every token of the window is sparsified, which is exactly what token-by-token decoding
  sees (TEAL's mask is per token, so a sparse prefill equals sparse decoding step by step);
* ``"teal"``: TEAL's protocol, only the later half of each window (the scored tokens) is sparsified.

Both are the ``prefill_sparse_from`` of the plan (0.0 and 0.5) given to the ``teal`` backend, so perplexity is
measured through the same rewritten graph and op that decoding uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from teal_fx.calibrate import read_text
from teal_fx.capture import recompile_limits
from teal_fx.errors import CalibrationDataError
from teal_fx.plan import PlanLike, as_plan
from teal_fx.state import store_column_major

PROTOCOLS = {"all": 0.0, "teal": 0.5}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    window: int
    protocol: str  # "dense", "all" or "teal"
    sparsity: Optional[float]
    method: Optional[str]

    def __str__(self) -> str:
        what = "dense" if self.sparsity is None else f"{self.method} {self.sparsity:.0%}, protocol={self.protocol}"
        return f"perplexity {self.perplexity:.3f} ({what}; {self.tokens} tokens, {self.windows} windows of {self.window})"


def evaluate_perplexity(
    model: nn.Module,
    text: Union[str, Path, torch.Tensor],
    plan: Optional[PlanLike] = None,
    *,
    tokenizer: Any = None,
    protocol: str = "all",
    window: Optional[int] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    compiler: str = "eager",
    progress: bool = True,
    spread: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, a file, or token ids) with ``plan`` (None: dense).

    ``spread``: each batch of ``batch_size`` windows takes windows from different places in the text (j, j + n/B,
    ...) instead of consecutive ones, as a server's batch holds unrelated sequences; it matters only where the rows of
    a batch interact, as under a shared batch mask."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    device = next(model.parameters()).device
    window = window or (2048 if device.type == "cuda" else 512)
    if window % 2:
        raise ValueError("window must be even")
    ids = _token_ids(text, tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    half = window // 2
    starts = list(range(0, ids.numel() - window + 1, half))
    if not starts:
        raise CalibrationDataError(f"text too short for one window of {window} tokens ({ids.numel()} tokens)")
    windows = torch.stack([ids[s : s + window] for s in starts])
    if spread:
        m = -(-len(windows) // batch_size)  # batches; batch j holds windows j, j + m, j + 2m, ...
        windows = windows[[j + r * m for j in range(m) for r in range(batch_size) if j + r * m < len(windows)]]

    if plan is not None:
        plan = replace(as_plan(plan), prefill_sparse_from=PROTOCOLS[protocol])
        store_column_major(model, plan)  # the GEMV's layout, before compiling (the backend never moves weights)
        run = torch.compile(model, backend="teal", options={"plan": plan, "compiler": compiler}, dynamic=False)
    else:
        run = model
    calls_before = counters["teal"]["sparse_graph_calls"]
    nll, count = 0.0, 0
    # every evaluation compiles the model anew (new options): keep Dynamo's recompile limit from silently
    # running it uncompiled, i.e. dense
    with torch.no_grad(), recompile_limits(4096, 65536):
        for i in tqdm(range(0, len(windows), batch_size), desc="teal: perplexity", disable=not progress):
            batch = windows[i : i + batch_size].to(device)
            logits = run(input_ids=batch, use_cache=False, logits_to_keep=half + 1).logits[:, :-1]
            targets = batch[:, half:]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            nll += float(loss)
            count += targets.numel()
    if plan is not None and counters["teal"]["sparse_graph_calls"] == calls_before:
        raise RuntimeError("the model was not compiled through the teal backend (Dynamo fell back to eager?): "
                           "refusing to report a dense perplexity as a sparse one")
    mean = nll / count
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=len(windows),
        window=window,
        protocol="dense" if plan is None else protocol,
        sparsity=None if plan is None else plan.target_sparsity,
        method=None if plan is None else plan.method,
    )


def _token_ids(text, tokenizer) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    text = read_text(text)
    if text is None or not text.strip():
        raise CalibrationDataError("evaluation text is empty")
    if tokenizer is None:
        raise ValueError("evaluating on text needs a tokenizer")
    return tokenizer(text, return_tensors="pt").input_ids[0]
