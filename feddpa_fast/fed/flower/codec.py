"""The Flower messages: each carries the safetensors blob of ``fed/wire.py`` as bytes in a
``ConfigRecord`` (so the server's validation applies unchanged) plus the step and the round;
replies carry the client's name, the round, the reply blob and a ``MetricRecord`` of losses."""
from __future__ import annotations

from flwr.app import ConfigRecord, MetricRecord, RecordDict

__all__ = ["encode_request", "decode_request", "encode_reply", "decode_reply"]


def encode_request(step: str, round_index: int, blob: bytes | None = None) -> RecordDict:
    """ServerApp -> ClientApp: the step ("round" | "post"), the round and the broadcast blob."""
    record = {"step": step, "round": int(round_index)}
    if blob is not None:
        record["blob"] = bytes(blob)
    return RecordDict({"fed": ConfigRecord(record)})


def decode_request(content: RecordDict) -> tuple[str, int, bytes | None]:
    """(step, round, blob or None) of a request."""
    record = content.config_records["fed"]
    blob = record.get("blob")
    return str(record["step"]), int(record["round"]), (bytes(blob) if blob is not None else None)


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
