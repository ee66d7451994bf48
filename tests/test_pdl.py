"""When launches use programmatic dependent launch (kernels/pdl.py): never on the CPU or in the interpreter, so CPU
runs and CI take the plain path; the GPU side is in tests/test_gpu.py."""
import torch

from teal_fx.kernels import pdl


def test_never_on_cpu_or_in_the_interpreter(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))  # decided before any CUDA query


def test_off_switch(monkeypatch):
    monkeypatch.setenv("TEAL_PDL", "0")
    assert not pdl.enabled(torch.device("cuda", 0))
