"""A Flower Grid in one process: the real ServerApp code (``run_server``) talks to the real
ClientApp handlers, one Context per node, with a hook that can tamper with or drop replies
(hostile and broken SuperNodes). Fast and deterministic; the real deployment on loopback is
tests/flower_deploy.py."""
from __future__ import annotations

import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from feddpa_fast.fed.flower.client_app import client_app


class FakeGrid:
    """``nodes``: {node id: node_config}. ``tamper(message, reply) -> reply | None`` sees
    every reply (None: the node does not answer in time)."""

    def __init__(self, nodes: dict[int, dict], run_config: dict, tamper=None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=cfg,
                                      state=RecordDict(), run_config=run_config)
                         for nid, cfg in nodes.items()}
        self.tamper = tamper or (lambda message, reply: reply)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            reply = client_app(message, self.contexts[message.metadata.dst_node_id])
            reply = self.tamper(message, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def node_configs(tmp_path, n: int) -> dict[int, dict]:
    """Node ids 101, 102, ...: partition i, its own state directory."""
    return {101 + i: {"partition-id": i, "state-dir": str(tmp_path / f"node{i}")}
            for i in range(n)}


def one_thread(fn, *args, **kwargs):
    """Runs ``fn`` with one torch thread (as the apps' torch-threads = 1), then restores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
