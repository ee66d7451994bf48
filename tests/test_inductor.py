"""The backend's Inductor settings (teal_fx/inductor.py): Inductor's own PDL only with every kernel waiting before
its first access, on by default where the teal kernels use PDL and no gradients are recorded."""
import torch

from teal_fx import inductor
from teal_fx.kernels import pdl


def test_backend_defaults_leave_inductors_own_dependent_launches_out():
    """Inductor's PDL as it comes waits only for the node just before each kernel; around the backend's opaque ops
    that raced (docs/design.md, "Launch boundaries"), so it is never in the plain Inductor patch: only through ``inductor_pdl``."""
    from teal_fx.inductor import CUDA_INDUCTOR_DEFAULTS as settings

    assert "triton.enable_pdl" not in settings and settings.get("combo_kernels") is True


class _Buffer:
    def __init__(self):
        self.lines = []

    def writeline(self, line):
        self.lines.append(line)


class _Kernel:
    """What ``_wait_before_any_access`` touches of an Inductor TritonKernel."""
    GDC_WAIT = "tl.extra.cuda.gdc_wait()"

    def __init__(self, pdl_on=True, looped_reduction=False):
        self.pdl_on = pdl_on
        self.inside_reduction = looped_reduction
        self.range_trees = [type("Tree", (), {"is_loop": looped_reduction})()]
        self.body = _Buffer()

    def _enable_pdl_codegen(self):
        return self.pdl_on


def test_inductor_kernels_wait_before_every_access_whatever_it_depends_on():
    """Inductor's hook waits only before reading what the previous scheduler node wrote; the replacement waits
    before any access (a dependency Inductor does not see, such as a teal op's output, included)."""
    k, buf = _Kernel(), _Buffer()
    inductor._wait_before_any_access(k, buf, "buf_the_previous_node_never_wrote")
    assert buf.lines == [k.GDC_WAIT]
    k = _Kernel(looped_reduction=True)
    inductor._wait_before_any_access(k, buf, "x")
    assert k.body.lines == [k.GDC_WAIT] and len(buf.lines) == 1  # hoisted before the loop, as Inductor does
    k = _Kernel(pdl_on=False)
    inductor._wait_before_any_access(k, buf, "x")
    assert len(buf.lines) == 1 and not k.body.lines  # no PDL codegen: nothing written


def test_wait_first_hook_is_swapped_in_only_inside_the_context():
    from torch._inductor.codegen.triton import TritonKernel

    assert inductor.inductor_supports_wait_first()
    original = TritonKernel.__dict__["_handle_pdl_before_access"]
    with inductor.inductor_kernels_wait_first():
        assert TritonKernel._handle_pdl_before_access is inductor._wait_before_any_access
    assert TritonKernel.__dict__["_handle_pdl_before_access"] is original


def test_backend_turns_inductors_pdl_on_only_with_waits_first_and_a_cache_marker(monkeypatch):
    from torch._inductor.codegen.triton import TritonKernel

    from teal_fx.inductor import inductor_pdl

    original = TritonKernel.__dict__["_handle_pdl_before_access"]
    for device in (None, torch.device("cpu")):  # the option off, or a device without PDL: nothing changes
        patches = {"combo_kernels": True}
        with inductor_pdl(patches, device):
            assert TritonKernel.__dict__["_handle_pdl_before_access"] is original
        assert patches == {"combo_kernels": True}

    monkeypatch.setattr(pdl, "enabled", lambda device: True)  # as on an sm_90 GPU
    patches = {}
    with inductor_pdl(patches, torch.device("cuda", 0)):  # gradients on: a backward would be compiled later
        assert TritonKernel.__dict__["_handle_pdl_before_access"] is original
    assert patches == {}
    with torch.no_grad(), inductor_pdl(patches, torch.device("cuda", 0)):  # as decoding compiles
        assert TritonKernel._handle_pdl_before_access is inductor._wait_before_any_access
    assert patches["triton.enable_pdl"] is True
    assert "wait" in patches["post_grad_custom_post_pass"].uuid()  # cached code never mixes with unpatched code
    assert TritonKernel.__dict__["_handle_pdl_before_access"] is original

    patches = {"triton.enable_pdl": True}  # the caller's own patch, option off: still made to wait first
    with inductor_pdl(patches, None):
        assert TritonKernel._handle_pdl_before_access is inductor._wait_before_any_access

    taken = {"triton.enable_pdl": True, "post_grad_custom_post_pass": object()}  # no room for the marker
    with inductor_pdl(taken, None):
        import torch._functorch.config as functorch_config

        assert taken["fx_graph_cache"] is False and functorch_config.enable_autograd_cache is False

    patches = {"triton.enable_pdl": False}  # turned off by the caller: left off
    with torch.no_grad(), inductor_pdl(patches, torch.device("cuda", 0)):
        assert TritonKernel.__dict__["_handle_pdl_before_access"] is original
    assert patches == {"triton.enable_pdl": False}


