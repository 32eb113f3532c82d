"""Property/fuzz tests of the wire format (feddpa_fast/fed/wire.py) with hypothesis.

Blobs start valid (``wire.encode`` of a small adapter) and go through 1-3 structured mutations:
truncation, bit flips, a rewritten header length, the header replaced by arbitrary bytes or
arbitrary JSON, entries with other dtypes / shapes / data_offsets (overlapping, reversed, out of
bounds, huge), keys added, removed or duplicated, metadata edits, NaN/Inf bit patterns in the
data; plus fully random bytes. Properties:

- ``wire.decode`` returns tensors equal in keys / shapes / dtypes to ``expected`` and finite, or
  raises a ``WireError``; any other exception, an example over the deadline (or a watchdog
  alarm for a real hang), or a Python-heap peak over ``_PEAK_BYTES`` during one decode fails;
- ``Server.aggregate_round`` on 1-3 such blobs either aggregates the ones that decode, or raises
  ``TooFewUpdates`` (nothing else) and leaves the server's global adapter bit-identical.

Example count: ``FEDDPA_FUZZ_EXAMPLES`` (total over the three tests, ~70% / 10% / 20%). Unset,
it is a seeded (derandomized) run of 2,000 for CI; ``make fuzz`` sets 20,000 and the run is then
random (a failure prints a ``@reproduce_failure`` blob). No example database is written, and
hypothesis' cache directory is kept out of the repository.
"""
import json
import logging
import os
import signal
import struct
import tempfile
import threading
import tracemalloc
from contextlib import contextmanager

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

from feddpa_fast.fed import wire  # noqa: E402
from feddpa_fast.fed.aggregate import RULES  # noqa: E402
from feddpa_fast.fed.run_config import RunConfig  # noqa: E402
from feddpa_fast.fed.server import Server, ServerSettings, TooFewUpdates  # noqa: E402
from feddpa_fast.fed.wire import SCHEMA, WireError, decode, encode  # noqa: E402

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):   # no .hypothesis/ in the repo
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "feddpa_fast-hypothesis"))

_ENV = os.environ.get("FEDDPA_FUZZ_EXAMPLES")
_TOTAL = int(_ENV) if _ENV else 2000
_SETTINGS = dict(deadline=500, database=None, derandomize=_ENV is None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_PEAK_BYTES = 16 << 20    # Python-heap peak of one decode (blobs are ~1 KB, 200 KB at most)
_HANG_SECONDS = 10        # watchdog: a decode that never returns fails instead of hanging CI

ROUND, CLIENTS = 0, ("c0", "c1", "c2")
_PREFIX = "base_model.model.layers.0."


def _adapter(spec, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g).to(dtype) for k, (shape, dtype) in spec.items()}


# Small expected adapters, 2-3 tensors, float32 / bf16 (and mixed).
_SPECS = [
    {_PREFIX + "q_proj.lora_A.weight": ((4, 8), torch.float32),
     _PREFIX + "q_proj.lora_B.weight": ((8, 4), torch.float32)},
    {_PREFIX + "v_proj.lora_A.weight": ((2, 16), torch.bfloat16),
     _PREFIX + "v_proj.lora_B.weight": ((16, 2), torch.bfloat16),
     _PREFIX + "v_proj.gate": ((3,), torch.bfloat16)},
    {_PREFIX + "o_proj.lora_A.weight": ((4, 12), torch.float32),
     _PREFIX + "o_proj.lora_B.weight": ((12, 4), torch.bfloat16),
     "scalar": ((), torch.float32)},
]
GLOBALS = [_adapter(spec, 100 + i) for i, spec in enumerate(_SPECS)]
EXPECTED = [{k: torch.empty_like(v) for k, v in g.items()} for g in GLOBALS]
# BASE[case][client]: the valid reply of `client` for round 0.
BASE = [{c: encode(_adapter(spec, 10 * i + j), {"round": ROUND, "client": c, "num_examples": 10})
         for j, c in enumerate(CLIENTS)} for i, spec in enumerate(_SPECS)]
for _i, _e in enumerate(EXPECTED):   # sanity, and torch's lazy first-call costs paid up front
    for _c in CLIENTS:
        decode(BASE[_i][_c], _e, round=ROUND, sender=_c)


# ---- blob surgery --------------------------------------------------------------------------

def _split(blob):
    """(header bytes, data bytes) under the blob's own header length (clipped to the blob)."""
    (n,) = struct.unpack("<Q", blob[:8])
    n = min(n, len(blob) - 8)
    return blob[8:8 + n], blob[8 + n:]


