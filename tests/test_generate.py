"""The lean decode loop: equals HF greedy decoding at threshold 0, follows the attached plan, samples, stops."""
import importlib

import pytest
import torch

import teal_fx
from teal_fx.generate import greedy_step, greedy_step_in_place, sample_next, static_cache
from teal_fx.state import held_kv_cache
from tests.conftest import masked_inputs, tiny_model


def test_greedy_equals_hf_generate_dense():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 6))
    ours = teal_fx.generate(model, ids, 10, backend="none", eos_token_id=-1)
    hf = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, hf)


def test_follows_the_attached_plan_and_a_new_one():
    """Each attached plan is used (no stale compiled graph), and the sparse path equals the hook reference."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 6))
    found = teal_fx.find_linears(model)
    results = []
    for t in (0.0, 0.9, 0.0, 0.9):
        plan = teal_fx.Plan.from_thresholds(found, t)
        teal_fx.attach_plan(model, plan, check=False)
        out = teal_fx.generate(model, ids, 8, eos_token_id=-1, options={"compiler": "eager"})
        with masked_inputs(model, plan, sparse_from=1.0):
            ref = teal_fx.generate(model, ids, 8, backend="none", eos_token_id=-1)
        assert torch.equal(out, ref)
        results.append(out)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    assert not torch.equal(results[0], results[1])


def test_per_row_stop_and_streaming():
    model = tiny_model("mistral")
    ids = torch.randint(3, 128, (3, 4))
    greedy = teal_fx.generate(model, ids, 6, backend="none", eos_token_id=-1)
    eos = int(greedy[1, 5])  # row 1 stops at its second new token
    streamed = []
    out = teal_fx.generate(model, ids, 6, backend="none", eos_token_id=eos, streamer=streamed.append)
    assert out[1, 5] == eos and (out[1, 5:] == eos).all()
    assert torch.equal(torch.stack(streamed, 1), out[:, 4:])


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 4))
    a = teal_fx.generate(model, ids, 8, backend="none", do_sample=True, top_k=5, top_p=0.9,
                         generator=torch.Generator().manual_seed(1), eos_token_id=-1)
    b = teal_fx.generate(model, ids, 8, backend="none", do_sample=True, top_k=5, top_p=0.9,
                         generator=torch.Generator().manual_seed(1), eos_token_id=-1)
    assert torch.equal(a, b)
    logits = torch.randn(4, 50)
    for _ in range(20):
        tok = sample_next(logits, do_sample=True, temperature=1.0, top_k=3, top_p=None)
        top3 = logits.topk(3).indices
        assert all(t in top3[i] for i, t in enumerate(tok))


def test_stops_when_every_row_has_stopped_though_checked_every_few_steps():
    """The host checks "all rows done?" only every STOP_CHECK_EVERY steps; the result is trimmed to the step where
    the last row stopped, as if it had checked every step."""
    from teal_fx.generate import _trim_after_all_stopped

    eos = 9
    tokens = torch.tensor([[1, 2, 5, eos, eos, eos, eos],
                           [1, 2, eos, 7, eos, eos, eos]])  # prompt of 2; row 0 stops at new token 1, row 1 at 0
    assert torch.equal(_trim_after_all_stopped(tokens, 2, eos), tokens[:, :4])
    assert torch.equal(_trim_after_all_stopped(tokens, 2, None), tokens)
    never = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(_trim_after_all_stopped(never, 2, eos), never)

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 4))
    greedy = teal_fx.generate(model, ids, 12, backend="none", eos_token_id=-1)
    stop = int(greedy[0, 6])  # the third new token
    out = teal_fx.generate(model, ids, 12, backend="none", eos_token_id=stop)
    first = int((greedy[0, 4:] == stop).nonzero()[0]) + 4
    assert torch.equal(out, greedy[:, : first + 1])


def test_reuses_one_static_cache_per_size():
    """Same (batch, length): the same cache tensors, zeroed (CUDA graphs keep their addresses); another size
    replaces it; results do not depend on what the previous call left in the cache."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 5))
    a = teal_fx.generate(model, ids, 6, backend="none", eos_token_id=-1)
    cache = held_kv_cache(model)
    keys = cache.layers[0].keys
    b = teal_fx.generate(model, ids, 6, backend="none", eos_token_id=-1)
    assert held_kv_cache(model) is cache and cache.layers[0].keys is keys and torch.equal(a, b)
    teal_fx.generate(model, torch.randint(3, 128, (2, 5)), 6, backend="none", eos_token_id=-1)
    assert held_kv_cache(model) is not cache
    with torch.no_grad():
        assert torch.equal(teal_fx.generate(model, ids, 6, backend="none", eos_token_id=-1), a)


