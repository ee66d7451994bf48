"""A lean decode loop: static KV cache, one compiled prefill graph, one compiled decode graph.

    out = teal_fx.generate(model, input_ids, max_new_tokens=128)                         # greedy, backend "teal"
    out = teal_fx.generate(model, ids, 128, do_sample=True, top_p=0.9, mode="reduce-overhead")  # CUDA graphs

The decode step has fixed shapes (the cache length is rounded up to a multiple of 256 and one cache per size is kept
by ``teal_fx.state`` and reused; the position is a tensor), so it compiles once per cache size; with
``mode="reduce-overhead"`` on CUDA it is captured once as a CUDA graph and replayed.
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from teal_fx import state
from teal_fx.capture import recompile_limits
from teal_fx.tensor_parallel import tp_degree

STOP_CHECK_EVERY = 8  # steps between looks at "have all rows stopped?"
CACHE_LEN_BUCKET = 256  # the static cache length is rounded up to this, so calls of other lengths reuse graphs


def _compiled(model: nn.Module, backend: str, mode: Optional[str], options: Optional[dict],
              frame: Callable = nn.Module.__call__) -> Callable:
    """One compiled wrapper per (frame, backend, mode, options), kept by ``teal_fx.state`` so later calls reuse its
    graphs, and made anew when another plan is attached (a recompile, never the old thresholds). Called as
    ``wrapper(model, ...)``: it compiles ``frame``, by default ``nn.Module.__call__`` (the frame ``torch.compile(model)``
    compiles), without holding the model."""

    def make() -> Callable:
        if backend == "none":
            return frame
        kw = {"mode": mode} if mode else {}
        if options:  # torch.compile takes a mode or options, not both: fold the mode into the options
            if backend == "teal":
                kw = {"options": {**options, **({"mode": mode} if mode else {})}}
            elif backend == "inductor":
                from torch._inductor import list_mode_options  # Inductor's import costs seconds: on first use

                kw = {"options": {**(list_mode_options(mode) if mode else {}), **options}}
            elif mode:
                raise ValueError(f"mode and options together need backend 'teal' or 'inductor', got {backend!r}")
            else:
                kw = {"options": options}
        return torch.compile(frame, backend=backend, dynamic=False, **kw)

    return state.compiled_wrapper(model, (frame, backend, mode, repr(sorted((options or {}).items()))), make)


def greedy_step(model: nn.Module, done: Optional[Tensor], eos_token_id: Optional[int],
                **inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
    """One model call and its greedy pick, the frame ``_decode_loop`` compiles when it does not sample: the argmax and
    the stop flags then run inside the step's graph (and CUDA graph), not as ~ten small eager kernels between
    replays (+0.7 to +1.3% tok/s on the H200, docs/perf-log.md v35). Returns the next tokens [B] and, given an
    ``eos_token_id``, the stop flags ``done`` [B] updated (a stopped row repeats it). The eos id is a constant of the
    graph: another id compiles another step."""
    logits = model(**inputs).logits[:, -1]
    return _with_stops(sample_next(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None), done,
                       eos_token_id)


def greedy_step_in_place(model: nn.Module, eos_token_id: Optional[int], step: "_StepBuffers", **inputs: Any) -> None:
    """``greedy_step`` on the decode step's own buffers, which it advances: the fed token becomes the picked one, the
    position (and a padded batch's position ids) moves on, the stop flags update and the pick is written into the
    sequence. Under CUDA graphs the buffers are static inputs (their addresses baked into the graph), so a step is one
    replay: no copy into the graph's inputs, no clone of its outputs and no eager increment between replays (-17 µs a
    step, perf-log v59)."""
    padded = {} if step.mask is None else dict(attention_mask=step.mask, position_ids=step.position_ids)
    nxt, done = greedy_step(model, step.done, eos_token_id, input_ids=step.ids, cache_position=step.position,
                            **padded, **inputs)
    step.tokens.index_copy_(1, step.position + 1, nxt[:, None])
    step.ids.copy_(nxt[:, None])
    step.position.add_(1)
    if step.position_ids is not None:
        step.position_ids.add_(1)
    if done is not None:
        step.done.copy_(done)


class _StepBuffers:
    """The greedy decode step's inputs and outputs, one set per (model, batch, cache length, stops or not, padded or
    not, device) kept by ``teal_fx.state`` (their addresses are part of the compiled step's guards and CUDA graph):
    the token fed [B, 1], its cache position [1], the stop flags [B] (None without an eos id), the sequence
    [B, max_cache_len] and, for a left-padded batch (None otherwise), the attention mask over the cache
    [B, max_cache_len] and each row's position id [B, 1]."""

    def __init__(self, batch: int, max_cache_len: int, stops: bool, padded: bool, device: torch.device) -> None:
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device) if stops else None
        self.tokens = torch.zeros(batch, max_cache_len, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, max_cache_len, dtype=torch.long, device=device) if padded else None
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device) if padded else None
        for t in (self.ids, self.position, self.done, self.tokens, self.mask, self.position_ids):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def start(self, prompt_ids: Tensor, nxt: Tensor, done: Optional[Tensor],
              padding: Optional["_LeftPadding"]) -> None:
        """After the prefill: the prompt and its pick in the sequence, the pick fed next (and a padded batch's mask
        and first decode positions)."""
        prompt = prompt_ids.shape[1]
        self.tokens[:, :prompt] = prompt_ids
        self.tokens[:, prompt] = nxt
        self.ids.copy_(nxt[:, None])
        self.position.fill_(prompt)
        if done is not None:
            self.done.copy_(done)
        if padding is not None:
            self.mask.copy_(padding.full)
            self.position_ids.copy_(padding.next_position)


