"""Flower deployment engine (optional extra ``flower``: ``pip install -e ".[flower]"``).

A ``ServerApp`` and a ``ClientApp`` that call the same functions as the in-process loop
(``fed/runner.py``): ``Server.sample`` / ``round_broadcast`` / ``aggregate_round`` on the
ServerApp, ``Client.run_round`` on the ClientApps. Each message carries the safetensors blob of
``fed/wire.py`` as bytes in a ``ConfigRecord`` (so the server's validation applies unchanged)
plus the round; replies carry the reply blob and a ``MetricRecord`` of the phase losses.

* Run settings come from the run config (``[tool.flwr.app.config]`` of
  ``feddpa_fast/fed/flower_app/pyproject.toml``, overridable with ``flwr run -c``): the
  ``RunConfig`` fields with dashes (``max-steps``, ``test-limit``...); 0 / "" stand for None.
* A SuperNode says which client it is with ``--node-config "partition-id=<i> state-dir='<dir>'"``:
  ``partition-id`` indexes the clients in the data's order, ``state-dir`` is where its local
  adapters stay (``local_r<round>.safetensors``, never sent).
* The ServerApp writes ``checkpoint.safetensors`` (same format as the built-in loop),
  ``metrics.jsonl`` and ``adapters/global`` under ``out``; restarted with the same config, it
  resumes from the checkpoint's ``rounds_done``. There is no final evaluation here (the local
  adapters live on the SuperNodes).
* Same seed -> the same initial global adapter, the same sampling and the same aggregation as
  ``runner.run``; both sides use ``torch-threads`` CPU threads (default 1) for reproducibility.
* C2A is not supported (its hypernetwork is built from every client's data).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..adapters import adapter_state_dict, load_adapter_state_dict, save_adapter
from .algorithms import get_algorithm
from .checkpoint import derive_seed, resume_state, save_run_checkpoint, truncate_metrics
from .client import Client, TrainSettings, init_adapter
from .runner import RunConfig, _load_data, build_task
from .server import Server, ServerSettings, round_row

__all__ = ["server_app", "client_app", "run_config_from_flower", "encode_request",
           "decode_request", "encode_reply", "decode_reply"]

log = logging.getLogger("feddpa_fast.fed")

_OPTIONAL = {"targets", "max_steps", "clients_per_round", "clip_norm", "test_limit", "hostile"}
_EXTRA = {"torch-threads": 1, "round-timeout": 600.0, "node-wait": 120.0}


# ---- run config ---------------------------------------------------------------------------
def run_config_from_flower(run_config: dict) -> RunConfig:
    """The RunConfig of a Flower run config (dashed field names; 0 / "" mean None)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    kw = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if key in _EXTRA:
            continue
        if name not in fields or name == "weighting":
            raise ValueError(f"unknown run config key {key!r}")
        if name in _OPTIONAL and value in (0, "", 0.0):
            value = None
        elif name == "targets":
            value = tuple(t.strip() for t in str(value).split(",") if t.strip())
        kw[name] = value
    return RunConfig(**kw)


def _extra(run_config: dict, key: str):
    return type(_EXTRA[key])(run_config.get(key, _EXTRA[key]))


# ---- messages ------------------------------------------------------------------------------
def encode_request(step: str, round_index: int, blob: bytes | None = None) -> RecordDict:
    """ServerApp -> ClientApp: the step ("round" | "post"), the round and the broadcast blob."""
    record = {"step": step, "round": int(round_index)}
    if blob is not None:
        record["blob"] = bytes(blob)
    return RecordDict({"fed": ConfigRecord(record)})


def decode_request(content: RecordDict) -> tuple[str, int, bytes | None]:
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
    record = content.config_records["fed"]
    blob = record.get("blob")
    stats = dict(content.metric_records["metrics"]) if "metrics" in content.metric_records else {}
    return (str(record["client"]), int(record["round"]),
            bytes(blob) if blob is not None else None, stats)


# ---- ClientApp -------------------------------------------------------------------------------
client_app = ClientApp()
_CLIENTS: dict[tuple, Client] = {}  # one per (run config, node) in a long-lived ClientApp process