def test_greedy_step_buffers_are_reused_and_never_handed_out():
    """The in-place step's buffers (token, position, stops, sequence) are one set per (batch, cache length, stops or none),
    like the cache, so a CUDA graph's addresses hold across calls; what a call returns or streams is a copy, so the
    next call (another prompt, fewer tokens, a stop) neither changes it nor sees what it left."""
    from teal_fx import state

    model = tiny_model("llama")
    p, q = torch.randint(3, 128, (2, 1, 5))
    long_p = teal_fx.generate(model, p, 12, backend="none", eos_token_id=-1)
    held = state._STEP_BUFFERS[model]
    streamed = []
    short_q = teal_fx.generate(model, q, 4, backend="none", eos_token_id=-1, streamer=streamed.append)
    assert state._STEP_BUFFERS[model] is held  # same batch, cache length and eos use: the same buffers
    assert torch.equal(teal_fx.generate(model, p, 12, backend="none", eos_token_id=-1), long_p)
    assert torch.equal(torch.cat(streamed, 0)[None], short_q[:, 5:])  # streamed copies, not views of the buffer
    assert torch.equal(short_q, teal_fx.generate(model, q, 12, backend="none", eos_token_id=-1)[:, :9])
    assert not any(short_q.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                   for t in (held[1].tokens, held[1].ids))
    stop = int(long_p[0, 7])  # a call that stops leaves its stop flags set: the next call starts from its own
    stopped = teal_fx.generate(model, p, 12, backend="none", eos_token_id=stop)
    assert (stopped[0, 7:] == stop).all() and torch.equal(stopped[:, :8], long_p[:, :8])
    assert state._STEP_BUFFERS[model] is held
    assert torch.equal(teal_fx.generate(model, p, 12, backend="none", eos_token_id=-1), long_p)
    teal_fx.generate(model, torch.randint(3, 128, (2, 5)), 3, backend="none", eos_token_id=-1)
    assert state._STEP_BUFFERS[model] is not held  # another batch: buffers of its own


def test_a_cache_whose_heads_the_config_does_not_give_is_sized_by_the_model():
    """Without ``num_key_value_heads`` in the config (multi-query Falcon in transformers 5.17), the heads are the
    ones the model's keys have (2 here, not the 4 query heads), and the cache comes back zeroed."""
    model = tiny_model("llama", heads=4, kv_heads=2)
    model.config.num_key_value_heads = None
    cache = static_cache(model, 3, 16)
    assert all(layer.keys.shape == (3, 2, 16, 16) and not layer.keys.any() and not layer.values.any()
               for layer in cache.layers)


def test_a_model_that_cannot_fill_a_static_cache_is_named(monkeypatch):
    model = tiny_model("llama")
    model.config.num_key_value_heads = None

    def forward(*args, **kwargs):  # as Bloom's ALiBi under transformers 5.17: sized by the tokens, not the cache
        raise RuntimeError("The expanded size of the tensor (16) must match the existing size (2)")

    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(ValueError, match="LlamaForCausalLM cannot decode into a static cache under transformers"):
        static_cache(model, 1, 16)


def test_max_cache_len_too_small_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_cache_len"):
        teal_fx.generate(model, torch.randint(3, 128, (1, 5)), 6, backend="none", max_cache_len=8)