def _join(header, data=b""):
    return struct.pack("<Q", len(header)) + header + data


def _parsed(blob):
    """(header dict, data) when the blob still has a JSON-object header, else None."""
    if len(blob) < 8:
        return None
    hb, data = _split(blob)
    try:
        h = json.loads(hb.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return (h, data) if isinstance(h, dict) else None


def _dumps(draw, h):
    text = json.dumps(h, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")   # lone surrogates become invalid UTF-8


def _entries(h):
    return [k for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)]


def _pattern_bytes(dtype_name, kind):
    bits = {"F32": {"nan": 0x7FC00000, "snan": 0x7F800001, "inf": 0x7F800000, "-inf": 0xFF800000,
                    "-nan": 0xFFC00000, "max": 0x7F7FFFFF},
            "BF16": {"nan": 0x7FC0, "snan": 0x7F81, "inf": 0x7F80, "-inf": 0xFF80,
                     "-nan": 0xFFC0, "max": 0x7F7F},
            "F16": {"nan": 0x7E00, "snan": 0x7C01, "inf": 0x7C00, "-inf": 0xFC00,
                    "-nan": 0xFE00, "max": 0x7BFF}}[dtype_name][kind]
    return bits.to_bytes(4 if dtype_name == "F32" else 2, "little")


BIG_INTS = [2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30]
JUNK_SCALARS = st.sampled_from([None, True, False, 0, 1, -1, 1.5, 2.0, float("nan"),
                                float("inf"), "", "0", "F32", "\ud800", [], {}, ["F32"],
                                {"F32": 1}, [1, 2], [[0, 8]]] + BIG_INTS)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.sampled_from(BIG_INTS)
    | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12)
DTYPE_NAMES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8",
                               "BOOL", "F8_E4M3", "f32", "bf16", "F32 ", " F32", "", "float32"]) \
    | st.text(max_size=6) | JUNK_SCALARS | JSON
DIMS = st.integers(-3, 40) | st.sampled_from(BIG_INTS + [-(2 ** 62), -(2 ** 63)]) | JUNK_SCALARS


def _m_truncate(draw, blob):
    return blob[:draw(st.integers(0, max(len(blob) - 1, 0)))]


