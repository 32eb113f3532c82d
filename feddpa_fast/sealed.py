"""Safetensors files that carry the SHA-256 of their own tensor bytes, checked when read.

NaN, shape, key and truncation errors are caught by the readers already; a finite value that
changed on disk (one flipped exponent bit turned a weight into 3e37 and a resumed run moved
its final P from 25 % to 50 %) is not. The digest sits in the file's own metadata (key
``sha256``), so file and digest are written by one atomic rename: no manifest can be left out
of step with its file by a kill between two writes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import FeddpaError

__all__ = ["DIGEST_KEY", "IntegrityError", "read_sealed", "sealed_bytes"]

DIGEST_KEY = "sha256"


class IntegrityError(FeddpaError, ValueError):
    """A sealed file that is unreadable or whose tensors do not match its digest."""


def _split(blob: bytes) -> tuple[dict, bytes]:
    """(header JSON, tensor data section) of a safetensors blob."""
    header_len = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + header_len]), blob[8 + header_len:]


def sealed_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors blob of ``tensors`` whose metadata holds ``metadata`` plus the SHA-256 of
    the tensor data section (the data section does not depend on the metadata)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _, data = _split(st_save(tensors, metadata=dict(metadata)))
    return st_save(tensors, metadata={**metadata, DIGEST_KEY: hashlib.sha256(data).hexdigest()})


def read_sealed(path: str | os.PathLike, required: bool = True
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written from ``sealed_bytes``, verified.

    Args:
        path: the file.
        required: a file without a digest (written before digests existed) is refused when
            True, accepted unverified when False.
    Raises:
        FileNotFoundError: no such file. IntegrityError: unreadable, or the digest differs
            (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    blob = path.read_bytes()
    try:
        tensors = st_load(blob)
        header, data = _split(blob)
    except (SafetensorError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable safetensors file ({exc})") from None
    metadata = header.get("__metadata__") or {}
    digest = metadata.get(DIGEST_KEY)
    if digest is None:
        if required:
            raise IntegrityError(f"{path}: no {DIGEST_KEY} digest in its metadata")
    elif hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{path}: its tensors do not match the SHA-256 recorded when it "
                             "was written (the file changed on disk); nothing was loaded")
    return tensors, metadata