def test_backend_optioninductor_pdl():
    from teal_fx.options import TealOptions

    assert TealOptions.parse(None, None).inductor_pdl is True
    assert TealOptions.parse({"inductor_pdl": False}, None).inductor_pdl is False


def test_a_torch_without_the_hook_keeps_inductors_pdl_off_or_refuses_it(monkeypatch):
    import pytest

    from teal_fx.inductor import inductor_pdl

    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    monkeypatch.setattr(inductor, "inductor_supports_wait_first", lambda: False)
    patches = {}
    with torch.no_grad(), inductor_pdl(patches, torch.device("cuda", 0)):  # the backend's default: quietly left off
        pass
    assert patches == {}
    with pytest.raises(ValueError, match="wait before reading"):  # asked for by the caller: refused, not racy
        with inductor_pdl({"triton.enable_pdl": True}, None):
            pass


_FALLBACKS = """
import json, logging, sys, torch, teal_fx
from teal_fx import inductor
from teal_fx.kernels.ops import registered_ops
from tests.conftest import tiny_model
from torch._inductor.lowering import maybe_layout_constraints

if sys.argv[1] == "implicit":
    inductor.register_fallbacks = lambda: None
implicit = []

class Record(logging.Handler):
    def emit(self, record):
        if record.msg.startswith("Creating implicit fallback"):
            implicit.append(record.getMessage().split("target: ")[1].split()[0])

log = logging.getLogger("torch._inductor.graph")
log.setLevel(logging.INFO)
log.addHandler(Record())
model = tiny_model("llama", layers=2, hidden=128, inter=256)
teal_fx.attach_plan(model, teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3))
teal_fx.generate(model, torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0)), 3, eos_token_id=-1)
constraints = {str(op): getattr(maybe_layout_constraints(op), "__name__", None) for op in registered_ops()}
print(json.dumps({"implicit": sorted(set(implicit)), "constraints": constraints}))
"""


def _lower_decode_graphs(fallbacks: str) -> dict:
    """A tiny model's prefill and decode graphs through the backend and Inductor in a fresh process (fallbacks are
    process-wide), with Inductor's INFO log of implicit fallbacks recorded: which teal ops went that way, and the
    layout constraint each teal op ended with."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # a cached graph is not lowered
    run = subprocess.run([sys.executable, "-c", _FALLBACKS, fallbacks], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parents[1], env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_teal_ops_never_take_inductors_implicit_fallback_and_keep_its_layout_constraints():
    """Before torch 2.13 Inductor formats the IR arguments of an op's first lowered call for its implicit-fallback log,
    log off or not, and that text doubles per layer (a 32-layer compile hung: docs/perf-log.md v63). The backend
    registers the fallbacks first, with the constraints the implicit path picks: the control run (registration off)
    shows the implicit path taken and the constraints it chose."""
    implicit, registered = _lower_decode_graphs("implicit"), _lower_decode_graphs("registered")
    met = set(implicit["implicit"])
    assert {"teal.sparse_attention_add_rmsnorm.default", "teal.sparse_mlp_add_rmsnorm.default"} <= met
    assert not any(op.startswith("teal.") for op in registered["implicit"]), registered["implicit"]
    assert {op: c for op, c in registered["constraints"].items() if op in met} == \
        {op: c for op, c in implicit["constraints"].items() if op in met}
    assert registered["constraints"]["teal.decode_attention.default"] is None  # the ANY_STRIDES tag
    assert registered["constraints"]["teal.sparse_linear.default"] is not None
