"""The ClientApp: one client of the run per SuperNode, started with
``--node-config "partition-id=<i> state-dir='<dir>'"`` (``partition-id`` indexes the clients in
the data's order; ``state-dir`` is where its local adapters stay, never sent).

A node answers ``query`` "discover" (which client it is) and "setup" (the method's setup
report), then ``train`` ("round", "post") and ``evaluate`` ("round", "final") messages, each
carrying the setup's shared result, with which the node builds its ``Run``
(``PreparedRun.build``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .. import final, wire
from ..client import Client
from ..loading import load_data
from ..runner import PreparedRun, Run, prepare_run
from .codec import decode_request, encode_reply, encode_result, request_payload
from .flower_config import extra, from_flower

__all__ = ["client_app"]

client_app = ClientApp()
_RUNS: dict[tuple, PreparedRun] = {}  # one per (run config, node) in a long-lived process
_BUILT: dict[tuple, tuple[dict, Run]] = {}  # the Run of each, built for its setup result


def _node_run(context: Context) -> tuple[PreparedRun, Client]:
    """This node's prepared run and client, prepared once per run config."""
    cfg = from_flower(dict(context.run_config))
    torch.set_num_threads(extra(dict(context.run_config), "torch-threads"))
    node = dict(context.node_config)
    if "partition-id" not in node or "state-dir" not in node:
        raise ValueError("start the SuperNode with --node-config "
                         "\"partition-id=<i> state-dir='<dir>'\"")
    key = (json.dumps(cfg.identity(), sort_keys=True), cfg.out, int(node["partition-id"]),
           str(node["state-dir"]))
    if key not in _RUNS:
        names = list(load_data(cfg)[0])
        index = int(node["partition-id"])
        if not 0 <= index < len(names):
            raise ValueError(f"partition-id {index}: the data has {len(names)} clients")
        _RUNS[key] = prepare_run(cfg, clients=[names[index]], state_root=Path(node["state-dir"]))
    prepared = _RUNS[key]
    return prepared, next(iter(prepared.clients.values()))


def _joined(message: Message, context: Context) -> tuple[Run, Client]:
    """This node's run, built with the setup's shared result that every train and
    evaluate message carries (a node may be a fresh process per message: Flower's subprocess
    isolation keeps nothing between them)."""
    prepared, client = _node_run(context)
    shared = request_payload(message.content)
    if shared is None:
        raise ValueError(f"node of {client.name}: the message carries no setup result")
    key = id(prepared)
    if key not in _BUILT or _BUILT[key][0] != shared:
        _BUILT[key] = (shared, prepared.build(shared=shared))
    return _BUILT[key][1], client


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    """Which client this node is ("discover") or its setup report ("setup")."""
    run, client = _node_run(context)
    step = decode_request(message.content)[0]
    result = {}
    if step == "setup":
        progress = request_payload(message.content) or {}
        client.discard_uncommitted(int(progress.get("rounds_done", 0)),
                                   bool(progress.get("post_done", False)))
        result = {"report": run.setup_report(client.name)}
    elif step != "discover":
        raise ValueError(f"unknown query step {step!r}")
    return Message(encode_result(client.name, -1, result), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    """A round ("round") or the post step ("post") on this node's client."""
    run, client = _joined(message, context)
    expected = run.server.expected()  # keys, shapes and dtypes a broadcast must have
    step, r, blob = decode_request(message.content)
    if step == "round":
        client.discard_uncommitted(r)  # leftovers of an interrupted attempt at this round
        reply, stats = client.run_round(blob, r, expected)
    elif step == "post":
        reply, stats = None, client.post_train(blob, r, expected)
    else:
        raise ValueError(f"unknown step {step!r}")
    return Message(encode_reply(client.name, r, reply, stats), reply_to=message)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    """The method's evaluation where the local adapter lives: after a round ("round": the
    own-task P) or at the end ("final": the results.json entry; the adapters stay here)."""
    run, client = _joined(message, context)
    step, r, blob = decode_request(message.content)
    received, _ = wire.decode(blob, run.server.expected(), round=r, sender="server")
    if step == "round":
        result = {"P": final.round_score(run, client, received, r)}
    elif step == "final":
        # The local adapter in PEFT format stays on this node: <state-dir>/adapters/<client>/local
        result = final.final_entry(run, client, received,
                                   outputs=Path(dict(context.node_config)["state-dir"]))
    else:
        raise ValueError(f"unknown evaluation step {step!r}")
    return Message(encode_result(client.name, r, result), reply_to=message)