def test_a_sliding_window_model_decodes_past_the_recompile_limit_compiled():
    """Mistral (window 4096): its sliding layers are cached as full ones, so the compiled step is not specialized on
    a length transformers (5.17, 5.25) counts in a Python int: 80 tokens, more than the loop's limit of 64
    recompiles, and the uncompiled loop's tokens."""
    model = tiny_model("mistral")
    assert model.config.sliding_window is not None
    ids = torch.randint(3, 128, (2, 5))
    compiled = teal_fx.generate(model, ids, 80, backend="aot_eager", eos_token_id=-1)
    assert torch.equal(compiled, teal_fx.generate(model, ids, 80, backend="none", eos_token_id=-1))
    assert model.config.sliding_window == 4096  # the model's config is left as it was


def test_a_window_shorter_than_the_cache_is_kept_by_the_mask():
    """A window of 16 positions over 40 decoded tokens: the cache's full layers under the model's own sliding mask
    give HF generate()'s tokens (its cache keeps the window), compiled through teal too (the decode attention with
    the mask); without the window the tokens differ, so the window is in force."""
    torch.manual_seed(0)
    model = tiny_model("mistral")
    ids = torch.randint(3, 128, (2, 5))
    model.config.sliding_window = None
    unwindowed = teal_fx.generate(model, ids, 40, backend="none", eos_token_id=-1)
    model.config.sliding_window = 16
    hf = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not torch.equal(hf, unwindowed)
    assert torch.equal(teal_fx.generate(model, ids, 40, backend="none", eos_token_id=-1), hf)
    teal_fx.attach_plan(model, teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.0), check=False)
    out = teal_fx.generate(model, ids, 40, eos_token_id=-1, options={"compiler": "eager"})
    assert torch.equal(out, hf)


def test_a_layer_counted_in_a_python_int_is_refused_when_compiled(monkeypatch):
    """Were a sliding layer left in the cache (here: the replacement switched off), a compiled step would recompile
    per token; it is refused with a message, and the uncompiled loop still runs."""
    gen = importlib.import_module("teal_fx.generate")  # the module (teal_fx.generate is also the function)
    monkeypatch.setattr(gen, "_windows_as_full_layers", lambda cfg: cfg)
    model = tiny_model("mistral")
    if not any(hasattr(layer, "cumulative_length_int") for layer in static_cache(model, 1, 256).layers):
        pytest.skip("this transformers counts a sliding layer's length in a tensor")
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="counts in a Python int"):
        teal_fx.generate(model, ids, 4, backend="aot_eager")
    assert teal_fx.generate(model, ids, 4, backend="none").shape == (1, 9)


def test_two_stage_argmax_is_argmax():
    """The greedy pick on large vocabularies (GPU): the first index of the maximum, ties and ragged widths included."""
    from teal_fx.generate import two_stage_argmax

    g = torch.Generator().manual_seed(0)
    for vocab in (1000, 4096, 32003):
        x = torch.randn(3, vocab, generator=g).to(torch.bfloat16)  # bf16: ties happen
        x[1, vocab // 3] = x[1, vocab - 1] = 10.0  # a tie across slices: the earlier index wins
        assert torch.equal(two_stage_argmax(x), x.argmax(-1))
        assert torch.equal(two_stage_argmax(x, chunks=7), x.argmax(-1))


def test_decode_logits_are_the_logits_greedy_decoding_chose_by():
    """Teacher forcing through the lean loop: fed its own greedy tokens, each row's argmax is the token chosen there,
    and the rows equal the full-sequence forward's logits; fed the sparse path, the rows follow the plan."""
    from teal_fx.generate import decode_logits

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 5))
    greedy = teal_fx.generate(model, ids, 7, backend="none", eos_token_id=-1)
    rows = decode_logits(model, greedy, 5, backend="none")
    assert rows.shape == (2, 7, 128) and rows.dtype == torch.float32
    assert torch.equal(rows.argmax(-1), greedy[:, 5:])
    forced = torch.cat([ids, torch.randint(3, 128, (2, 7))], dim=1)  # not what greedy decoding would pick
    with torch.no_grad():
        full = model(forced, use_cache=False).logits[:, 4:-1].float()
    torch.testing.assert_close(decode_logits(model, forced, 5, backend="none"), full, rtol=1e-4, atol=1e-4)

    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.8)
    teal_fx.attach_plan(model, plan, check=False)
    sparse = decode_logits(model, greedy, 5, options={"compiler": "eager"})
    with masked_inputs(model, plan, sparse_from=1.0):
        ref = decode_logits(model, greedy, 5, backend="none")
    torch.testing.assert_close(sparse[:, 1:], ref[:, 1:], rtol=1e-4, atol=1e-4)  # row 0: the prefill (dense)
    assert (sparse[:, 1:] - rows[:, 1:]).abs().max() > 1e-3  # the plan did change the decode steps
    teal_fx.detach_plan(model)

    with pytest.raises(ValueError, match="prompt"):
        decode_logits(model, greedy, 12, backend="none")