def _with_stops(nxt: Tensor, done: Optional[Tensor], eos_token_id: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """The picked tokens and stop flags after the eos rule: a stopped row repeats the eos token, a row that picks it
    stops (without an eos id: as they are)."""
    if eos_token_id is None:
        return nxt, done
    nxt = torch.where(done, eos_token_id, nxt)
    return nxt, done | (nxt == eos_token_id)


def two_stage_argmax(logits: Tensor, chunks: int = 256) -> Tensor:
    """``logits.argmax(-1)`` for [B, V] in two reductions: the maxima of ``chunks`` slices, then the best slice.

    ATen's argmax reduces a row within one block: 28 µs per decode step for a 128k vocabulary on an H100
    (docs/design.md, "The decode loop"); the slices spread it over the GPU. Same result, the first index of the
    maximum (padding is -inf)."""
    batch, vocab = logits.shape
    width = -(-vocab // chunks)
    if width * chunks != vocab:
        logits = torch.nn.functional.pad(logits, (0, width * chunks - vocab), value=float("-inf"))
    values, index = logits.reshape(batch, chunks, width).max(dim=-1)
    best = values.argmax(dim=-1)
    return best * width + index.gather(-1, best[:, None]).squeeze(-1)


def sample_next(logits: Tensor, *, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token per row from last-position logits [B, V]: argmax, or sampling with temperature/top-k/top-p."""
    if not do_sample:
        return two_stage_argmax(logits) if logits.is_cuda and logits.shape[-1] >= 16384 else logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword the model's ``forward`` (and ``generate()``) takes its KV cache by: ``cache`` from transformers
    5.2x, which deprecates ``past_key_values`` (a warning on every call, removal announced), ``past_key_values``
    before. ``inspect.signature`` sees through the deprecation decorator to the real ``forward``."""
    return _cache_kwarg_of(type(getattr(model, "_orig_mod", model)))  # _orig_mod: under a torch.compile wrapper


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def static_cache(model: nn.Module, batch: int, max_len: int) -> Any:
    """A StaticCache allocated now, outside any compiled region or CUDA graph pool (transformers otherwise
    allocates it lazily inside the first compiled step).

    With ``num_key_value_heads`` in the config the shapes are known; without it (multi-head configs, and multi-query
    ones of older transformers, Falcon-7B's in 5.17) two eager tokens (a prefill: a model that cannot fill a static cache
    says so here) let transformers size each layer from the keys it is given, and the cache is then zeroed."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=_windows_as_full_layers(cfg), max_cache_len=max_len)
    if not hasattr(cache, "early_initialization"):
        return cache
    heads = getattr(cfg, "num_key_value_heads", None)
    if heads is None:
        _initialize_by_a_prefill(model, cache, batch)
        return cache
    tp = tp_degree(model)  # tensor parallel: each rank caches its own heads
    if heads % tp:
        raise ValueError(f"{heads} key/value heads do not split over {tp} tensor-parallel ranks")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    cache.early_initialization(batch, heads // tp, head_dim, p.dtype, p.device)
    return cache


def _windows_as_full_layers(cfg: Any) -> Any:
    """``cfg`` for the cache: a copy whose sliding-window layers are full ones.

    transformers' sliding static layer (5.17, 5.25) counts its length in a Python int that the model reads each step,
    so a compiled step was specialized on it: a recompile per token, and the loop's recompile limit hit after 64.
    A full layer holds every position and the model's own sliding-window mask hides those out of the window: the
    same attention, with the cache's memory that of a full layer."""
    def text_config(c: Any) -> Any:
        return c.get_text_config(decoder=True) if hasattr(c, "get_text_config") else c

    if not getattr(text_config(cfg), "sliding_window", None):
        return cfg
    cfg = copy.deepcopy(cfg)
    text = text_config(cfg)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention" if t == "sliding_attention" else t for t in text.layer_types]
    text.sliding_window = None
    return cfg


@torch.no_grad()
def _initialize_by_a_prefill(model: nn.Module, cache: Any, batch: int) -> None:
    """Two eager tokens of the uncompiled model into ``cache`` (transformers sizes each layer from them), then zeros."""
    plain = getattr(model, "_orig_mod", model)
    device = next(plain.parameters()).device
    try:
        plain(torch.zeros(batch, 2, dtype=torch.long, device=device), **{cache_kwarg(plain): cache},
              cache_position=torch.arange(2, device=device), use_cache=True)
    except RuntimeError as e:
        import transformers

        raise ValueError(f"{type(plain).__name__} cannot decode into a static cache under transformers "
                         f"{transformers.__version__} (dense, eager: {e}); teal's decode loop needs one") from e
    cache.reset()


class _AllStopped:
    """"Has every row stopped?" for the host, without waiting for the GPU.

    Reading ``done`` on the host waits for the step that computed it, and the GPU then idles while the host prepares
    the next launch (~0.2-0.3 ms per step on average with a check every 8 steps, docs/design.md, "The decode loop"). On CUDA the flag is
    copied to pinned memory behind an event and read once the event has passed, at a later check: the loop may run a
    few steps past the last EOS, which the result trims. On CPU it is read at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event: Optional[torch.cuda.Event] = None

    def check(self, done: Tensor) -> bool:
        if not self.cuda:
            return bool(done.all())
        ready = self.event is None or self.event.query()
        stopped = self.event is not None and ready and bool(self.host)
        if ready:  # the last copy has landed (and was read): post this step's flag
            self.host.copy_(done.all(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return stopped


def _reusable_cache(model: nn.Module, batch: int, max_len: int, backend: str):
    """A static cache of this size for ``model``: the one ``teal_fx.state`` holds (zeroed) if it has this size.
    Refused for a compiled step if a layer still counts its length in a Python int (a sliding-window layer that
    ``_windows_as_full_layers`` did not replace): the step would be specialized on that count, a recompile per token."""
    param = next(model.parameters())
    cache = state.static_kv_cache(model, (batch, max_len, param.dtype, param.device),
                                  lambda: static_cache(model, batch, max_len))
    int_counted = sorted({type(layer).__name__ for layer in getattr(cache, "layers", ())
                          if hasattr(layer, "cumulative_length_int")})
    if backend != "none" and int_counted:
        import transformers

        raise ValueError(f"{type(model).__name__}'s static cache has layers ({', '.join(int_counted)}) whose length "
                         f"transformers {transformers.__version__} counts in a Python int: a compiled decode step "
                         f"would recompile at every token. Decode it with backend='none'")
    return cache


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    streamer: Optional[Callable[[Tensor], None]] = None,
    backend: str = "teal",
    mode: Optional[str] = None,
    options: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    max_cache_len: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, S]: equal-length prompts, or prompts of different
    lengths left-padded to S with ``attention_mask`` [B, S] (1: a token, 0: padding), as Hugging Face tokenizers
    give them with ``padding_side="left"``. Padding positions are masked out of attention and not counted in the
    positions; with a shared batch mask they never enter the batch's statistic (the decode rows are all real tokens;
    a plan that also sparsifies the prefill is refused for a padded batch).

    Rows stop independently at ``eos_token_id`` (default: the model's); a stopped row is padded with it.
    ``streamer(tokens)`` is called with each step's tokens [B]. ``backend="none"`` runs the model uncompiled.
    The KV cache holds ``max_cache_len`` positions (default: S + max_new_tokens rounded up to a multiple of
    256): its length is part of the compiled graphs' shapes, so calls that share it share graphs.
    Returns [B, S + generated] token ids.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch, prompt = input_ids.shape
    if eos_token_id is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    max_cache_len = _cache_length(prompt + max_new_tokens, max_cache_len,
                                  f"prompt ({prompt}) + max_new_tokens ({max_new_tokens})")
    padding = _LeftPadding.of(model, attention_mask, input_ids, max_cache_len, backend)
    with recompile_limits(64, fail=True):  # raise, never decode uncompiled in silence
        tokens = _decode_loop(model, input_ids, max_new_tokens, max_cache_len, backend, mode, options, eos_token_id,
                              streamer, dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                             generator=generator), padding)
    return _trim_after_all_stopped(tokens, prompt, eos_token_id)


def _cache_length(need: int, max_cache_len: Optional[int], what: str) -> int:
    """The static cache's length: ``max_cache_len``, or ``need`` rounded up to a multiple of CACHE_LEN_BUCKET."""
    if max_cache_len is None:
        return -(-need // CACHE_LEN_BUCKET) * CACHE_LEN_BUCKET
    if max_cache_len < need:
        raise ValueError(f"max_cache_len={max_cache_len} < {what}")
    return max_cache_len


def _step_inputs(cache: dict, input_ids: Tensor, position: Tensor, **padding) -> dict:
    """The model's keyword inputs for one call (prefill or decode step) on the static cache, passed as
    ``{cache_kwarg(model): cache}`` (built once per loop). ``padding``: attention_mask and position_ids of a
    left-padded batch (``_LeftPadding``)."""
    return dict(input_ids=input_ids, **cache, cache_position=position, use_cache=True, **padding)


def _last_logits(run, model: nn.Module, cache: dict, input_ids: Tensor, position: Tensor, **padding) -> Tensor:
    """One compiled call of ``model`` (``_step_inputs``): the last position's logits [B, V]."""
    return run(model, **_step_inputs(cache, input_ids, position, **padding)).logits[:, -1]


class _LeftPadding:
    """A left-padded batch's model inputs with fixed shapes, so the decode step still compiles once: the attention
    mask over the whole static cache ([B, max_cache_len]: the prompt's mask, then ones; the cache position hides
    the slots not yet written), and each row's position ids counted over its real tokens only."""

    def __init__(self, mask: Tensor, max_cache_len: int) -> None:
        batch, prompt = mask.shape
        self.full = torch.ones(batch, max_cache_len, dtype=mask.dtype, device=mask.device)
        self.full[:, :prompt] = mask
        self.prefill_positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.next_position = mask.sum(-1, keepdim=True)  # [B, 1]: the first step's (sampling advances it in place)

    @staticmethod
    def of(model: nn.Module, mask: Optional[Tensor], input_ids: Tensor, max_cache_len: int,
           backend: str) -> Optional["_LeftPadding"]:
        """None for no mask or one without padding (the unpadded graphs); else the checked inputs."""
        if mask is None:
            return None
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(mask.shape)}")
        mask = mask.to(device=input_ids.device, dtype=torch.long)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (a token) only")
        if bool(mask.all()):
            return None
        if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
            raise ValueError("attention_mask: only left padding is supported (each row's padding first, its last "
                             "position a token): tokenize with padding_side='left'")
        plan = state.attached_plan(model) if backend == "teal" else None
        if plan is not None and plan.batch_mask == "shared" and plan.prefill_sparse_from < 1.0:
            raise ValueError("a shared batch mask over a sparsified prefill would count the padding positions in the "
                             "batch's statistic: use a plan with prefill_sparse_from=1.0 (the default) for padded "
                             "batches, or equal-length prompts")
        return _LeftPadding(mask, max_cache_len)

    @staticmethod
    def prefill_inputs(padding: Optional["_LeftPadding"]) -> dict:
        """The prefill's extra model inputs ({} for an unpadded batch)."""
        if padding is None:
            return {}
        return dict(attention_mask=padding.full, position_ids=padding.prefill_positions)

    @staticmethod
    def step_inputs(padding: Optional["_LeftPadding"]) -> dict:
        """The sampling loop's extra inputs of every step ({} for an unpadded batch; greedy steps keep theirs in
        ``_StepBuffers``): the same tensors throughout, ``next_position`` advanced in place."""
        if padding is None:
            return {}
        return dict(attention_mask=padding.full, position_ids=padding.next_position)


def _decode_loop(model, input_ids, max_new_tokens, max_cache_len, backend, mode, options, eos_token_id, streamer,
                 sampling, padding: Optional[_LeftPadding] = None) -> Tensor:
    """The lean loop's prefill and steps on a static cache: greedy steps that advance their own buffers, or the
    sampling loop."""
    batch = input_ids.shape[0]
    cache = {cache_kwarg(model): _reusable_cache(model, batch, max_cache_len, backend)}
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device) if eos_token_id is not None else None
    compiled = functools.partial(_compiled, model, backend, mode, options)  # compiled(frame)
    if sampling["do_sample"]:
        return _sampling_loop(model, input_ids, max_new_tokens, compiled, eos_token_id, streamer, sampling, padding,
                              cache, done)
    return _greedy_loop(model, input_ids, max_new_tokens, max_cache_len, compiled, eos_token_id, streamer, padding,
                        cache, done)


def _greedy_loop(model, input_ids, max_new_tokens, max_cache_len, compiled, eos_token_id, streamer, padding, cache,
                 done) -> Tensor:
    """The prefill through ``greedy_step``, then steps that advance their own buffers (``greedy_step_in_place``)."""
    batch, prompt = input_ids.shape
    all_stopped = _AllStopped(input_ids.device)
    prefill_padding = _LeftPadding.prefill_inputs(padding)
    prefill = _step_inputs(cache, input_ids, torch.arange(prompt, device=input_ids.device), **prefill_padding)
    nxt, done = compiled(greedy_step)(model, done, eos_token_id, **prefill)
    key = (batch, max_cache_len, done is not None, padding is not None, input_ids.device)
    step = state.decode_step_buffers(model, key, lambda: _StepBuffers(*key))
    step.start(input_ids, nxt, done, padding)  # copied before the next replay overwrites the prefill's outputs
    decode = compiled(greedy_step_in_place)
    for i in range(max_new_tokens):  # tokens[:, prompt + i] is the last one picked
        if streamer is not None:
            streamer(step.tokens[:, prompt + i].clone())  # the buffer is the next call's too
        if i == max_new_tokens - 1:
            break
        if step.done is not None and (i + 1) % STOP_CHECK_EVERY == 0 and all_stopped.check(step.done):
            break
        decode(model, eos_token_id, step, **cache, use_cache=True)
    return step.tokens[:, : prompt + i + 1].clone()  # the buffers are reused by the next call


def _sampling_loop(model, input_ids, max_new_tokens, compiled, eos_token_id, streamer, sampling, padding, cache,
                   done) -> Tensor:
    """The decode loop when sampling: the compiled model gives the logits, the pick runs eagerly."""
    run = compiled(nn.Module.__call__)
    all_stopped = _AllStopped(input_ids.device)

    def pick(ids: Tensor, position: Tensor, **padding_inputs) -> tuple[Tensor, Optional[Tensor]]:
        # copied: under CUDA graphs the next replay overwrites the logits (one small copy, beside eager sampling)
        logits = _last_logits(run, model, cache, ids, position, **padding_inputs).clone()
        return _with_stops(sample_next(logits, **sampling), done, eos_token_id)

    prompt = input_ids.shape[1]
    prefill_padding, step_padding = _LeftPadding.prefill_inputs(padding), _LeftPadding.step_inputs(padding)
    nxt, done = pick(input_ids, torch.arange(prompt, device=input_ids.device), **prefill_padding)
    position = torch.tensor([prompt], device=input_ids.device)
    out = [input_ids]
    for i in range(max_new_tokens):
        out.append(nxt[:, None])
        if streamer is not None:
            streamer(nxt)
        if i == max_new_tokens - 1:
            break
        if done is not None and (i + 1) % STOP_CHECK_EVERY == 0 and all_stopped.check(done):
            break
        nxt, done = pick(nxt[:, None], position, **step_padding)
        position.add_(1)
        if padding is not None:
            padding.next_position.add_(1)
    return torch.cat(out, dim=1)


@torch.no_grad()
def decode_logits(
    model: nn.Module,
    tokens: Tensor,
    prompt: int,
    *,
    backend: str = "teal",
    mode: Optional[str] = None,
    options: Optional[dict] = None,
    max_cache_len: Optional[int] = None,
) -> Tensor:
    """The logits [B, T - prompt, V] (fp32) with which the lean loop chose each of ``tokens[:, prompt:]``, when it is
    fed those tokens rather than its own choices (teacher forcing): row 0 from the prefill of ``tokens[:, :prompt]``,
    row i from the decode step fed ``tokens[:, prompt + i - 1]``.

    Two paths compared on one sequence see the same context at every step, so their logits can be compared step by
    step (``argmax_disagreements``), past the point where their own greedy outputs would part. Same compiled graphs
    and cache as ``generate`` with these arguments."""
    if tokens.dim() != 2 or not 1 <= prompt < tokens.shape[1]:
        raise ValueError(f"tokens must be [batch, seq] with 1 <= prompt < seq, got {tuple(tokens.shape)}, {prompt}")
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    batch, total = tokens.shape
    max_cache_len = _cache_length(total, max_cache_len, f"{total} tokens")
    with recompile_limits(64, fail=True):
        run = _compiled(model, backend, mode, options)
        cache = {cache_kwarg(model): _reusable_cache(model, batch, max_cache_len, backend)}
        # each row copied at once: a CUDA graph's output is overwritten by the next replay
        prefill = _last_logits(run, model, cache, tokens[:, :prompt], torch.arange(prompt, device=device))
        rows = [prefill.to(torch.float32, copy=True)]
        position = torch.tensor([prompt], device=device)
        for i in range(prompt, total - 1):
            rows.append(_last_logits(run, model, cache, tokens[:, i : i + 1], position).to(torch.float32, copy=True))
            position.add_(1)
    return torch.stack(rows, dim=1)


def argmax_disagreements(reference: Tensor, other: Tensor) -> list[tuple[int, int, int, float]]:
    """Where greedy decoding from ``other`` would pick another token than from ``reference`` (logits [T, V] of the
    same steps, e.g. from ``decode_logits``): (step, reference's token, other's token, the gap between those two
    tokens in the reference's logits). A gap within the rounding noise of the computation is a tie."""
    if reference.shape != other.shape or reference.dim() != 2:
        raise ValueError(f"need two [steps, vocab] logits of one shape, got {tuple(reference.shape)}, "
                         f"{tuple(other.shape)}")
    ref_tok, other_tok = reference.argmax(-1), other.argmax(-1)
    steps = (ref_tok != other_tok).nonzero().flatten().tolist()
    return [(i, int(ref_tok[i]), int(other_tok[i]), float(reference[i, ref_tok[i]] - reference[i, other_tok[i]]))
            for i in steps]


def _trim_after_all_stopped(tokens: Tensor, prompt: int, eos_token_id: Optional[int]) -> Tensor:
    """Drop the columns generated after every row had emitted EOS (the loop checks only every few steps)."""
    if eos_token_id is None:
        return tokens
    stopped = (tokens[:, prompt:] == eos_token_id).cummax(dim=1).values.all(dim=0)
    hit = stopped.nonzero()
    return tokens if hit.numel() == 0 else tokens[:, : prompt + int(hit[0]) + 1]
