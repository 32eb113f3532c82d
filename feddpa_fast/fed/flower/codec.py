"""The Flower messages: each carries the safetensors blob of ``fed/wire.py`` as bytes in a
``ConfigRecord`` (so the server's validation applies unchanged) plus the step and the round;
replies carry the client's name, the round, the reply blob and a ``MetricRecord`` of losses."""
from __future__ import annotations

from flwr.app import ConfigRecord, MetricRecord, RecordDict

__all__ = ["encode_request", "decode_request", "request_payload", "encode_reply",
           "decode_reply", "encode_result", "decode_result"]


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


def decode_reply(content: RecordDict) -> tuple[str, int, bytes | None, dict]:
    """(client, round, blob or None, stats) of a reply."""
    record = content.config_records["fed"]
    blob = record.get("blob")
    stats = dict(content.metric_records["metrics"]) if "metrics" in content.metric_records else {}
    return (str(record["client"]), int(record["round"]),
            bytes(blob) if blob is not None else None, stats)


def encode_result(name: str, round_index: int, result: dict) -> RecordDict:
    """ClientApp -> ServerApp, for an evaluate message: the client's evaluation (a round's
    {"P": ..} or its final results.json entry) as JSON, exact floats included."""
    import json

    return RecordDict({"fed": ConfigRecord({"client": name, "round": int(round_index),
                                            "result": json.dumps(result)})})


def decode_result(content: RecordDict) -> tuple[str, int, dict]:
    """(client, round, result) of an evaluate reply."""
    import json

    record = content.config_records["fed"]
    return str(record["client"]), int(record["round"]), json.loads(str(record["result"]))
