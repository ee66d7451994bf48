"""The rewrite preserves meaning: the compiled model equals an independent reference (hooks masking each block
linear's input by its threshold), for drawn architectures, sizes, dtypes, batch/sequence lengths and thresholds."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import teal_fx
from teal_fx.generate import cache_kwarg
from teal_fx.passes import PassContext, run_passes
from teal_fx.passes.analysis.dataflow import is_linear
from tests.conftest import ARCHS, EXPECTED_ROLES, logits_per_option, masked_inputs, tiny_model

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def plan_for(model, thresholds, prefill_sparse_from=1.0):
    found = teal_fx.find_linears(model)
    per_key = {m.key: thresholds[i % len(thresholds)] for i, m in enumerate(found)}
    plan = teal_fx.Plan.from_thresholds(found, per_key, model="tiny", prefill_sparse_from=prefill_sparse_from)
    return plan


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(sorted(ARCHS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    hidden_heads=st.sampled_from([(32, 2), (48, 4), (64, 4)]),
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    thresholds=st.lists(st.floats(0.0, 1.5), min_size=1, max_size=7),
    all_tokens=st.booleans(),
)
def test_compiled_equals_masked_reference(arch, dtype, hidden_heads, batch, seq, thresholds, all_tokens):
    torch._dynamo.reset()
    hidden, heads = hidden_heads
    model = tiny_model(arch, hidden=hidden, heads=heads, kv_heads=heads // 2, dtype=dtype)
    plan = plan_for(model, thresholds, prefill_sparse_from=0.0 if all_tokens else 1.0)
    ids = torch.randint(3, 128, (batch, seq))
    compiled = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager"})
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        sparse_from = 0.0 if all_tokens else 1.0
        with masked_inputs(model, plan, sparse_from=sparse_from):
            ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_threshold_zero_equals_eager_and_prefill_stays_dense():
    model = tiny_model("llama")
    plan = plan_for(model, [0.0])
    compiled = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager"})
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    torch._dynamo.reset()
    big = plan_for(model, [10.0])  # would zero nearly everything if applied
    compiled = torch.compile(model, backend="teal", options={"plan": big, "compiler": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_decode_step_sparse_prefill_dense_with_kv_cache():
    """Prefill through the compiled model is dense; the next one-token step is sparsified."""
    model = tiny_model("mistral")
    plan = plan_for(model, [0.4, 0.7])
    compiled = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager"})
    ids = torch.randint(3, 128, (1, 6))
    nxt = torch.randint(3, 128, (1, 1))
    with torch.no_grad():
        c_pre = compiled(ids, use_cache=True)
        c_dec = compiled(nxt, **{cache_kwarg(model): c_pre.past_key_values}, use_cache=True).logits
        r_pre = model(ids, use_cache=True)
        with masked_inputs(model, plan):
            r_dec = model(nxt, **{cache_kwarg(model): r_pre.past_key_values}, use_cache=True).logits
        dense_dec = model(nxt, **{cache_kwarg(model): model(ids, use_cache=True).past_key_values}).logits
    torch.testing.assert_close(c_pre.logits, r_pre.logits)
    torch.testing.assert_close(c_dec, r_dec, atol=1e-4, rtol=1e-4)
    assert (c_dec - dense_dec).abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rewritten_nodes_are_exactly_the_block_linears(arch):
    model = tiny_model(arch, layers=3)
    plan = plan_for(model, [0.3])
    graphs, _ = teal_fx.capture_graphs(model, dict(input_ids=torch.tensor([[4]]), use_cache=False))
    (cg,) = graphs
    ctx = PassContext(plan=plan)
    gm = run_passes(cg.gm, ctx)
    # sparse_linear, sparse_linear_add_rmsnorm, getitems of a group, sparse_swiglu, sparse_mlp_add_rmsnorm
    ops = [n for n in gm.graph.nodes if "teal" in n.meta]
    swiglus = [n for n in ops if n.target is torch.ops.teal.sparse_swiglu.default]  # each stands for gate and up
    mlps = [n for n in ops if n.target is torch.ops.teal.sparse_mlp_add_rmsnorm.default]  # gate, up and down
    assert len(ops) + len(swiglus) + 2 * len(mlps) == len(EXPECTED_ROLES[arch]) * 3
    group_op = torch.ops.teal.sparse_linear_group.default
    fused_norm = torch.ops.teal.sparse_linear_add_rmsnorm.default
    singles = [n for n in ops if n.target in (torch.ops.teal.sparse_linear.default, fused_norm)]
    # a decode graph: o and down take their residual add and the next RMSNorm where it is Llama's (not Gemma's 1 + w)
    llama_norm = not arch.startswith("gemma")
    assert sum(n.target is fused_norm for n in singles) + len(mlps) == (2 * 3 if llama_norm else 0)
    groups = [n for n in gm.graph.nodes if n.target is group_op]
    roles = set(EXPECTED_ROLES[arch])
    if {"q", "k", "v", "gate", "up"} <= roles:  # separate projections sharing an input: q/k/v and gate/up grouped
        # silu(gate) * up is fused into one op, folded into down's where down takes the add + RMSNorm; Gemma's gelu
        # MLP is left as a gate/up group
        silu = "silu" in (getattr(model.config, "hidden_act", None), getattr(model.config, "hidden_activation", None))
        assert len(groups) == (1 if silu else 2) * 3 and len(swiglus) + len(mlps) == (3 if silu else 0)
        assert len(mlps) == (3 if silu and llama_norm else 0)
        assert {n.meta["teal"].role for n in singles} | {n.meta["teal_down"].role for n in mlps} == {"o", "down"}
        for g in groups:
            assert {u.meta["teal"].role for u in g.users} in ({"q", "k", "v"}, {"gate", "up"})
        assert all((n.meta["teal"].role, n.meta["teal_up"].role) == ("gate", "up") for n in swiglus + mlps)
        assert all(n.meta["teal_down"].role == "down" for n in mlps)
    else:  # fused qkv / gate_up weights (Phi-3): nothing shares an input
        assert not groups and not swiglus and not mlps and len(singles) == len(ops)
    keys = [n.meta["teal"].key for n in ops] + [n.meta["teal_up"].key for n in swiglus + mlps] + \
        [n.meta["teal_down"].key for n in mlps]
    assert sorted(keys) == sorted(plan.linears)
    remaining = [n for n in gm.graph.nodes if is_linear(n)]
    assert len(remaining) == 1 and "lm_head" in str(remaining[0].meta.get("nn_module_stack"))
    for n in ops:  # the fake value is still the right one
        v = n.meta["example_value"]
        v = v[0] if n.target is fused_norm or n in mlps else v  # (h, norm(h))
        assert v.shape[-1] == n.meta["teal_down" if n in mlps else "teal"].shape[0]


def test_plan_sparsity_reaches_the_ops():
    """The plan's sparsity per linear rides along as the ops' variant hint (-1 where the plan has none)."""
    import dataclasses

    model = tiny_model("llama", layers=2)
    plan = plan_for(model, [0.3])
    keys = sorted(plan.linears)
    hints = {k: (None if i % 3 == 0 else 0.1 * (i % 9)) for i, k in enumerate(keys)}
    plan.linears = {k: dataclasses.replace(lp, sparsity=hints[k]) for k, lp in plan.linears.items()}
    graphs, _ = teal_fx.capture_graphs(model, dict(input_ids=torch.tensor([[4]]), use_cache=False))
    gm = run_passes(graphs[0].gm, PassContext(plan=plan))
    seen = {}
    for n in gm.graph.nodes:
        if n.target in (torch.ops.teal.sparse_linear.default, torch.ops.teal.sparse_linear_add_rmsnorm.default):
            seen[n.meta["teal"].key] = n.args[5]
        elif n.target is torch.ops.teal.sparse_linear_group.default:
            for item in n.users:
                seen[item.meta["teal"].key] = n.args[5][item.args[1]]
        elif n.target is torch.ops.teal.sparse_swiglu.default:  # (gate, up)
            seen[n.meta["teal"].key], seen[n.meta["teal_up"].key] = n.args[6]
        elif n.target is torch.ops.teal.sparse_mlp_add_rmsnorm.default:  # (gate, up, down)
            seen[n.meta["teal"].key], seen[n.meta["teal_up"].key], seen[n.meta["teal_down"].key] = n.args[9]
    assert seen == {k: -1.0 if h is None else h for k, h in hints.items()}


def test_inductor_end_to_end_cpu():
    model = tiny_model("qwen3")
    plan = plan_for(model, [0.2, 0.5])
    compiled = torch.compile(model, backend="teal", options={"plan": plan})  # Inductor on CPU
    nxt = torch.randint(3, 128, (2, 1))
    with torch.no_grad():
        out = compiled(nxt, use_cache=False).logits
        with masked_inputs(model, plan):
            ref = model(nxt, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_grouping_off_gives_the_same_logits():
    """group_shared_input is an optimisation only: with and without it the compiled model agrees exactly (CPU)."""
    model = tiny_model("llama", layers=2)
    plan = plan_for(model, [0.1, 0.6, 0.3])
    outs = logits_per_option(model, plan, torch.randint(3, 128, (2, 1)), "group_shared_input")
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # the patch is the same
@given(batch=st.integers(1, 4), shared=st.booleans(), thresholds=st.lists(st.floats(0.0, 1.5), min_size=1, max_size=7))
def test_linears_the_kernel_cannot_win_stay_dense_with_their_input_masked(monkeypatch, batch, shared, thresholds):
    """Where the dispatch rule says cuBLAS wins (per-row unions on a GPU; forced here on the CPU), the decode graph
    keeps each linear and masks its input in the graph instead of calling the sparse op: same logits as the
    reference, no teal::sparse_* node left."""
    import dataclasses
    import importlib

    isl = importlib.import_module("teal_fx.passes.insert_sparse_linear")  # the module, not the pass it exports
    monkeypatch.setattr(isl, "_kernel_pays", lambda x, w, sparsity, shared: False)
    torch._dynamo.reset()
    model = tiny_model("llama")
    plan = dataclasses.replace(plan_for(model, thresholds), batch_mask="shared" if shared else "per_row")
    ids = torch.randint(3, 128, (batch, 1))
    graphs = []

    def capture(gm, example_inputs):
        ctx = PassContext(plan=plan)
        out = run_passes(gm, ctx)
        graphs.append(out)
        return out.forward

    with torch.no_grad():
        got = torch.compile(model, backend=capture)(ids, use_cache=False).logits
        with masked_inputs(model, plan, sparse_from=1.0):
            ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert not any(t.startswith("teal.sparse") for t in targets)
    assert sum("sparsify" in t for t in targets) == len(plan)
