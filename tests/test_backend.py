"""Backend registration, options, dumps."""
import importlib.metadata
import subprocess
import sys
import textwrap

import torch

import teal_fx
from teal_fx.plan import Plan
from tests.conftest import masked_inputs, tiny_model


def test_registered_by_import_and_entry_point():
    assert "teal" in torch._dynamo.list_backends(exclude_tags=())
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "teal" and ep.value == "teal_fx.backend:teal_backend" for ep in eps)


def test_entry_point_works_without_import(tmp_path):
    code = textwrap.dedent("""
        import sys, torch, torch.nn as nn
        f = torch.compile(lambda x: x * 2, backend="teal", options={"compiler": "eager"})
        print(f(torch.ones(2)).sum().item())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("4.0")


def test_dump_writes_code_table_and_dot(tmp_path):
    model = tiny_model("phi3")
    plan = Plan.from_thresholds(teal_fx.find_linears(model), 0.25)
    compiled = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager", "dump": str(tmp_path)})
    with torch.no_grad():
        compiled(torch.tensor([[3]]), use_cache=False)
    (g,) = list(tmp_path.iterdir())
    assert {p.name for p in g.iterdir()} >= {"before.py", "after.py", "linears.txt", "summary.txt", "block_0.dot"}
    assert "teal.sparse_linear" in (g / "after.py").read_text()
    assert "teal.sparse_linear" not in (g / "before.py").read_text()
    table = (g / "linears.txt").read_text()
    assert "qkv" in table and "gate_up" in table and "0.25" in table
    dot = (g / "block_0.dot").read_text()
    assert dot.startswith('digraph "block_0"') and "qkv" in dot and "gate_up" in dot


def test_linear_table_without_compiling():
    model = tiny_model("gemma")
    table = teal_fx.linear_table(model)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["block", "role", "key", "shape"]
    assert len(lines) == 2 + 14
    assert "model.layers.1.mlp.down_proj.weight" in table


def test_a_graph_copied_for_another_plan_keeps_what_marks_its_static_inputs():
    """Variants for later plans are compiled from a copy of the captured graph; AOTAutograd tells static inputs
    (parameters, a KV cache Dynamo marked static) by ``_param_name_to_source`` and each placeholder's
    ``_dynamo_source``. Lost in the copy, the variant's cache writes were "mutated inputs" and CUDA graphs were
    skipped (docs/perf-log.md v24)."""
    from teal_fx.backend import _copy_graph

    model = tiny_model("llama")
    captured = []

    def keep(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=keep)(torch.randint(3, 100, (1, 4)), use_cache=False)
    gm = captured[0]
    copy = _copy_graph(gm)
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new = [n for n in copy.graph.nodes if n.op == "placeholder"]
    assert len(new) == len(old) > 0 and all(hasattr(n, "_dynamo_source") for n in old)
    assert [n._dynamo_source for n in new] == [n._dynamo_source for n in old]
    assert getattr(copy, "_param_name_to_source", None) is getattr(gm, "_param_name_to_source", None)
    assert copy.meta.get("dynamo_compile_id") == gm.meta.get("dynamo_compile_id")


def test_regional_compilation_one_graph_served_to_every_layer():
    """``layer.compile(backend="teal")`` per decoder layer (regional compilation): Dynamo traces the layer's forward
    once, in a frame whose source paths start at the layer, and serves that graph to every layer. Keys come from
    the weights' identities, and each layer gets the variant compiled for its own thresholds."""
    model = tiny_model("llama", layers=3)
    plan = teal_fx.calibrate(model, torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(0)),
                             sparsity=0.5, num_sequences=4, seq_len=48, greedy_sequences=2, progress=False)
    assert len({plan.threshold(k) for k in plan.linears if ".q_proj." in k}) == 3  # the layers' thresholds differ
    for layer in model.model.layers:
        layer.compile(backend="teal", options={"compiler": "eager"})
    ids = torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, use_cache=False).logits
        for layer in model.model.layers:
            layer._compiled_call_impl = None
        with masked_inputs(model, plan):
            ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