def _client(context: Context) -> Client:
    cfg = run_config_from_flower(dict(context.run_config))
    torch.set_num_threads(_extra(dict(context.run_config), "torch-threads"))
    node = dict(context.node_config)
    if "partition-id" not in node or "state-dir" not in node:
        raise ValueError("start the SuperNode with --node-config "
                         "\"partition-id=<i> state-dir='<dir>'\"")
    key = (json.dumps(cfg.identity(), sort_keys=True), int(node["partition-id"]),
           str(node["state-dir"]))
    if key not in _CLIENTS:
        algorithm = get_algorithm(cfg.algo)
        if cfg.algo == "c2a":
            raise NotImplementedError("the Flower apps do not run C2A")
        train, test = _load_data(cfg)
        names = list(train)
        index = int(node["partition-id"])
        if not 0 <= index < len(names):
            raise ValueError(f"partition-id {index}: the data has {len(names)} clients")
        name = names[index]
        hostile = set(names[: cfg.hostile_clients]) if cfg.hostile else set()
        task = build_task(cfg)
        settings = TrainSettings(cfg.local_epochs, cfg.lr, cfg.batch_size, cfg.max_steps or None)
        _CLIENTS[key] = Client(name, train[name], test[name], Path(node["state-dir"]) / name,
                               task, algorithm, settings, cfg.seed,
                               attack=cfg.hostile if name in hostile else None)
    return _CLIENTS[key]


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    """Which client this node is."""
    c = _client(context)
    return Message(encode_reply(c.name, -1, None, {}), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    c = _client(context)
    step, r, blob = decode_request(message.content)
    expected = _expected(c)
    if step == "round":
        c.discard_uncommitted(r)  # leftovers of an interrupted attempt at this round
        reply, stats = c.run_round(blob, r, expected)
    elif step == "post":
        from . import wire
        global_tensors, _ = wire.decode(blob, expected, round=r, sender="server")
        stats = {}
        if c.algorithm.post == "finetune":
            c.discard_uncommitted(r)
            stats = c.finetune_local(r, global_tensors)
        elif c.algorithm.post == "search":
            from .runner import _fusion_search
            cfg = run_config_from_flower(dict(context.run_config))
            _fusion_search(c.task, c, SimpleNamespace(global_adapter=global_tensors), cfg)
        reply = None
    else:
        raise ValueError(f"unknown step {step!r}")
    return Message(encode_reply(c.name, r, reply, stats), reply_to=message)


def _expected(c: Client) -> dict[str, torch.Tensor]:
    """The global adapter's keys, shapes and dtypes (what a broadcast is validated against)."""
    return adapter_state_dict(c.task.model, "global")


# ---- ServerApp -------------------------------------------------------------------------------
server_app = ServerApp()


def _discover(grid: Grid, names: list[str], wait_s: float) -> dict[str, int]:
    """{client name: node id}: asks every connected node which client it is, until every
    client of the run has a node (or ``wait_s`` passes)."""
    deadline = time.monotonic() + wait_s
    found: dict[str, int] = {}
    asked: set[int] = set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            msgs = [grid.create_message(RecordDict(), "query", n, "discover") for n in new]
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                if reply.has_error():
                    continue
                name = decode_reply(reply.content)[0]
                found[name] = reply.metadata.src_node_id
                asked.add(reply.metadata.src_node_id)
        missing = [n for n in names if n not in found]
        if not missing:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SuperNode for clients {missing} after {wait_s:.0f} s")
        time.sleep(0.5)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))


def run_server(grid: Grid, run_config: dict) -> dict[str, torch.Tensor]:
    """The rounds of ``runner.run`` over a Flower Grid; returns the final global adapter."""
    cfg = run_config_from_flower(run_config)
    torch.set_num_threads(_extra(run_config, "torch-threads"))
    round_timeout = _extra(run_config, "round-timeout")
    algorithm = get_algorithm(cfg.algo)
    if cfg.algo == "c2a":
        raise NotImplementedError("the Flower apps do not run C2A")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.safetensors"
    task = build_task(cfg)  # same seeded model and global init as runner.run
    train, _ = _load_data(cfg)
    names = list(train)
    init_adapter(task.model, "global", derive_seed(cfg.seed, "global-init"))
    server = Server(adapter_state_dict(task.model, "global"), names,
                    ServerSettings(fraction=cfg.fraction, per_round=cfg.clients_per_round,
                                   aggregation=cfg.aggregation, trim=cfg.trim,
                                   clip_norm=cfg.clip_norm, min_clients=cfg.min_clients),
                    cfg.seed)
    done, post_done = 0, False
    if ckpt_path.exists():  # a restarted ServerApp: carry the round offset
        server.global_adapter, done, post_done = resume_state(ckpt_path, cfg.identity())
        log.info("resuming at round %d", done)
    metrics_path = out / "metrics.jsonl"
    truncate_metrics(metrics_path, done)
    nodes = _discover(grid, names, _extra(run_config, "node-wait"))

    def checkpoint(rounds_done: int, post_finished: bool) -> None:
        save_run_checkpoint(ckpt_path, server.global_adapter, cfg.identity(), cfg.seed,
                            rounds_done, post_finished)

    def exchange(step: str, r: int, sampled: list[str], blob: bytes):
        msgs = [grid.create_message(encode_request(step, r, blob), "train", nodes[n], str(r))
                for n in sampled]
        replies: dict[str, bytes | BaseException] = {n: TimeoutError("no reply") for n in sampled}
        stats = []
        by_node = {nodes[n]: n for n in sampled}
        for msg in grid.send_and_receive(msgs, timeout=round_timeout):
            name = by_node.get(msg.metadata.src_node_id)
            if name is None:
                continue
            if msg.has_error():
                replies[name] = RuntimeError(f"ClientApp error: {msg.error.reason}")
                continue
            _, reply_round, blob_back, s = decode_reply(msg.content)
            stats.append(s)
            if blob_back is None:  # nothing to aggregate (no upload, or the post step)
                replies.pop(name)
            elif reply_round != r:
                replies[name] = ValueError(f"reply for round {reply_round}, expected {r}")
            else:
                replies[name] = blob_back
        return replies, stats

    for r in range(done, cfg.rounds):
        round_start = time.perf_counter()
        sampled, broadcast, replies, stats, accepted = server.run_round(
            r, lambda r_, sampled_, blob: exchange("round", r_, sampled_, blob),
            algorithm.uploads)
        checkpoint(r + 1, False)
        row = round_row(r, sampled, accepted, replies, broadcast, stats)
        row["round_s"] = time.perf_counter() - round_start
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("round %d: %d/%d updates", r, len(accepted), len(sampled))
    if algorithm.post and not post_done:
        replies, _ = exchange("post", cfg.rounds, names, server.round_broadcast(cfg.rounds))
        failed = [n for n, v in replies.items() if isinstance(v, BaseException)]
        if failed:
            raise RuntimeError(f"post-training step failed on {failed}")
        checkpoint(cfg.rounds, True)
    if algorithm.uploads:
        load_adapter_state_dict(task.model, server.global_adapter, "global")
        save_adapter(task.model, out / "adapters" / "global", adapter="global")
    return server.global_adapter
