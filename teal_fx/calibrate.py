"""Graph-level calibration: record |x| entering every matched linear, then allocate sparsity.

The model is run under Dynamo with a backend whose "compiled" function is an FX interpreter over the captured
graph, the very graph the ``teal`` backend will rewrite, so keys and roles match by construction. The
interpreter adds each matched linear's input to a log-binned histogram (bounded memory, any quantile), and keeps
the values that each block subgraph reads for the first ``greedy_sequences`` sequences (the greedy allocator's
cached block inputs).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from teal_fx.allocate import greedy_path
from teal_fx.block_error import BlockError
from teal_fx.capture import discover_captured, find_linears, recompile_limits
from teal_fx.choose_allocation import choose_allocation
from teal_fx.errors import CalibrationDataError
from teal_fx.extract_blocks import BlockSubgraph, extract_blocks
from teal_fx.histogram import AbsHistogram
from teal_fx.kernels.reference import sparsify
from teal_fx.models import model_name
from teal_fx.passes.analysis.discovery import Discovery, parameter_names
from teal_fx.plan import ACTIVATION_FORMATS, BATCH_MASKS, WEIGHT_FORMATS, LinearPlan, Plan, lm_head_format
from teal_fx.shared_thresholds import read_batch_histograms, spread_batches, with_batch_histograms
from teal_fx.state import attach_plan
from teal_fx.tensor_parallel import reduce_histograms, tp_group, whole_shape
from teal_fx.weights import apply_weight_format

log = logging.getLogger("teal_fx")

NEUTRAL_PROMPTS = (
    "The",
    "In 1850,",
    "A recent study of",
    "The following is an article about",
    "Once upon a time,",
    "Here is a list of",
    "Chapter 1\n\n",
    "According to the report,",
)

Data = Union[None, str, Path, Sequence[str], torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class CalibrationDefaults:
    """TEAL's 10 x 2048 tokens on a GPU; on a CPU, shorter sequences (96 x 256: fewer left some o_proj thresholds
    more than a point off on held-out text; docs/design.md, "Calibration and allocation"), a coarser greedy step and
    one cached sequence for the greedy search, so that a small model calibrates in a few minutes. Data-free
    calibration generates its text with the model, so it defaults to fewer sequences."""

    num_sequences: int
    seq_len: int
    greedy_sequences: int
    step: float
    self_generated_sequences: int


def defaults_for(device: torch.device) -> CalibrationDefaults:
    if device.type == "cuda":
        return CalibrationDefaults(num_sequences=10, seq_len=2048, greedy_sequences=4, step=0.01,
                                   self_generated_sequences=10)
    return CalibrationDefaults(num_sequences=96, seq_len=256, greedy_sequences=1, step=0.025,
                               self_generated_sequences=16)


# ------------------------------------------------------------------------------------------------ data
def self_generated_tokens(model: nn.Module, tokenizer: Any, num_sequences: int, seq_len: int, seed: int = 0,
                         max_batch: int = 16, progress: bool = True) -> torch.Tensor:
    """Data-free calibration: text the model samples from short neutral prompts, as token ids [N, seq_len].

    The sequences are sampled together, in batches of at most ``max_batch`` (prompts left-padded under an attention
    mask): small-batch decoding reads the weights once a step whatever the batch, so N sequences take about the time
    of one (the quickstart's 9 x 128 tokens on a 2-core CPU: 21 s, one at a time 88 s; docs/design.md, "Calibration
    and allocation"). Sampling runs under ``torch.random.fork_rng``: the caller's random state is left as it was,
    and a seed gives the same text."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("data-free calibration pads its batched prompts: the tokenizer needs a pad_token_id or an "
                         "eos_token_id")
    prompts = [tokenizer(NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)]).input_ids for i in range(num_sequences)]
    batches = -(-num_sequences // max_batch)
    bounds = [num_sequences * b // batches for b in range(batches + 1)]  # near-equal batches
    bar = tqdm(total=batches * seq_len, desc="teal: generating calibration text", unit="tok", leave=False,
               disable=not progress)

    class CountStep(LogitsProcessor):  # the bar moves a token a step (generate() has no per-step callback)
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return scores

    rows = []
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        for lo, hi in zip(bounds, bounds[1:]):
            width = max(len(p) for p in prompts[lo:hi])
            ids = torch.full((hi - lo, width), pad, dtype=torch.long)
            mask = torch.zeros((hi - lo, width), dtype=torch.long)
            for r, p in enumerate(prompts[lo:hi]):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                max_new_tokens=seq_len,
                min_new_tokens=seq_len,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList([CountStep()]),
            )
            for r, p in enumerate(prompts[lo:hi]):  # each row from its own first token: prompt, then samples
                rows.append(out[r, width - len(p): width - len(p) + seq_len].cpu())
    bar.close()
    return torch.stack(rows)


_FILE_SUFFIX = re.compile(r"\.(txt|text|md|json|jsonl|csv|tsv|raw|tokens)$", re.IGNORECASE)


def read_text(data: object) -> Optional[str]:
    """The text of a calibration or evaluation argument: a ``Path``'s contents; a str that names an existing file,
    that file's contents, else the str itself; texts in a list, joined; None for anything else (token ids).

    A one-line str that looks like a file path (a text-file suffix, or a separator and no spaces) but names no file
    is an error: calibrating on the characters of a mistyped path would give a plan that looks fine and is not."""
    if isinstance(data, Path):
        return data.read_text(encoding="utf-8")
    if isinstance(data, str):
        one_line = "\n" not in data and len(data) < 4096
        if one_line and os.path.isfile(data):
            return Path(data).read_text(encoding="utf-8")
        if one_line and _looks_like_path(data):
            raise FileNotFoundError(f"{data!r} looks like a file path, but there is no such file (pass a pathlib.Path "
                                    "for a file; a str is read as the text itself unless it names an existing file)")
        return data
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return "\n\n".join(data)
    return None


def _looks_like_path(s: str) -> bool:
    s = s.strip()
    return bool(_FILE_SUFFIX.search(s)) or (("/" in s or "\\" in s) and not any(c.isspace() for c in s))


def token_sequences(
    data: Data, tokenizer: Any, *, num_sequences: int, seq_len: int, min_tokens: int = 16
) -> torch.Tensor:
    """Token ids [N, L] from a text, a text file, a list of texts, or token tensors (1-D or 2-D)."""
    text = read_text(data)
    if text is not None:
        if not text.strip():
            raise CalibrationDataError("calibration text is empty")
        if tokenizer is None:
            raise ValueError("calibrating on text needs a tokenizer: teal_fx.calibrate(..., tokenizer=tok)")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    elif isinstance(data, torch.Tensor):
        ids = data
    elif isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        ids = torch.cat([t.reshape(-1) for t in data])
    else:
        raise TypeError(f"calibration data must be text, a path, a list of texts or token tensors, not {type(data).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token tensors must be integer ids, got {ids.dtype}")
    if ids.dim() == 2 and ids.shape[1] >= min_tokens:
        return ids[:num_sequences, :seq_len].long()
    ids = ids.reshape(-1).long()
    if ids.numel() < min_tokens:
        raise CalibrationDataError(f"calibration data too short: {ids.numel()} tokens (need at least {min_tokens})")
    seq_len = min(seq_len, ids.numel())
    n = min(num_sequences, ids.numel() // seq_len)
    # windows spread evenly over the whole text, not its first n * seq_len tokens: thresholds that see one or two
    # articles missed other text by several points of realised sparsity (docs/design.md, "Calibration and allocation")
    starts = torch.linspace(0, ids.numel() - seq_len, n).round().long().tolist()
    return torch.stack([ids[s : s + seq_len] for s in starts])


# ------------------------------------------------------------------------------------------------ recording
@dataclass
class _GraphState:
    gm: fx.GraphModule
    discovery: Discovery
    record: dict[fx.Node, list[str]]  # input node -> keys of the linears it feeds
    blocks: list[BlockSubgraph] = field(default_factory=list)
    keep: set = field(default_factory=set)
    kept: list[dict[fx.Node, Any]] = field(default_factory=list)  # per recorded sequence
    linear_keys: dict[fx.Node, str] = field(default_factory=dict)  # matched linear node -> its key


class _RecordingInterpreter(fx.Interpreter):
    def __init__(self, state: _GraphState, histograms: dict[str, AbsHistogram], keep: bool, counts=None,
                 recorder: Optional["Recorder"] = None) -> None:
        super().__init__(state.gm, garbage_collect_values=True)
        self.state, self.histograms = state, histograms
        self.kept: Optional[dict] = {} if keep else None
        self.state_counts = counts
        self.recorder = recorder


    def run_node(self, n: fx.Node) -> Any:
        key = self.state.linear_keys.get(n) if self.recorder is not None and self.recorder.masked else None
        if key is not None and key in self.state_counts:  # a sparse run: the linear sees its input masked
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = sparsify(args[0], self.state_counts[key][2], self.recorder.shared_counts)
            out = getattr(self, n.op)(n.target, (x, *args[1:]), kwargs)
        else:
            out = super().run_node(n)
        keys = self.state.record.get(n)
        if keys:
            h = AbsHistogram()
            h.add(out, name=keys[0])
            for k in keys:
                self.histograms[k] = self.histograms[k].merge(h) if k in self.histograms else h
        counts = self.state_counts
        if keys and counts is not None:
            a = out.detach().abs().float()
            if self.recorder is not None and self.recorder.shared_counts:  # a shared mask: the batch's mean per position
                a = a.mean(dim=0)
            for k in keys:
                if k in counts:
                    counts[k][0] += int((a <= counts[k][2]).sum())
                    counts[k][1] += a.numel()
        if self.kept is not None and n in self.state.keep:
            self.kept[n] = out.detach() if isinstance(out, torch.Tensor) else out
        return out


class Recorder:
    """A Dynamo backend that runs each captured graph through ``_RecordingInterpreter``."""

    def __init__(self, model: nn.Module, greedy: bool, thresholds: Optional[dict[str, float]] = None,
                 shared_counts: bool = False, masked: bool = False) -> None:
        self.name_of = parameter_names(model)  # keys by the weights' own names, whatever frame Dynamo traced
        self.greedy = greedy
        self.masked = masked  # with thresholds: each linear's input masked by its own, as a sparse run masks it
        # key -> [at or below threshold, total, threshold]: exact counts of what a plan would zero (shared_counts: of
        # the batch's mean |x| per position, what a shared mask compares)
        self.counts = {k: [0, 0, t] for k, t in thresholds.items()} if thresholds else None
        self.shared_counts = shared_counts
        self.graphs: list[_GraphState] = []
        self.histograms: dict[str, AbsHistogram] = {}
        self.keep_next = False

    def __call__(self, gm: fx.GraphModule, example_inputs):
        gm, disc = discover_captured(gm, example_inputs, self.name_of)
        record: dict[fx.Node, list[str]] = {}
        for m in disc.matched:
            record.setdefault(m.node.args[0], []).append(m.key)
        state = _GraphState(gm, disc, record, linear_keys={m.node: m.key for m in disc.matched})
        if self.greedy and disc.matched:
            state.blocks = extract_blocks(gm, disc.matched)
            state.keep = {a for b in state.blocks for a in b.inputs}
        self.graphs.append(state)

        def run(*args):
            interp = _RecordingInterpreter(state, self.histograms, self.keep_next and bool(state.keep), self.counts,
                                           self)
            out = interp.run(*args)
            if interp.kept is not None:
                state.kept.append(interp.kept)
            return out

        return run


# ------------------------------------------------------------------------------------------------ API
def calibrate(
    model: nn.Module,
    data: Data = None,
    sparsity: float = 0.5,
    method: str = "greedy",
    *,
    tokenizer: Any = None,
    num_sequences: Optional[int] = None,
    seq_len: Optional[int] = None,
    greedy_sequences: Optional[int] = None,
    step: Optional[float] = None,
    max_sparsity: Optional[float] = None,
    error_fraction: float = 0.25,
    attach: bool = True,
    progress: bool = True,
    weights: Optional[str] = None,
    quantize_lm_head: Union[bool, str] = False,
    batch_mask: str = "per_row",
    activations: Optional[str] = None,
) -> Plan:
    """Calibrate thresholds for every block linear of ``model`` and allocate ``sparsity`` across them.

    ``data``: a text, a text file, a list of texts, or token ids; ``None`` calibrates data-free on text the model
    generates itself (needs ``tokenizer``). ``method``: ``"greedy"`` (TEAL's block-wise search) or ``"uniform"``.
    Sizes default per device (``defaults_for``). The returned plan keeps the histograms and greedy paths
    (``plan.at(s)`` re-derives it at any sparsity up to ``max_sparsity``, default max(0.9, sparsity)) and, with
    ``attach``, is attached to the model so that
    ``torch.compile(model, backend="teal")`` uses it.

    ``weights="int8" | "int4"`` quantizes the block linears in place first (``quantize_lm_head``: the output head
    too, True or "int8", or "int4", which halves a quantized step's largest single read but cost SmolLM2 19% more
    perplexity: docs/perf-log.md v54) and calibrates on the quantized model; the plan records the formats
    (kernels/quantize.py).
    ``activations="int8"`` (with quantized weights): the decode steps' masked inputs are rounded to int8 per 32
    inputs, and the one-row GEMV multiplies integers (dp4a). It changes results a little (``Plan.activations``) and
    makes int4 decoding faster; the thresholds apply before the rounding, so calibration is the same.

    ``batch_mask="shared"``: one mask per decode step for the whole batch (paper §5.4.4); the per-linear sparsities
    are the per-row allocation's, the thresholds of the rows' mean |x| for batches of 2, 4, 8 and 16 are read in a
    sparse run at ``sparsity`` (teal_fx/shared_thresholds.py; ``read_batch_thresholds`` re-reads them for a plan
    re-derived at another sparsity).
    """
    if method not in ("greedy", "uniform"):
        raise ValueError(f"method must be 'greedy' or 'uniform', got {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if batch_mask not in BATCH_MASKS:
        raise ValueError(f"batch_mask must be one of {BATCH_MASKS}, got {batch_mask!r}")
    if weights not in (None, *WEIGHT_FORMATS):
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS} or None, got {weights!r}")
    if activations not in (None, *ACTIVATION_FORMATS):
        raise ValueError(f"activations must be one of {ACTIVATION_FORMATS} or None, got {activations!r}")
    if activations is not None and weights is None:
        raise ValueError(f"activations={activations!r} needs weights='int8' or 'int4' (integer products)")
    lm_head = lm_head_format(quantize_lm_head)
    device = next(model.parameters()).device
    if weights is not None or lm_head is not None:
        keys = [m.key for m in find_linears(model)]
        if not keys:
            raise ValueError(f"nothing to quantize: no block linear was recognised in {type(model).__name__}")
        apply_weight_format(model, keys, weights, lm_head)
    d = defaults_for(device)
    num_sequences = num_sequences or (d.num_sequences if data is not None else d.self_generated_sequences)
    seq_len = seq_len or d.seq_len
    greedy_sequences, step = greedy_sequences or d.greedy_sequences, step or d.step
    max_sparsity = max(0.9, sparsity) if max_sparsity is None else max_sparsity
    # the greedy plan is checked against uniform on text neither the histograms nor the search saw (choose_allocation)
    held_back = max(1, num_sequences // 12) if method == "greedy" else 0
    if data is None:
        if tokenizer is None:
            raise ValueError("data-free calibration needs the tokenizer: teal_fx.calibrate(model, tokenizer=tok)")
        print(f"teal: no calibration data given: calibrating data-free on {num_sequences} x {seq_len} tokens "
              "the model generates itself from short neutral prompts")
        seqs = self_generated_tokens(model, tokenizer, num_sequences + held_back, seq_len, progress=progress)
        source = "self-generated"
    else:
        seqs = token_sequences(data, tokenizer, num_sequences=num_sequences + held_back, seq_len=seq_len)
        source = str(data) if isinstance(data, (str, Path)) and len(str(data)) < 200 else type(data).__name__
    seqs, held = _hold_back(seqs, held_back)

    recorder = Recorder(model, greedy=method == "greedy")
    compiled = torch.compile(model, backend=recorder, dynamic=False)
    with torch.no_grad(), recompile_limits(1024, 4096):
        for i in tqdm(range(len(seqs)), desc="teal: calibrating", disable=not progress):
            recorder.keep_next = i < greedy_sequences
            compiled(input_ids=seqs[i : i + 1].to(device), use_cache=False)
    matched = {m.key: m for st in recorder.graphs for m in st.discovery.matched}
    if not matched:
        summary = "\n".join(st.discovery.summary() for st in recorder.graphs)
        raise ValueError(f"nothing to calibrate: no block linear was recognised in {type(model).__name__}\n{summary}")
    missing = [k for k in matched if k not in recorder.histograms]
    if missing:
        raise CalibrationDataError(f"no activations recorded for {missing[:3]}")
    group = tp_group(model)
    if group is not None:  # a row-sharded input's histogram is of this rank's slice: every rank reads the sums
        reduce_histograms(recorder.histograms, group)

    plan = Plan(
        linears={k: LinearPlan(k, m.block, m.role, whole_shape(model, k, m.shape), 0.0, 0.0) for k, m in matched.items()},
        model=model_name(model),
        method=method,
        histograms=dict(recorder.histograms),
        notes={"calibration": {"source": source, "sequences": len(seqs), "seq_len": int(seqs.shape[1])}},
        weights=weights,
        lm_head=lm_head,
        activations=activations,
        batch_mask=batch_mask,
    )
    if method == "greedy":
        blocks = [(st, b) for st in recorder.graphs for b in st.blocks]
        for st, b in tqdm(blocks, desc="teal: greedy allocation", disable=not progress):
            inputs = [[kept[a] for a in b.inputs] for kept in st.kept]
            error = BlockError(b, inputs, plan.histograms, error_fraction)
            numel = {m.key: m.shape[0] * m.shape[1] for m in b.linears}
            plan.greedy_paths[b.block] = greedy_path(error, numel, step=step, max_sparsity=max_sparsity,
                                                     accept=error.accept)
            b.thresholds.clear()
        for st in recorder.graphs:
            st.kept.clear()
        plan.notes["greedy"] = {"step": step, "max_sparsity": max_sparsity, "error_fraction": error_fraction,
                                "sequences": min(greedy_sequences, len(seqs))}
    plan = plan.at(sparsity, method) if held is None else choose_allocation(model, plan, sparsity, held)
    if batch_mask == "shared":
        all_windows = seqs if held is None else torch.cat([seqs, held])
        plan = with_batch_histograms(plan, read_batch_histograms(model, plan, all_windows, progress=progress))
    if attach:
        attach_plan(model, plan, check=False)
    return plan


def _hold_back(seqs: torch.Tensor, count: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(calibration windows, ``count`` windows set aside, spread evenly over the data); no set-aside where fewer
    than four windows exist."""
    if count == 0 or len(seqs) < 4:
        return seqs, None
    count = min(count, len(seqs) // 4)
    held = torch.linspace(0, len(seqs) - 1, count + 2).round().long()[1:-1].unique()
    keep = torch.ones(len(seqs), dtype=torch.bool)
    keep[held] = False
    return seqs[keep], seqs[held]


def realised_sparsity(model: nn.Module, plan: Plan, data: Data, *, tokenizer: Any = None, num_sequences: int = 4,
                      seq_len: int = 256, batch: int = 1, sparse_run: bool = False) -> dict[str, float]:
    """The fraction of each matched linear's input at or below its threshold, counted exactly on ``data``.

    ``batch`` > 1 with a shared-mask plan: the windows run ``batch`` at a time (spread over the data, so a batch's
    rows come from different places) and what counts is the batch's mean |x| per position against the threshold for
    that batch size, i.e. the fraction of inputs the shared mask drops.

    By default it counts the dense model's inputs, the statistic calibration reads (and TEAL reports). ``sparse_run``:
    every linear's input is masked as the plan masks it, so each counts what a sparse model feeds it. Each mask
    shrinks later inputs a little: thresholds read on dense inputs (TEAL's per-row ones) drop somewhat more there,
    and a shared mask's narrow mean would turn that into many points, which is why shared thresholds are read in a
    sparse run (teal_fx/shared_thresholds.py; docs/perf-log.md v30-v31)."""
    seqs = token_sequences(data, tokenizer, num_sequences=num_sequences, seq_len=seq_len)
    shared = batch > 1 and plan.batch_mask == "shared"
    recorder = Recorder(model, greedy=False, thresholds={k: lp.threshold_for(batch if shared else 1)
                                                  for k, lp in plan.linears.items()}, shared_counts=shared,
                        masked=sparse_run)
    compiled = torch.compile(model, backend=recorder, dynamic=False)
    device = next(model.parameters()).device
    batches = spread_batches(len(seqs), batch if shared else 1)
    if not batches:
        raise ValueError(f"realised_sparsity: {len(seqs)} windows of {seq_len} tokens cannot fill one batch of "
                         f"{batch}: give more text or num_sequences >= {batch}")
    with torch.no_grad(), recompile_limits(1024, 4096):
        for rows in batches:
            compiled(input_ids=seqs[rows].to(device), use_cache=False)
    return {k: below / total for k, (below, total, _) in recorder.counts.items() if total}


def read_batch_thresholds(model: nn.Module, plan: Plan, data: Data, *, tokenizer: Any = None,
                          num_sequences: Optional[int] = None, seq_len: Optional[int] = None,
                          progress: bool = True) -> Plan:
    """``plan`` (``batch_mask="shared"``) with its thresholds for batches of 2, 4, 8 and 16 rows read in a sparse run
    on ``data`` at the plan's per-linear sparsities (teal_fx/shared_thresholds.py). ``calibrate(...,
    batch_mask="shared")`` does this at its target; call it on ``plan.at(s)`` to run a shared plan at another
    sparsity. Sizes default as calibration's (``defaults_for``)."""
    d = defaults_for(next(model.parameters()).device)
    seqs = token_sequences(data, tokenizer, num_sequences=num_sequences or d.num_sequences, seq_len=seq_len or d.seq_len)
    return with_batch_histograms(plan, read_batch_histograms(model, plan, seqs, progress=progress))
