"""The wire format (feddpa_fast/fed/wire.py): round trips, every rejection with its exact error
type, and seeded random mutations that must end in a decoded blob or a WireError, nothing else."""
import json
import random
import struct

import pytest
import torch

from feddpa_fast.fed import wire
from feddpa_fast.fed.wire import (
    SCHEMA,
    BlobFormatError,
    MetadataError,
    NonFiniteError,
    SchemaError,
    SizeLimitError,
    WireError,
    decode,
    encode,
)

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
META = {"round": 3, "client": "c7", "num_examples": 120}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(4, 16, generator=g), B: torch.randn(24, 4, generator=g)}


def _spec(tensors):
    return {k: torch.empty_like(v) for k, v in tensors.items()}


def _split(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header, data=b""):
    """A blob from a header (dict, or raw JSON text/bytes) and a data buffer."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def _rewrite(fn, tensors=None, meta=META):
    """A valid blob whose parsed header went through ``fn`` (in place), data unchanged."""
    header, data = _split(encode(tensors or _tensors(), meta))
    fn(header)
    return _join(header, data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {A: torch.randn(4, 16, generator=g).to(dtype),
               B: torch.randn(24, 4, generator=g).to(dtype).t(),   # non-contiguous input
               "odd": torch.randn(1, 3, 5, generator=g).to(dtype),
               "scalar": torch.tensor(2.5, dtype=dtype),             # 0-d tensors are allowed
               "empty": torch.empty(0, 7, dtype=dtype)}              # so are zero-size ones
    meta = dict(META, note="free text", schema=SCHEMA)
    blob = encode(tensors, meta)
    assert isinstance(blob, bytes)
    for form in (blob, bytearray(blob), memoryview(blob)):
        out, got = decode(form, _spec(tensors), round=3, sender="c7")
        assert set(out) == set(tensors)
        for k, v in tensors.items():
            assert out[k].dtype == dtype and out[k].shape == v.shape and out[k].device.type == "cpu"
            assert torch.equal(out[k], v)
        assert got == {"format": "pt", "schema": SCHEMA, "round": 3, "client": "c7",
                       "num_examples": 120, "note": "free text"}


def test_round_trip_mixed_dtypes_and_no_tensors():
    tensors = {A: torch.ones(2, 3), B: torch.zeros(3, 2, dtype=torch.bfloat16)}
    out, _ = decode(encode(tensors, META), _spec(tensors))
    assert out[A].dtype == torch.float32 and out[B].dtype == torch.bfloat16
    out, meta = decode(encode({}, dict(META, num_examples=0)), {})
    assert out == {} and meta["num_examples"] == 0


def test_decoded_tensors_own_their_memory():
    blob = bytearray(encode(_tensors(), META))
    out, _ = decode(blob, _spec(_tensors()))
    before = out[A].clone()
    blob[-100:] = bytes(100)            # the caller reusing its buffer changes nothing
    out[A].add_(1)                      # and the tensors are writable
    assert torch.equal(out[A], before + 1)


def test_schema_tag_is_checked_both_ways():
    blob = encode(_tensors(), dict(META, schema="other/2"))
    assert decode(blob, _spec(_tensors()), schema="other/2")[1]["schema"] == "other/2"
    with pytest.raises(MetadataError, match="schema"):
        decode(blob, _spec(_tensors()))


# ---- encode: bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("tensors, meta, exc", [
    ({A: [1.0]}, META, TypeError),
    ({1: torch.ones(1)}, META, ValueError),
    ({"__metadata__": torch.ones(1)}, META, ValueError),
    ({A: torch.ones(2, dtype=torch.float64)}, META, SchemaError),
    ({A: torch.ones(2, dtype=torch.int64)}, META, SchemaError),
    ({A: torch.tensor([1.0, float("nan")])}, META, NonFiniteError),
    ({A: torch.ones(2)}, {"client": "c", "num_examples": 1}, MetadataError),
    ({A: torch.ones(2)}, dict(META, round=-1), MetadataError),
    ({A: torch.ones(2)}, dict(META, round=True), MetadataError),
    ({A: torch.ones(2)}, dict(META, round="3"), MetadataError),
    ({A: torch.ones(2)}, dict(META, num_examples=-5), MetadataError),
    ({A: torch.ones(2)}, dict(META, client=""), MetadataError),
    ({A: torch.ones(2)}, dict(META, client=7), MetadataError),
    ({A: torch.ones(2)}, dict(META, format="np"), MetadataError),
    ({A: torch.ones(2)}, dict(META, extra=1.5), MetadataError),
    ({A: torch.ones(2)}, [("round", 1)], TypeError),
])
def test_encode_rejects(tensors, meta, exc):
    with pytest.raises(exc):
        encode(tensors, meta)


# ---- decode: every rejection -----------------------------------------------------------------

def _entries_blob(entries, data, meta=None):
    header = {"__metadata__": meta or {"format": "pt", "schema": SCHEMA, "round": "0",
                                       "client": "c", "num_examples": "1"}}
    header.update(entries)
    return _join(header, data)


E = {"x": torch.empty(2)}   # expected spec for hand-made blobs: one F32 vector of 2 values
X = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
D8 = struct.pack("<2f", 1.0, 2.0)


def test_hand_made_blob_is_valid():
    out, meta = decode(_entries_blob({"x": X}, D8), E, round=0, sender="c")
    assert out["x"].tolist() == [1.0, 2.0] and meta["round"] == 0


@pytest.mark.parametrize("blob, exc, match", [
    (b"", BlobFormatError, "shorter"),
    (b"\x05\x00\x00", BlobFormatError, "shorter"),
    (struct.pack("<Q", 100) + b"{}", BlobFormatError, "past the end"),
    (struct.pack("<Q", 2 ** 63) + b"{}", SizeLimitError, "cap"),
    (struct.pack("<Q", wire.HEADER_CAP + 1) + b"{}", SizeLimitError, "cap"),
    (_join("{not json"), BlobFormatError, "JSON"),
    (_join(b'{"x": "\xff"}'), BlobFormatError, "UTF-8"),
    (_join("[1, 2]"), BlobFormatError, "object"),
    (_join("7"), BlobFormatError, "object"),
    (_join("[" * 100_000 + "]" * 100_000), BlobFormatError, "JSON"),
    (_join(f'{{"x": {json.dumps(X)}, "x": {json.dumps(X)}}}', D8), BlobFormatError,
     "duplicate key 'x'"),
    (_join('{"__metadata__": {"round": "1", "round": "2"}}'), BlobFormatError, "duplicate"),
    (_entries_blob({"x": {"shape": [2], "data_offsets": [0, 8]}}, D8), BlobFormatError,
     "exactly dtype"),
    (_entries_blob({"x": dict(X, extra=1)}, D8), BlobFormatError, "exactly dtype"),
    (_entries_blob({"x": [1, 2]}, D8), BlobFormatError, "exactly dtype"),
    (_entries_blob({"x": dict(X, dtype="I64", shape=[1])}, D8), BlobFormatError, "I64"),
    (_entries_blob({"x": dict(X, dtype="F64", shape=[1])}, D8), BlobFormatError, "F64"),
    (_entries_blob({"x": dict(X, dtype="f32")}, D8), BlobFormatError, "dtype"),
    (_entries_blob({"x": dict(X, dtype=4)}, D8), BlobFormatError, "dtype"),
    (_entries_blob({"x": dict(X, shape=[-2])}, D8), BlobFormatError, "shape"),
    (_entries_blob({"x": dict(X, shape=[2.0])}, D8), BlobFormatError, "shape"),
    (_entries_blob({"x": dict(X, shape=["2"])}, D8), BlobFormatError, "shape"),
    (_entries_blob({"x": dict(X, shape=[True, 2])}, D8), BlobFormatError, "shape"),
    (_entries_blob({"x": dict(X, shape=2)}, D8), BlobFormatError, "shape"),
    (_entries_blob({"x": dict(X, shape=[2 ** 40, 2 ** 40])}, D8), SizeLimitError, "larger"),
    (_entries_blob({"x": dict(X, shape=[2] * 5000)}, D8), SizeLimitError, "larger"),
    (_entries_blob({"x": dict(X, shape=[10 ** 4000])}, D8), SizeLimitError, "larger"),
    (_join('{"x": {"dtype": "F32", "shape": [1%s], "data_offsets": [0, 8]}}' % ("0" * 5000), D8),
     BlobFormatError, "JSON"),                  # Python refuses ints of over 4300 digits
    (_entries_blob({"x": dict(X, data_offsets=[0])}, D8), BlobFormatError, "data_offsets"),
    (_entries_blob({"x": dict(X, data_offsets=[0, 8.0])}, D8), BlobFormatError, "data_offsets"),
    (_entries_blob({"x": dict(X, data_offsets="0-8")}, D8), BlobFormatError, "data_offsets"),
    (_entries_blob({"x": dict(X, data_offsets=[-8, 0])}, D8), BlobFormatError, "out of"),
    (_entries_blob({"x": dict(X, data_offsets=[4, 12])}, D8), BlobFormatError, "out of"),
    (_entries_blob({"x": dict(X, data_offsets=[8, 0])}, D8), BlobFormatError, "out of"),
    (_entries_blob({"x": dict(X, data_offsets=[0, 4])}, D8), BlobFormatError, "needs 8"),
    (_entries_blob({"x": X, "y": X}, D8), BlobFormatError, "overlap"),
    (_entries_blob({"x": dict(X, data_offsets=[0, 8]),
                    "y": dict(X, shape=[1], data_offsets=[4, 8])}, D8), BlobFormatError,
     "overlap"),
    (_entries_blob({"x": dict(X, shape=[1], data_offsets=[4, 8])}, D8), BlobFormatError, "gap"),
    (_entries_blob({"x": X}, D8 + b"\0\0\0\0"), BlobFormatError, "trailing"),
    (_entries_blob({}, D8), BlobFormatError, "trailing"),
], ids=lambda v: "" if isinstance(v, bytes) else getattr(v, "__name__", str(v))[:20])
def test_decode_rejects_malformed(blob, exc, match):
    with pytest.raises(exc, match=match) as info:
        decode(blob, E)
    assert type(info.value) is exc


def _del(key):
    return lambda h: h.__delitem__(key)


def _set(path, value):
    def fn(h):
        node = h
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return fn


@pytest.mark.parametrize("fn, exc, match", [
    (lambda h: h.__setitem__("extra", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
     SchemaError, "unexpected .*extra"),
    (_del("__metadata__"), MetadataError, "missing"),
    (_set(["__metadata__"], ["format", "pt"]), MetadataError, "object of strings"),
    (_set(["__metadata__", "round"], 3), MetadataError, "object of strings"),
    (_set(["__metadata__"], None), MetadataError, "missing"),
    (lambda h: h["__metadata__"].pop("client"), MetadataError, "client"),
    (lambda h: h["__metadata__"].pop("format"), MetadataError, "format"),
    (_set(["__metadata__", "format"], "np"), MetadataError, "format"),
    (_set(["__metadata__", "schema"], "feddpa_fast/adapter/0"), MetadataError, "schema"),
    (_set(["__metadata__", "round"], "4"), MetadataError, "round"),
    (_set(["__metadata__", "round"], "three"), MetadataError, "round"),
    (_set(["__metadata__", "round"], "03"), MetadataError, "round"),
    (_set(["__metadata__", "round"], "-3"), MetadataError, "round"),
    (_set(["__metadata__", "round"], "\u0663"), MetadataError, "round"),   # Arabic-Indic 3
    (_set(["__metadata__", "round"], "9" * 5000), MetadataError, "round"),
    (_set(["__metadata__", "num_examples"], "-1"), MetadataError, "num_examples"),
    (_set(["__metadata__", "num_examples"], "1.5"), MetadataError, "num_examples"),
    (_set(["__metadata__", "client"], "c8"), MetadataError, "client"),
    (_set(["__metadata__", "client"], ""), MetadataError, "client"),
    (_set(["__metadata__", "client"], "c\ud800"), MetadataError, "surrogate"),
    (_set(["__metadata__", "\udfff"], "x"), MetadataError, "surrogate"),
])
def test_decode_rejects_bad_keys_and_metadata(fn, exc, match):
    with pytest.raises(exc, match=match) as info:
        decode(_rewrite(fn), _spec(_tensors()), round=3, sender="c7")
    assert type(info.value) is exc


def test_decode_rejects_shape_and_dtype_mismatch():
    spec = _spec(_tensors())
    blob = encode(_tensors(), META)
    with pytest.raises(SchemaError, match="lora_A"):
        decode(blob, dict(spec, **{A: torch.empty(16, 4)}))
    with pytest.raises(SchemaError, match="lora_B"):
        decode(blob, dict(spec, **{B: torch.empty(24, 4, dtype=torch.bfloat16)}))
    with pytest.raises(SchemaError, match=r"missing \['other'\], unexpected \[\]"):
        decode(blob, dict(spec, other=torch.empty(1)))
    with pytest.raises(SchemaError, match=r"missing \[\], unexpected \['base"):
        decode(blob, {A: spec[A]})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_decode_rejects_non_finite(value, dtype):
    # encode refuses non-finite tensors, so patch the bytes of a valid blob instead
    torch_dtype = wire.DTYPES[dtype]
    tensors = {A: torch.ones(4, 16, dtype=torch_dtype), B: torch.ones(24, 4, dtype=torch_dtype)}
    header, data = _split(encode(tensors, META))
    begin, end = header[B]["data_offsets"]
    bad = torch.tensor([value], dtype=torch_dtype).view(torch.uint8).numpy().tobytes()
    data = data[:begin + 2 * len(bad)] + bad + data[begin + 3 * len(bad):]
    with pytest.raises(NonFiniteError, match="lora_B"):
        decode(_join(header, data), _spec(tensors))


def test_decode_rejects_size_and_type():
    blob = encode(_tensors(), META)
    with pytest.raises(SizeLimitError, match="max_bytes"):
        decode(blob, _spec(_tensors()), max_bytes=len(blob) - 1)
    assert decode(blob, _spec(_tensors()), max_bytes=len(blob))[1]["round"] == 3
    for bad in (blob.decode("latin-1"), None, 12, [blob]):
        with pytest.raises(BlobFormatError, match="bytes"):
            decode(bad, _spec(_tensors()))
    view = memoryview(bytearray(blob))
    view.release()
    with pytest.raises(WireError):
        decode(view, _spec(_tensors()))


def test_errors_are_value_errors():
    for exc in (BlobFormatError, SizeLimitError, SchemaError, MetadataError, NonFiniteError):
        assert issubclass(exc, WireError) and issubclass(exc, ValueError)


# ---- random mutations ------------------------------------------------------------------------

_JUNK = [None, True, -1, 0, 1, 7, 2 ** 64, 1.5, "", "F32", "BF16", "I64", [], [0], [0, 0],
         [-1, 4], [2, 2], [1, 2, 3], {}, {"dtype": "F32"}, "\x00", "x" * 300]


def _mutate_header(rng, header):
    names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
             and {"shape", "data_offsets"} <= set(v)
             and isinstance(v["shape"], list) and isinstance(v["data_offsets"], list)]
    md = header.get("__metadata__")
    choice = rng.randrange(7) if names else 4
    target = header[rng.choice(names)] if names else None
    if choice == 0:
        target[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(_JUNK)
    elif choice == 1 and target["data_offsets"]:
        off = target["data_offsets"]
        off[rng.randrange(len(off))] += rng.choice([-4, -2, -1, 1, 2, 4, 64])
    elif choice == 2 and target["shape"]:
        shape = target["shape"]
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 8, 16, 2 ** 31])
    elif choice == 3 and header:
        del header[rng.choice(list(header))]
    elif choice == 5 and isinstance(md, dict):
        md[rng.choice(list(md) + ["extra"])] = rng.choice(["", "0", "3", "-1", "c7", "pt", SCHEMA])
    elif choice == 6:
        target["dtype"] = rng.choice(["F16", "BF16", "F32"])
    else:
        header[rng.choice(["new", "__metadata__"] + names)] = rng.choice(_JUNK)


def test_random_mutations_never_escape():
    tensors = _tensors()
    spec, blob = _spec(tensors), encode(tensors, META)
    header, data = _split(blob)
    n = struct.unpack("<Q", blob[:8])[0]
    rng = random.Random(1234)
    decoded = 0
    for i in range(500):
        kind = i % 5
        if kind == 0:                                     # truncation
            mutated = blob[:rng.randrange(len(blob))]
        elif kind == 1:                                   # bit flips in the header (incl. length)
            b = bytearray(blob)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(8 + n)] ^= 1 << rng.randrange(8)
            mutated = bytes(b)
        elif kind == 2:                                   # bit flips in the data
            b = bytearray(blob)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(8 + n, len(b))] ^= 1 << rng.randrange(8)
            mutated = bytes(b)
        elif kind == 3:                                   # structured header rewrites
            h = json.loads(json.dumps(header))
            for _ in range(rng.randint(1, 3)):
                _mutate_header(rng, h)
            mutated = _join(h, data)
        else:                                             # random bytes spliced anywhere
            b = bytearray(blob)
            at = rng.randrange(len(b))
            b[at:at + rng.randint(0, 16)] = rng.randbytes(rng.randint(0, 16))
            mutated = bytes(b)
        try:
            out, meta = decode(mutated, spec, round=3, sender="c7")
        except WireError:
            continue
        decoded += 1
        assert set(out) == set(spec) and meta["round"] == 3 and meta["client"] == "c7"
        for k, v in out.items():
            assert v.shape == spec[k].shape and v.dtype == spec[k].dtype
            assert torch.isfinite(v).all()
    assert 0 < decoded < 250   # mostly data flips that stay finite