def _m_bitflip(draw, blob):
    if not blob:
        return blob
    b = bytearray(blob)
    (n,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (0,)
    hi = min(len(b), 8 + n) if draw(st.booleans()) else len(b)    # often inside the header
    for _ in range(draw(st.integers(1, 8))):
        b[draw(st.integers(0, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(b)


def _m_splice(draw, blob):
    at = draw(st.integers(0, len(blob)))
    cut = draw(st.integers(0, 16))
    return blob[:at] + draw(st.binary(max_size=16)) + blob[at + cut:]


def _m_header_length(draw, blob):
    if len(blob) < 8:
        return blob
    (n,) = struct.unpack("<Q", blob[:8])
    new = draw(st.sampled_from([0, 1, 2, n - 1, n + 1, len(blob) - 8, len(blob) - 7, len(blob),
                                wire.HEADER_CAP, wire.HEADER_CAP + 1, 2 ** 32, 2 ** 63,
                                2 ** 64 - 1]) | st.integers(0, 2 ** 64 - 1))
    return struct.pack("<Q", new % 2 ** 64) + blob[8:]


def _m_header_bytes(draw, blob):
    data = _split(blob)[1] if len(blob) >= 8 else b""
    return _join(draw(st.binary(max_size=300)), data if draw(st.booleans()) else b"")


def _m_header_json(draw, blob):
    data = _split(blob)[1] if len(blob) >= 8 else b""
    return _join(_dumps(draw, draw(JSON)), data)


def _m_header_text(draw, blob):
    """Raw-text edits JSON re-serialisation cannot express: duplicate keys, deep nesting,
    5000-digit ints, padding, a cut-off or doubled header."""
    if len(blob) < 8:
        return blob
    hb, data = _split(blob)
    kind = draw(st.sampled_from(["dup", "deep", "digits", "pad", "cut", "double", "nul"]))
    p = _parsed(blob)
    if kind == "dup" and p and p[0]:
        key = draw(st.sampled_from(sorted(p[0])))
        pair = json.dumps({key: p[0][key]})[1:-1].encode("utf-8", "surrogatepass")
        hb = b"{" + pair + b", " + hb.lstrip()[1:]
    elif kind == "deep":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        hb = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "digits":
        hb = hb.replace(b'"shape": [', b'"shape": [1' + b"0" * draw(st.sampled_from(
            [18, 19, 400, 4300, 5000])) + b", ", 1)
    elif kind == "pad":
        hb = hb + b" " * draw(st.integers(0, 64))
    elif kind == "cut":
        hb = hb[:draw(st.integers(0, len(hb)))]
    elif kind == "double":
        hb = hb + hb
    else:
        hb = hb[:draw(st.integers(0, len(hb)))] + b"\x00" + hb
    return _join(hb, data)


def _m_entry(draw, blob):
    p = _parsed(blob)
    if not p or not _entries(p[0]):
        return _m_bitflip(draw, blob)
    h, data = p
    names = _entries(h)
    name = draw(st.sampled_from(names))
    e = h[name]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra", "replace",
                                  "swap", "retype"]))
    if field == "dtype":
        e["dtype"] = draw(DTYPE_NAMES)
    elif field == "shape":
        e["shape"] = draw(st.lists(DIMS, max_size=5) | st.sampled_from(
            [[2] * 5000, [1] * 300, [0, 2 ** 62], [2 ** 62], [2 ** 31, 2 ** 31], [2 ** 64], []])
            | JUNK_SCALARS)
    elif field == "data_offsets":
        off = e.get("data_offsets")
        b0, e0 = off if isinstance(off, list) and len(off) == 2 else (0, 0)
        others = [v for k in names if isinstance(h[k].get("data_offsets"), list)
                  for v in h[k]["data_offsets"]]
        pool = st.sampled_from([0, 1, len(data), len(data) + 1, -1, 2 ** 62, 2 ** 63, 2 ** 64,
                                -(2 ** 63), 1.0, "0", None] + others + [
            v + d for v in (b0, e0) if isinstance(v, int) and not isinstance(v, bool)
            for d in (-4, -2, -1, 1, 2, 4)]) | st.integers(-8, len(data) + 8)
        choice = draw(st.sampled_from(["pair", "reversed", "short", "long", "junk"]))
        if choice == "pair":
            e["data_offsets"] = [draw(pool), draw(pool)]
        elif choice == "reversed":
            e["data_offsets"] = [e0, b0]
        elif choice == "short":
            e["data_offsets"] = [draw(pool)]
        elif choice == "long":
            e["data_offsets"] = [b0, e0, draw(pool)]
        else:
            e["data_offsets"] = draw(JUNK_SCALARS)
    elif field == "drop":
        e.pop(draw(st.sampled_from(sorted(e) or ["dtype"])), None)
    elif field == "extra":
        e[draw(st.sampled_from(["extra", "offsets", "DTYPE"]))] = draw(JUNK_SCALARS)
    elif field == "replace":
        h[name] = draw(JSON)
    elif field == "swap" and len(names) > 1:   # two entries trade offsets: overlaps, or legit
        other = h[draw(st.sampled_from([k for k in names if k != name]))]
        e["data_offsets"], other["data_offsets"] = (other.get("data_offsets"),
                                                    e.get("data_offsets"))
    elif field == "retype":    # other dtype, shape fitted to the same bytes: a pure schema error
        e["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16"]))
        off = e.get("data_offsets")
        if isinstance(off, list) and len(off) == 2 and all(isinstance(v, int) for v in off):
            size = {"F32": 4, "F16": 2, "BF16": 2}[e["dtype"]]
            e["shape"] = [max(off[1] - off[0], 0) // size]
    return _join(_dumps(draw, h), data)


def _m_keys(draw, blob):
    p = _parsed(blob)
    if not p:
        return _m_splice(draw, blob)
    h, data = p
    action = draw(st.sampled_from(["remove", "add_empty", "add_copy", "add_junk", "rename"]))
    keys = sorted(h)
    if action == "remove" and keys:
        del h[draw(st.sampled_from(keys))]
    elif action == "add_empty":   # a zero-size tensor: tiles fine, fails only the key set
        h[draw(st.sampled_from(["extra", "", "__metadata", "x" * 300]))] = {
            "dtype": "F32", "shape": [0, 3], "data_offsets": [len(data), len(data)]}
    elif action == "add_copy" and _entries(h):   # same offsets as another entry: overlap
        h["copy"] = dict(h[draw(st.sampled_from(_entries(h)))])
    elif action == "rename" and _entries(h):
        name = draw(st.sampled_from(_entries(h)))
        h[name + draw(st.sampled_from([".", " ", "\u0130", "\ud800"]))] = h.pop(name)
    else:
        h[draw(st.text(max_size=8))] = draw(JSON)
    return _join(_dumps(draw, h), data)


META_VALUES = st.sampled_from(
    ["0", "1", "00", "-0", "+0", " 0", "0 ", "\u0660", "0.0", "1e0", "0x0", "9" * 19, "9" * 20,
     str(2 ** 63), str(2 ** 63 - 1), "c0", "c1", "C0", "c0\x00", "c0 ", "", "pt", "PT", "np",
     SCHEMA, SCHEMA + "x", "feddpa_fast/adapter/0", "\ud800", "\udfff", "10"]) \
    | st.text(max_size=8) | JUNK_SCALARS


def _m_meta(draw, blob):
    p = _parsed(blob)
    if not p:
        return _m_header_json(draw, blob)
    h, data = p
    md = h.get("__metadata__")
    action = draw(st.sampled_from(["set", "set", "del", "replace", "extra"]))
    if action == "replace" or not isinstance(md, dict):
        h["__metadata__"] = draw(JSON | JUNK_SCALARS)
    elif action == "del":
        md.pop(draw(st.sampled_from(["format", "schema", "round", "client", "num_examples"])),
               None)
    elif action == "set":
        md[draw(st.sampled_from(["format", "schema", "round", "client", "num_examples"]))] = \
            draw(META_VALUES)
    else:
        md[draw(st.sampled_from(["note", "", "\ud800", "round ", "Round"]))] = draw(META_VALUES)
    return _join(_dumps(draw, h), data)


def _m_nonfinite(draw, blob):
    """NaN / Inf (or max-finite) bit patterns written into one entry's bytes."""
    p = _parsed(blob)
    def ok(e):
        off = e.get("data_offsets")
        return (isinstance(e.get("dtype"), str) and e["dtype"] in wire.DTYPES
                and isinstance(off, list) and len(off) == 2
                and all(isinstance(v, int) for v in off))

    names = [k for k in (_entries(p[0]) if p else []) if ok(p[0][k])]
    if not names:
        return _m_splice(draw, blob)
    h, data = p
    e = h[draw(st.sampled_from(names))]
    begin, end = e["data_offsets"]
    pattern = _pattern_bytes(e["dtype"], draw(st.sampled_from(
        ["nan", "snan", "inf", "-inf", "-nan", "max"])))
    size = len(pattern)
    if not 0 <= begin < end <= len(data) or end - begin < size:
        return blob
    at = begin + size * draw(st.integers(0, (end - begin) // size - 1))
    if draw(st.integers(0, 9)) == 0:              # sometimes unaligned
        at = draw(st.integers(begin, end - size))
    start = len(blob) - len(data)
    return blob[:start + at] + pattern + blob[start + at + size:]


# Repeats weight the structured edits, which reach the deeper checks.
MUTATIONS = [_m_truncate, _m_bitflip, _m_splice, _m_header_length, _m_header_bytes,
             _m_header_json, _m_header_text, _m_entry, _m_entry, _m_entry, _m_entry, _m_keys,
             _m_keys, _m_meta, _m_meta, _m_meta, _m_nonfinite, _m_nonfinite]


class _Blob(bytes):
    """A blob whose repr stays short in a falsifying example (the deep-nesting ones are 200 KB);
    ``bytes(blob)`` is the plain value."""

    def __repr__(self):
        head = bytes(self[:160])
        return f"<blob of {len(self)} bytes: {head!r}{'...' if len(self) > 160 else ''}>"


@st.composite
def mutated(draw, base):
    blob = base
    for _ in range(draw(st.integers(1, 3))):
        blob = draw(st.sampled_from(MUTATIONS))(draw, blob)
    return _Blob(blob)


@st.composite
def fuzz_cases(draw):
    case = draw(st.integers(0, len(_SPECS) - 1))
    return case, draw(mutated(BASE[case]["c0"]))


# ---- guards --------------------------------------------------------------------------------

@contextmanager
def _watchdog(seconds):
    """SIGALRM after ``seconds``: a decode stuck in a loop fails the test rather than hanging."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise TimeoutError(f"wire.decode still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _decode_guarded(blob, expected, **kw):
    """decode under the watchdog and tracemalloc; WireError and other exceptions propagate."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        with _watchdog(_HANG_SECONDS):
            return decode(blob, expected, **kw)
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
        assert peak < _PEAK_BYTES, f"decode of a {len(blob)}-byte blob peaked at {peak} bytes"


def _check_decoded(out, meta, expected, sender):
    assert set(out) == set(expected)
    for k, want in expected.items():
        assert out[k].shape == want.shape and out[k].dtype == want.dtype, k
        assert out[k].device.type == "cpu" and bool(torch.isfinite(out[k]).all()), k
    assert meta["round"] == ROUND and meta["client"] == sender and meta["format"] == "pt"


def _decodes(blob, expected, sender):
    """The metadata, checked, when ``blob`` decodes to ``expected``; None on a WireError."""
    try:
        out, meta = _decode_guarded(blob, expected, round=ROUND, sender=sender)
    except WireError as exc:
        event(type(exc).__name__)   # outcome mix, shown by --hypothesis-show-statistics
        return None
    _check_decoded(out, meta, expected, sender)
    event("decoded")
    return meta


# ---- properties ----------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=max(1, _TOTAL * 7 // 10), **_SETTINGS)
@given(fuzz_cases(), st.sampled_from([bytes, bytearray, memoryview]))
def test_mutated_blobs_decode_or_raise_wire_error(case_blob, form):
    case, blob = case_blob
    _decodes(form(blob), EXPECTED[case], "c0")


@settings(max_examples=max(1, _TOTAL // 10), **_SETTINGS)
@given(st.integers(0, len(_SPECS) - 1),
       st.binary(max_size=2048)
       | st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                   st.integers(0, 2 ** 64 - 1) | st.integers(0, 512), st.binary(max_size=512))
       | st.builds(lambda h, rest: _join(h, rest), st.binary(max_size=256),
                   st.binary(max_size=256)))
def test_random_bytes_raise_wire_error(case, blob):
    _decodes(blob, EXPECTED[case], "c0")


class _FormatAll(logging.Handler):
    """Formats every record as the server's log would (a message that cannot be formatted or
    encoded is a finding too), and keeps nothing."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.failures = []

    def emit(self, record):
        try:
            self.format(record).encode("utf-8")
        except Exception as exc:   # noqa: BLE001 - recorded and asserted on below
            self.failures.append(repr(exc))


@contextmanager
def _quiet_server_log():
    logger = logging.getLogger("feddpa_fast.fed")
    handler, propagate = _FormatAll(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False   # no 10k records piling up in pytest's log capture
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _bits(adapter):
    return {k: (v.dtype, tuple(v.shape), v.reshape(-1).view(torch.uint8).numpy().tobytes())
            for k, v in adapter.items()}


@pytest.mark.slow
@settings(max_examples=max(1, _TOTAL // 5), **_SETTINGS)
@given(st.data())
def test_server_state_unchanged_by_rejected_blobs(data):
    case = data.draw(st.integers(0, len(_SPECS) - 1))
    names = data.draw(st.lists(st.sampled_from(CLIENTS), min_size=1, max_size=3, unique=True))
    replies = {}
    for name in names:
        if data.draw(st.integers(0, 19)) == 0:   # a client that failed outright
            replies[name] = RuntimeError("client crashed")
        else:
            replies[name] = bytes(data.draw(mutated(BASE[case][name])))
    min_clients = data.draw(st.integers(1, len(names)))
    rule = data.draw(st.sampled_from(RULES))
    server = Server(GLOBALS[case], list(CLIENTS), ServerSettings.from_config(
        RunConfig(aggregation=rule, min_clients=min_clients)), seed=0)
    before = _bits(server.global_adapter)
    counts = {}
    for name, blob in replies.items():
        meta = None if isinstance(blob, BaseException) else _decodes(blob, EXPECTED[case], name)
        if meta is not None:
            counts[name] = meta["num_examples"]
    rejected = len(counts) < min_clients or (rule == "fedavg" and sum(counts.values()) == 0)
    with _quiet_server_log() as log:
        if rejected:
            with pytest.raises(TooFewUpdates):
                server.aggregate_round(ROUND, replies)
            assert _bits(server.global_adapter) == before
        else:
            new, accepted = server.aggregate_round(ROUND, replies)
            assert accepted == list(counts)
            assert server.global_adapter is new
            assert {k: v[:2] for k, v in _bits(new).items()} == {k: v[:2] for k, v in
                                                                  before.items()}
    assert not log.failures, log.failures
    assert server.client_names == list(CLIENTS)
