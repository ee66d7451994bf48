"""Loading models: the GGUF cache is keyed on the file's content, not its name and size (issue 24, item 4)."""
import torch

from teal_fx.models import _gguf_cache_dir, content_digest


def test_same_name_and_size_other_content_gets_another_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAL_FX_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for p in (a, b):
        p.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(3 << 20))
    b.write_bytes(b"GGUF" + bytes(3 << 20))
    assert _gguf_cache_dir(a, torch.float32) == _gguf_cache_dir(b, torch.float32)  # same content: one cache
    with b.open("r+b") as f:  # one byte of the header changed
        f.seek(100)
        f.write(b"x")
    assert a.stat().st_size == b.stat().st_size and a.name == b.name
    assert _gguf_cache_dir(a, torch.float32) != _gguf_cache_dir(b, torch.float32)
    assert _gguf_cache_dir(a, torch.float32) != _gguf_cache_dir(a, torch.bfloat16)
    assert content_digest(a) == content_digest(a)
