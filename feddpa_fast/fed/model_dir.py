"""``--model DIR`` checked before anything loads it: a bad directory gets one line naming the
file (malformed config.json, no or truncated weights, no tokenizer), not a transformers
traceback, and a mistyped model name gets a suggestion."""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from .options import ConfigError

__all__ = ["MODEL_NAMES", "check_model_dir"]

MODEL_NAMES = ("builtin", "smollm2")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Any one of these lets AutoTokenizer load without a hub (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_model_dir(model: str) -> None:
    """Raises ConfigError naming ``--model`` and the faulty file; returns for the built-in
    names and for a directory that looks loadable."""
    if model in MODEL_NAMES:
        return
    path = Path(model)
    if not path.is_dir():
        close = difflib.get_close_matches(model, MODEL_NAMES, n=1)
        hint = f" (did you mean --model {close[0]}?)" if close else ""
        raise ConfigError(f"--model {path}: no such directory, and not one of the built-in "
                          f"names {', '.join(MODEL_NAMES)}{hint}")
    _check_config(path / "config.json")
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise ConfigError(f"--model {path}: no weights there (looked for "
                          f"{', '.join(WEIGHT_FILES)})")
    if weights[0].name == "model.safetensors":
        _check_safetensors(weights[0])
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--model {path}: no tokenizer files there (looked for "
                          f"{', '.join(TOKENIZER_FILES)}; save the tokenizer with the model)")


def _check_config(config: Path) -> None:
    if not config.is_file():
        raise ConfigError(f"--model {config.parent}: no config.json there, so it is not a "
                          "Hugging Face model directory (save_pretrained writes one)")
    try:
        parsed = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--model: {config} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ConfigError(f"--model: {config} has no model_type (not a transformers config)")


def _check_safetensors(weights: Path) -> None:
    """The header parses and the file is as long as the tensors it declares."""
    size = weights.stat().st_size
    try:
        with weights.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError(f"header length {header_len} of a {size}-byte file")
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items()
                if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--model: {weights} is not a readable safetensors file "
                          f"({exc})") from None
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ConfigError(f"--model: {weights} is truncated ({size:,} bytes; its header "
                          f"declares {needed:,})")
