"""The wire format of the federated loop (docs/ARCHITECTURE.md §5): each message is one
safetensors blob.

Layout (safetensors spec): an 8-byte little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}``,
then the byte buffer; offsets are relative to the buffer start, tensors are little-endian and
C-contiguous. Tensor names are PEFT's (``base_model.model.<module>.lora_A.weight``), metadata is
``{"format": "pt", "schema", "round", "client", "num_examples"}`` (ints as decimal strings).

``decode`` treats the blob as hostile and checks, in this order, before allocating anything
proportional to a declared size:
 1. type (bytes / bytearray / memoryview) and total length <= ``max_bytes``;
 2. length >= 8; header length ``N`` <= ``HEADER_CAP`` (SizeLimitError), then <= what follows;
 3. header is strict UTF-8 JSON, an object, with no duplicate key at any depth;
 4. every entry: an object with exactly dtype / shape / data_offsets; dtype in ``DTYPES``; shape a
    list of ints >= 0; declared size not larger than the buffer (SizeLimitError); offsets two ints
    with 0 <= begin <= end <= len(buffer) and end - begin == numel * itemsize;
 5. the entries tile the buffer exactly: no overlap, no gap, no trailing bytes;
 6. key set, shapes and dtypes equal to ``expected``;
 7. metadata: an object of UTF-8 strings (no lone surrogates) with format "pt", ``schema``, round
    and num_examples canonical decimal ints >= 0, client non-empty; round / client equal to what
    the caller expects;
 8. only then the tensors are copied out of their checked byte ranges, and must be finite.
Every failure is a ``WireError`` subclass naming the key or field. Nothing is ever unpickled: the
tensors are read with ``torch.frombuffer``, so no second parser can disagree with these checks.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Mapping

import torch
from safetensors.torch import save

from ..errors import FeddpaError

__all__ = ["encode", "decode", "cast", "SCHEMA", "DTYPES", "WIRE_DTYPES", "HEADER_CAP",
           "WireError", "BlobFormatError", "SizeLimitError", "SchemaError", "MetadataError",
           "NonFiniteError"]

SCHEMA = "feddpa_fast/adapter/1"
# Floating dtypes an adapter can be trained in. F64 is left out on purpose: nothing here trains
# in fp64, and it would only double the bytes on the wire.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_NAMES = {v: k for k, v in DTYPES.items()}
# What ``--wire-dtype`` names: the dtype tensors travel in (the server aggregates in fp64).
# "fp32", the default, sends the tensors as they are: the trainer's adapters are fp32.
WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# ~100 header bytes per tensor: 1 MiB is room for ~10k adapter matrices (a 7B model with all
# linear layers targeted has 448), and caps the JSON parser's work on a hostile blob.
HEADER_CAP = 1 << 20
_INT_MAX = (1 << 63) - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")   # canonical: "7", never "07", "+7", " 7" or "٧"
_REQUIRED = ("format", "schema", "round", "client", "num_examples")


class WireError(FeddpaError, ValueError):
    """A message that is not a valid blob of the federated loop."""


class BlobFormatError(WireError):
    """Not a well-formed safetensors blob."""


class SizeLimitError(WireError):
    """A blob, header or declared tensor larger than the limits."""


class SchemaError(WireError):
    """Tensors whose names, shapes or dtypes differ from the expected ones."""


class MetadataError(WireError):
    """Metadata missing, malformed, or not what the receiver expects."""


class NonFiniteError(WireError):
    """A tensor holding NaN or Inf."""


def _short(x) -> str:   # a hostile header may hold a 1 MiB name: keep log lines short
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"tensor {name!r} has NaN or Inf values")


def cast(tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """``tensors`` in the dtype ``--wire-dtype`` names.

    Args:
        tensors: name -> floating-point tensor.
        wire_dtype: a key of ``WIRE_DTYPES``: "bf16" or "fp16" cast; "fp32" leaves the
            tensors in their own dtype (fp32 for the trainer's adapters).
    Returns:
        name -> tensor in that dtype.
    """
    dtype = WIRE_DTYPES[wire_dtype]
    return {k: v if dtype is None or v.dtype == dtype else v.to(dtype)
            for k, v in tensors.items()}


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> bytes:
    """Serialises ``tensors`` (CPU contiguous copies) and ``meta`` into one safetensors blob.
    Refuses what ``decode`` would refuse (dtype, non-finite values, metadata), so a sender
    learns of a bad update at once rather than from a silent drop at the server.

    Args:
        tensors: name -> floating-point tensor (the adapter's update).
        meta: the message's metadata (round, sender, num_examples, ...; module docstring).
    Returns:
        The blob, as bytes.
    Raises:
        WireError (a ValueError): a dtype, a non-finite value or metadata that ``decode``
            would reject.
    """
    if not isinstance(tensors, Mapping) or not isinstance(meta, Mapping):
        raise TypeError("encode takes a mapping of tensors and a mapping of metadata")
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than "
                             f"'__metadata__', got {name!r}")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise TypeError(f"value of {name!r} must be a dense torch.Tensor, got {type(t)}")
        if t.dtype not in _NAMES:
            raise SchemaError(f"tensor {name!r} has dtype {t.dtype}, not one of {list(DTYPES)}")
        t = t.detach().to("cpu", copy=True).contiguous()
        _check_finite(name, t)
        out[name] = t
    md = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            raise MetadataError(f"metadata keys must be strings, got {key!r}")
        if key in ("round", "num_examples"):
            if not _is_int(value) or not 0 <= value <= _INT_MAX:
                raise MetadataError(f"metadata {key!r} must be an int in [0, 2**63), got {value!r}")
            value = str(value)
        elif not isinstance(value, str):
            raise MetadataError(f"metadata {key!r} must be a string, got {type(value).__name__}")
        md[key] = value
    md.setdefault("schema", SCHEMA)
    if md.setdefault("format", "pt") != "pt":
        raise MetadataError(f"metadata 'format' must be 'pt', got {md['format']!r}")
    for key in ("round", "client", "num_examples"):
        if key not in md:
            raise MetadataError(f"metadata {key!r} is missing")
    if not md["client"]:
        raise MetadataError("metadata 'client' must be a non-empty string")
    return save(out, metadata=md)


def _no_duplicates(pairs):
    # json.loads silently keeps the last of two equal keys; a second parser could keep the first.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise BlobFormatError(f"duplicate key {_short(key)} in the header")
        obj[key] = value
    return obj


def _parse_header(blob: bytes) -> tuple[dict, int]:
    if len(blob) < 8:
        raise BlobFormatError(f"blob of {len(blob)} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > HEADER_CAP:
        raise SizeLimitError(f"header length {n} is over the cap of {HEADER_CAP} bytes")
    if n > len(blob) - 8:
        raise BlobFormatError(f"header length {n} is past the end of a {len(blob)}-byte blob")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except WireError:
        raise
    except (ValueError, RecursionError) as e:   # bad UTF-8, bad JSON, 5000-digit ints, [[[[..
        raise BlobFormatError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise BlobFormatError(f"header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def _parse_entry(name: str, entry, buf_len: int) -> tuple[torch.dtype, list[int], int, int]:
    where = f"entry {_short(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise BlobFormatError(f"{where} must be an object with exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BlobFormatError(f"{where} has dtype {_short(dtype)}, not one of {list(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BlobFormatError(f"{where} has shape {_short(shape)}, not a list of ints >= 0")
    # Bail out as soon as the running product passes the buffer: 50k dims of 2 would otherwise
    # build a 50k-bit int. A zero dim makes an empty tensor whatever the others; shape [] is a
    # 0-d tensor (one element), allowed.
    nbytes = 0 if 0 in shape else DTYPES[dtype].itemsize
    for d in shape:
        nbytes *= d
        if nbytes > buf_len:
            raise SizeLimitError(f"{where} declares shape {_short(shape)} ({dtype}), larger than "
                                 f"the {buf_len}-byte buffer")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        raise BlobFormatError(f"{where} data_offsets must be [begin, end] ints")
    begin, end = offsets
    if not 0 <= begin <= end <= buf_len:
        raise BlobFormatError(f"{where} data_offsets {_short(offsets)} out of [0, {buf_len}]")
    if end - begin != nbytes:
        raise BlobFormatError(f"{where} holds {end - begin} bytes, shape {_short(shape)} "
                              f"({dtype}) needs {nbytes}")
    return DTYPES[dtype], shape, begin, end


def _parse_int(md: dict, key: str) -> int:
    if not _DECIMAL.fullmatch(md[key]) or int(md[key]) > _INT_MAX:
        raise MetadataError(f"metadata {key!r} must be a decimal int >= 0, got {_short(md[key])}")
    return int(md[key])


def _check_meta(md, schema: str, round: int | None, sender: str | None) -> dict:
    if md is None:
        raise MetadataError("metadata (__metadata__) is missing")
    if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
        raise MetadataError("metadata (__metadata__) must be an object of strings")
    try:   # a "\ud800" escape is valid JSON but a lone surrogate fails later, when logged
        "".join(md).encode("utf-8"), "".join(md.values()).encode("utf-8")
    except UnicodeEncodeError:
        raise MetadataError("metadata holds a lone surrogate, not UTF-8 text") from None
    missing = [k for k in _REQUIRED if k not in md]
    if missing:
        raise MetadataError(f"metadata fields missing: {missing}")
    if md["format"] != "pt":
        raise MetadataError(f"metadata 'format' must be 'pt', got {_short(md['format'])}")
    if md["schema"] != schema:
        raise MetadataError(f"metadata 'schema' is {_short(md['schema'])}, expected {schema!r}")
    meta = dict(md, round=_parse_int(md, "round"), num_examples=_parse_int(md, "num_examples"))
    if not meta["client"]:
        raise MetadataError("metadata 'client' must be a non-empty string")
    if round is not None and meta["round"] != round:
        raise MetadataError(f"metadata 'round' is {meta['round']}, expected {round}")
    if sender is not None and meta["client"] != sender:
        raise MetadataError(f"metadata 'client' is {_short(meta['client'])}, expected {sender!r}")
    return meta


def decode(blob, expected: Mapping[str, torch.Tensor], *, round: int | None = None,
           sender: str | None = None, schema: str = SCHEMA,
           max_bytes: int = 1 << 30) -> tuple[dict[str, torch.Tensor], dict]:
    """Validates ``blob`` (module docstring, checks 1-8) and returns ``(tensors, meta)``.

    Args:
        blob: bytes, bytearray or memoryview (copied once: a buffer changed later voids
            nothing).
        expected: name -> tensor whose names, shapes and dtypes the blob must match.
        round, sender: when given, the metadata must carry these values.
        schema: the schema tag the metadata must carry.
        max_bytes: larger blobs are refused before parsing.
    Returns:
        (tensors, meta): CPU tensors matching ``expected``, and the metadata with ``round``
        and ``num_examples`` as ints, the other fields as strings.
    Raises:
        WireError (a ValueError; its subclasses name the failed check): anything malformed,
            oversized, mismatched, non-finite or from the wrong round or sender.
    """
    if not isinstance(expected, Mapping):
        raise TypeError("expected must be a mapping of name -> tensor")
    blob = _immutable_copy(blob, max_bytes)
    header, start = _parse_header(blob)
    buf_len = len(blob) - start
    entries = {name: _parse_entry(name, e, buf_len) for name, e in header.items()
               if name != "__metadata__"}
    _check_tiling(entries, buf_len)
    _check_schema(entries, expected)
    meta = _check_meta(header.get("__metadata__"), schema, round, sender)
    view, out = memoryview(blob), {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            t = torch.empty(shape, dtype=dtype)
        else:   # a writable copy of the checked range: its own, aligned storage
            t = torch.frombuffer(bytearray(view[start + begin:start + end]), dtype=dtype)
            if sys.byteorder == "big":   # safetensors data is little-endian
                t = t.view(torch.uint8).view(-1, dtype.itemsize).flip(1).contiguous().view(dtype)
            t = t.reshape(shape)
        _check_finite(name, t)
        out[name] = t
    return out, meta


def _immutable_copy(blob, max_bytes: int) -> bytes:
    """Check 1: the blob's type and size; an immutable copy (a bytearray changed under our
    feet would void every check)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise BlobFormatError(f"blob must be bytes, got {type(blob).__name__}")
    try:
        size = blob.nbytes if isinstance(blob, memoryview) else len(blob)
        if size > max_bytes:
            raise SizeLimitError(f"blob of {size} bytes is over max_bytes={max_bytes}")
        return blob if isinstance(blob, bytes) else bytes(blob)
    except ValueError as e:   # a released memoryview
        raise e if isinstance(e, WireError) else BlobFormatError(f"blob unreadable: {e}") from None


def _check_tiling(entries: dict, buf_len: int) -> None:
    """Check 5: the entries tile the buffer exactly."""
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != covered:
            raise BlobFormatError(f"entry {_short(name)} starts at {begin}, expected {covered} "
                                  f"({'overlap' if begin < covered else 'gap'})")
        covered = end
    if covered != buf_len:
        raise BlobFormatError(f"{buf_len - covered} trailing bytes after the last tensor")


def _check_schema(entries: dict, expected: Mapping[str, torch.Tensor]) -> None:
    """Check 6: key set, shapes and dtypes equal to ``expected``."""
    missing, unexpected = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise SchemaError(f"key set differs from expected: missing {_short(missing)}, "
                          f"unexpected {_short(unexpected)}")
    for name, (dtype, shape, _, _) in entries.items():
        want = expected[name]
        if list(want.shape) != shape or want.dtype != dtype:
            raise SchemaError(f"tensor {_short(name)} is {dtype} {_short(shape)}, expected "
                              f"{want.dtype} {list(want.shape)}")
