"""The ClientApp: one client of ``build_run`` per SuperNode, started with
``--node-config "partition-id=<i> state-dir='<dir>'"`` (``partition-id`` indexes the clients in
the data's order; ``state-dir`` is where its local adapters stay, never sent)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..algorithms import ALGORITHMS
from ..client import Client
from ..loading import load_data
from ..runner import Run, build_run
from .codec import decode_request, encode_reply
from .run_config import extra, from_flower

__all__ = ["client_app"]

client_app = ClientApp()
_RUNS: dict[tuple, Run] = {}  # one per (run config, node) in a long-lived ClientApp process


def _node_client(context: Context) -> tuple[Run, Client]:
    """This node's run and client, built once per run config."""
    cfg = from_flower(dict(context.run_config))
    torch.set_num_threads(extra(dict(context.run_config), "torch-threads"))
    node = dict(context.node_config)
    if "partition-id" not in node or "state-dir" not in node:
        raise ValueError("start the SuperNode with --node-config "
                         "\"partition-id=<i> state-dir='<dir>'\"")
    key = (json.dumps(cfg.identity(), sort_keys=True), int(node["partition-id"]),
           str(node["state-dir"]))
    if key not in _RUNS:
        if ALGORITHMS[cfg.algo].needs_every_client_at_setup:
            raise NotImplementedError(f"the Flower apps do not run {cfg.algo}: its setup reads "
                                      "every client's data")
        names = list(load_data(cfg)[0])
        index = int(node["partition-id"])
        if not 0 <= index < len(names):
            raise ValueError(f"partition-id {index}: the data has {len(names)} clients")
        _RUNS[key] = build_run(cfg, clients=[names[index]], state_root=Path(node["state-dir"]))
    run = _RUNS[key]
    return run, next(iter(run.clients.values()))


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    """Which client this node is."""
    _, client = _node_client(context)
    return Message(encode_reply(client.name, -1, None, {}), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    """A round ("round") or the post step ("post") on this node's client."""
    run, client = _node_client(context)
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