def test_argmax_disagreements_report_the_reference_gap():
    from teal_fx.generate import argmax_disagreements

    ref = torch.tensor([[0.0, 2.0, 1.0], [3.0, 2.9, 0.0], [0.0, 0.0, 5.0]])
    other = torch.tensor([[0.0, 2.0, 1.5], [2.8, 2.9, 0.0], [0.0, 0.0, 4.0]])
    got = argmax_disagreements(ref, other)
    assert [(s, a, b) for s, a, b, _ in got] == [(1, 0, 1)]
    assert abs(got[0][3] - 0.1) < 1e-6
    assert argmax_disagreements(ref, ref) == []
    with pytest.raises(ValueError):
        argmax_disagreements(ref, other[:2])


def test_a_mode_and_inductor_options_reach_torch_compile_together(monkeypatch):
    """torch.compile takes a mode or options, not both: the loop folds mode="reduce-overhead" into Inductor's options
    (CUDA graphs) instead of dropping it, and into the teal backend's options as its ``mode`` key."""
    from teal_fx.generate import _compiled

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    model = tiny_model("llama")
    _compiled(model, "inductor", "reduce-overhead", {"coordinate_descent_tuning": True})
    _compiled(model, "teal", "reduce-overhead", {"decode_attention": False})
    _compiled(model, "inductor", "reduce-overhead", None)
    assert seen[0]["options"] == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    assert "mode" not in seen[0]
    assert seen[1]["options"] == {"decode_attention": False, "mode": "reduce-overhead"}
    assert seen[2]["mode"] == "reduce-overhead" and "options" not in seen[2]
    with pytest.raises(ValueError, match="mode and options"):
        _compiled(model, "aot_eager", "reduce-overhead", {"x": 1})


@pytest.mark.parametrize("eos", ["none", "row 1 stops"])
def test_greedy_pick_and_stop_flags_compile_with_the_step(monkeypatch, eos):
    """Greedy decoding compiles ``greedy_step`` for the prefill (the model call, the argmax and the stop flags in one
    frame) and ``greedy_step_in_place`` for the steps, sampling the model call alone; the compiled greedy loop gives
    the uncompiled loop's tokens, stops and stream."""
    frames = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: frames.append(fn) or compile_(fn, **kw))
    model = tiny_model("mistral")
    ids = torch.randint(3, 128, (3, 4))
    greedy = teal_fx.generate(model, ids, 6, backend="none", eos_token_id=-1)
    stop = None if eos == "none" else int(greedy[1, 5])
    ref = teal_fx.generate(model, ids, 6, backend="none", eos_token_id=stop)
    streamed = []
    out = teal_fx.generate(model, ids, 6, backend="aot_eager", eos_token_id=stop, streamer=streamed.append)
    assert torch.equal(out, ref) and torch.equal(torch.stack(streamed, 1), out[:, 4:])
    assert frames == [greedy_step, greedy_step_in_place]
    if stop is not None:
        assert (out[1, 5:] == stop).all() and not (out[0, 4:] == stop).all()
    teal_fx.generate(model, ids, 3, backend="aot_eager", do_sample=True, generator=torch.Generator().manual_seed(0))
    assert frames == [greedy_step, greedy_step_in_place, torch.nn.Module.__call__]
