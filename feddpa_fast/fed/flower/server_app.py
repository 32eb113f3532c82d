"""The ServerApp: ``Run.run`` (fed/runner.py) with the Grid as its transport. It writes
``checkpoint.safetensors`` (the built-in loop's format), ``metrics.jsonl`` and
``adapters/global`` under ``out``; restarted with the same config, it resumes from the
checkpoint's ``rounds_done``. Same seed: the same initial global adapter, sampling and
aggregation as the built-in loop. Evaluation (every ``eval-every`` rounds and at the end) runs
on the SuperNodes, where the local adapters live; they reply with their scores and the
ServerApp writes results.json and the plots as the built-in loop does."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .. import final
from ..checkpoint import load_checkpoint
from ..runner import prepare_run, with_run_dtype
from .codec import ReplyError, decode_reply, decode_result, encode_request
from .flower_config import extra, from_flower

__all__ = ["GridTransport", "server_app", "run_server"]

log = logging.getLogger("feddpa_fast.fed")

server_app = ServerApp()


def discover(grid: Grid, names: list[str], wait_s: float) -> dict[str, int]:
    """{client name: node id}: asks every connected node which client it is, until every
    client of the run has a node (or ``wait_s`` passes)."""
    deadline = time.monotonic() + wait_s
    found: dict[str, int] = {}
    asked: set[int] = set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            msgs = [grid.create_message(encode_request("discover", -1), "query", n, "discover")
                    for n in new]
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                node = reply.metadata.src_node_id
                try:
                    name = None if reply.has_error() else decode_result(reply.content)[0]
                except ReplyError:
                    name = None
                if name in found and found[name] != node:
                    log.warning("nodes %d and %d both claim client %s; the first one keeps it",
                                found[name], node, name)
                    asked.add(node)
                elif name in names:
                    found[name] = node
                    asked.add(node)  # (a node that failed to answer is asked again)
        missing = [n for n in names if n not in found]
        if not missing:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SuperNode for clients {missing} after {wait_s:.0f} s")
        time.sleep(0.5)


def _valid_score(result: dict) -> bool:
    p = result.get("P")
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1


class GridTransport:
    """The ``Transport`` (fed/transport.py) of a Run as Flower messages to the nodes of its
    clients."""

    def __init__(self, prepared, grid: Grid, nodes: dict[str, int], round_timeout: float):
        self.prepared, self.grid, self.nodes = prepared, grid, nodes
        self.round_timeout = round_timeout
        self.run = None  # the Run, built by ``setup``

    def _send(self, step: str, r: int, sampled: list[str], blobs: dict[str, bytes]):
        msgs = [self.grid.create_message(encode_request(step, r, blobs[n], self.run.shared),
                                         "train", self.nodes[n], str(r)) for n in sampled]
        replies: dict[str, bytes | BaseException] = {n: TimeoutError("no reply") for n in sampled}
        stats = []
        by_node = {self.nodes[n]: n for n in sampled}
        for msg in self.grid.send_and_receive(msgs, timeout=self.round_timeout):
            name = by_node.get(msg.metadata.src_node_id)
            if name is None:
                continue
            if msg.has_error():
                replies[name] = RuntimeError(f"ClientApp error: {msg.error.reason}")
                continue
            try:
                _, reply_round, blob_back, s = decode_reply(msg.content)
            except ReplyError as exc:  # a malformed reply is a failed one
                replies[name] = exc
                continue
            stats.append(s)
            if blob_back is None:  # nothing to aggregate (no upload, or the post step)
                replies.pop(name)
            elif reply_round != r:
                replies[name] = ValueError(f"reply for round {reply_round}, expected {r}")
            else:
                replies[name] = blob_back
        return replies, stats

    def exchange(self, r: int, sampled: list[str], broadcasts: dict[str, bytes]):
        """One round's messages; a node that fails or does not reply is left out."""
        return self._send("round", r, sampled, broadcasts)

    def post_train(self, rounds: int, broadcasts: dict[str, bytes]) -> None:
        """The method's post step on every node; raises if a node failed it."""
        replies, _ = self._send("post", rounds, list(self.run.server.client_names), broadcasts)
        failed = [n for n, v in replies.items() if isinstance(v, BaseException)]
        if failed:
            raise RuntimeError(f"post-training step failed on {failed}")

    def ask(self, message_type: str, step: str, r: int, blobs: dict[str, bytes] | None = None,
            payload: dict | None = None, check=lambda result: True,
            at_least: int | None = None) -> dict[str, dict]:
        """{client: its result} from one message to every client's node (carrying its blob in
        ``blobs``, if any); a result that is malformed, for another client or round, or fails
        ``check`` counts as no reply.

        Raises naming the nodes that gave no valid reply when fewer than ``at_least`` did
        (None: every node must reply, as the setup needs)."""
        names = list(self.prepared.names)
        msgs = [self.grid.create_message(
            encode_request(step, r, None if blobs is None else blobs[n], payload), message_type,
            self.nodes[n], f"{step}-{r}") for n in names]
        by_node = {self.nodes[n]: n for n in names}
        results: dict[str, dict] = {}
        for msg in self.grid.send_and_receive(msgs, timeout=self.round_timeout):
            name = by_node.get(msg.metadata.src_node_id)
            if name is None or msg.has_error():
                continue
            try:
                claimed, reply_round, result = decode_result(msg.content)
            except ReplyError as exc:
                log.warning("%s %s: node of %s: %s; ignored", message_type, step, name, exc)
                continue
            if claimed == name and reply_round == r and check(result):
                results[name] = result
        missing = [n for n in names if n not in results]
        needed = len(names) if at_least is None else at_least
        if len(results) < needed:
            raise RuntimeError(f"{message_type} {step} (round {r}): no valid reply from "
                               f"{missing}" + ("" if at_least is None else
                                               f"; {len(results)} replied, min_clients is "
                                               f"{at_least}"))
        if missing:
            log.warning("%s %s (round %d): no valid reply from %s; scored without them",
                        message_type, step, r, missing)
        return results

    def setup(self, rounds_done: int, post_done: bool):
        """The method's setup exchange before round 0: every node drops the local adapters the
        checkpoint does not cover (as ``Run._restore`` does in process) and sends its report;
        the setup's shared result then goes with every train and evaluate message. Returns
        the built ``Run``."""
        progress = {"rounds_done": rounds_done, "post_done": post_done}
        results = self.ask("query", "setup", -1, payload=progress,
                           check=lambda result: "report" in result)
        reports = {n: result["report"] for n, result in results.items()}
        self.run = self.prepared.build(reports=reports)  # run.shared goes with every message
        return self.run

    def round_score(self, r: int) -> tuple[float, list[str]]:
        """(mean own-task P after round ``r``, each node scoring its own client; the clients
        whose node gave no valid score). A missing node is left out, as in training, unless
        fewer than ``min_clients`` replied."""
        names = self.run.server.client_names
        results = self.ask("evaluate", "round", r, self.run.server.broadcasts(r, names),
                           self.run.shared, check=_valid_score,
                           at_least=self.run.cfg.min_clients)
        scores = [results[n]["P"] for n in names if n in results]
        return sum(scores) / len(scores), [n for n in names if n not in results]

    def finish(self, wall_start: float) -> dict:
        """Every node's final entry, then results.json, the metrics line and the plots."""
        rounds = self.run.cfg.rounds
        server = self.run.server
        per_client = self.ask("evaluate", "final", rounds,
                              server.broadcasts(rounds, server.client_names), self.run.shared,
                              at_least=self.run.cfg.min_clients)
        return final.finish(self.run, per_client, wall_start)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))


def run_server(grid: Grid, run_config: dict) -> dict:
    """The built-in loop over a Flower Grid: the setup exchange, the rounds, federated
    evaluation; returns the results dict (also written to results.json)."""
    cfg = from_flower(run_config)
    torch.set_num_threads(extra(run_config, "torch-threads"))
    # A restarted ServerApp keeps the base dtype its checkpoint recorded (an unset dtype).
    cfg, _ = with_run_dtype(cfg, Path(cfg.out) / "checkpoint.safetensors")
    prepared = prepare_run(cfg, clients=[])  # the same seeded model as the built-in loop
    nodes = discover(grid, prepared.names, extra(run_config, "node-wait"))
    transport = GridTransport(prepared, grid, nodes, extra(run_config, "round-timeout"))
    resume = prepared.checkpoint_path.exists()  # a restarted ServerApp carries the round offset
    done, post_done = 0, False
    if resume:
        _, state = load_checkpoint(prepared.checkpoint_path)
        done, post_done = state.rounds_done, state.post_done
        log.info("resuming from %s at round %d", prepared.checkpoint_path, done)
    run = transport.setup(done, post_done)  # the same initial global state as the built-in loop
    return run.run(transport, resume=resume, progress=False)
