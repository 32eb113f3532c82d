"""The Flower messages: each carries the safetensors blob of ``fed/wire.py`` as bytes in a
``ConfigRecord`` (so the server's validation applies unchanged) plus the step and the round;
replies carry the client's name, the round, the reply blob and a ``MetricRecord`` of losses."""
from __future__ import annotations

import math

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from ...errors import FeddpaError

__all__ = ["ReplyError", "encode_request", "decode_request", "request_payload",
           "encode_reply", "decode_reply", "encode_result", "decode_result"]


def encode_request(step: str, round_index: int, blob: bytes | None = None,
                   payload: dict | None = None) -> RecordDict:
    """ServerApp -> ClientApp: the step ("round", "post"; "round", "final" to evaluate;
    "discover", "setup", "join" to query), the round, the broadcast blob and a JSON payload."""
    import json

    record = {"step": step, "round": int(round_index)}
    if blob is not None:
        record["blob"] = bytes(blob)
    if payload is not None:
        record["payload"] = json.dumps(payload)
    return RecordDict({"fed": ConfigRecord(record)})


def decode_request(content: RecordDict) -> tuple[str, int, bytes | None]:
    """(step, round, blob or None) of a request."""
    record = content.config_records["fed"]
    blob = record.get("blob")
    return str(record["step"]), int(record["round"]), (bytes(blob) if blob is not None else None)


def request_payload(content: RecordDict) -> dict | None:
    """The JSON payload of a request (None when it has none)."""
    import json

    raw = content.config_records["fed"].get("payload")
    return json.loads(str(raw)) if raw is not None else None


def encode_reply(name: str, round_index: int, blob: bytes | None, stats: dict) -> RecordDict:
    """ClientApp -> ServerApp: the client's name, the round, its reply blob, its losses."""
    record = {"client": name, "round": int(round_index)}
    if blob is not None:
        record["blob"] = bytes(blob)
    return RecordDict({"fed": ConfigRecord(record),
                       "metrics": MetricRecord({k: float(v) for k, v in stats.items()})})


class ReplyError(FeddpaError, ValueError):
    """A reply that is not one of ours: missing fields, wrong types."""


def _record(content: RecordDict) -> dict:
    try:
        record = content.config_records["fed"]
        name, r = record["client"], record["round"]
    except (KeyError, TypeError, AttributeError):
        raise ReplyError("the reply has no 'fed' record with client and round") from None
    if not isinstance(name, str) or isinstance(r, bool) or not isinstance(r, int):
        raise ReplyError(f"the reply's client / round have the wrong types: {name!r}, {r!r}")
    return record


def decode_reply(content: RecordDict) -> tuple[str, int, bytes | None, dict]:
    """(client, round, blob or None, stats) of a reply. Stats keep only finite ``loss_*``
    floats (a node cannot write other keys into metrics.jsonl).

    Raises:
        ReplyError: the reply is malformed (a blob that is not bytes included).
    """
    record = _record(content)
    blob = record.get("blob")
    if blob is not None and not isinstance(blob, bytes):
        raise ReplyError(f"the reply's blob is a {type(blob).__name__}, not bytes")
    metrics = content.metric_records.get("metrics", {})
    stats = {k: float(v) for k, v in dict(metrics).items()
             if isinstance(k, str) and k.startswith("loss_") and isinstance(v, (int, float))
             and not isinstance(v, bool) and math.isfinite(v)}
    return record["client"], record["round"], blob, stats


def encode_result(name: str, round_index: int, result: dict) -> RecordDict:
    """ClientApp -> ServerApp, for an evaluate message: the client's evaluation (a round's
    {"P": ..} or its final results.json entry) as JSON, exact floats included."""
    import json

    return RecordDict({"fed": ConfigRecord({"client": name, "round": int(round_index),
                                            "result": json.dumps(result)})})


def decode_result(content: RecordDict) -> tuple[str, int, dict]:
    """(client, round, result) of an evaluate or query reply.

    Raises:
        ReplyError: the reply is malformed, or its result is not a JSON object.
    """
    import json

    record = _record(content)
    try:
        result = json.loads(record["result"])
    except (KeyError, TypeError, ValueError):
        raise ReplyError("the reply's result is not JSON") from None
    if not isinstance(result, dict):
        raise ReplyError("the reply's result is not a JSON object")
    return record["client"], record["round"], result
