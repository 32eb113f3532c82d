"""Personalised generation for many clients of a finished run, in batches across clients
(``feddpa-fast generate``; docs/trainer.md, "Generating for many clients").

``ClientGenerator.from_run(DIR)`` rebuilds the run as ``feddpa-fast eval`` does (its
configuration from the checkpoint, the base model, the final global adapter, every client's
local adapter from its state directory), puts every client in the model's client bank
(fed/client_pool.py) and answers (client, instruction, input) requests the way the client's
final evaluation answers: FedDPA's instance-wise weights (each client's anchor representations
computed once and cached), FDLoRA's fusion weights, the local or the global adapter alone.
A batch holds rows of any clients. C2A, whose evaluation swaps in generated adapters per
client, answers one client at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import MissingFileError
from .checkpoint import CheckpointError, resume_state
from .client_pool import ClientPool
from .data import DataError, LMExample, str_field
from .final import entered
from .loading import data_digests, load_data
from .options import ConfigError

__all__ = ["Answer", "ClientGenerator", "Request", "check_clients", "generate_file",
           "read_requests", "run_clients", "write_answers"]


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt for one client: ``instruction`` and optional ``input`` as in the training
    JSONL."""

    client: str
    instruction: str
    input: str = ""


@dataclasses.dataclass(frozen=True)
class Answer:
    """A generated answer and the (global, local) weights its client's mix gave the prompt."""

    output: str
    global_w: float
    local_w: float


class ClientGenerator:
    """Answers prompts for the clients of a finished causal-LM run, batching across clients."""

    def __init__(self, run, *, batch_size: int = 32, progress: bool = False):
        """Use ``from_run``. ``run``: a built ``Run`` whose server holds the final global."""
        self.run, self.progress = run, progress
        evaluation = run.algorithm.final_evaluation(next(iter(run.clients.values())))
        self.pool = (ClientPool(run, batch_size=batch_size, progress=progress)
                     if evaluation.context is None else None)
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, batch_size: int = 32,
                 progress: bool = False) -> ClientGenerator:
        """The generator of a finished run.

        Args:
            run_dir: the run's ``--out`` directory (its checkpoint and client states).
            batch_size: prompts, of any clients, per ``generate`` call of the model.
            progress: progress bars.
        Returns:
            A ``ClientGenerator``.
        Raises:
            MissingFileError: no checkpoint in ``run_dir``. CheckpointError: the run is not
                finished, or its data changed since. ConfigError: not a causal-LM run, or a base
                model that is not available (names ``--model``).
        """
        from .algorithms import get_algorithm
        from .runner import build_run, config_from_checkpoint

        checkpoint = Path(run_dir) / "checkpoint.safetensors"
        if not checkpoint.is_file():
            raise MissingFileError(f"{run_dir}: no checkpoint.safetensors (not a run directory)")
        cfg, state = config_from_checkpoint(run_dir)
        if not state.finished(cfg.rounds, get_algorithm(cfg).post_step):
            raise CheckpointError(f"{run_dir}: the run stopped after {state.rounds_done} of "
                                  f"{cfg.rounds} rounds; finish it with train --resume first")
        if cfg.task != "causal-lm":
            raise ConfigError(f"{run_dir}: generate needs a causal-lm run; this one is "
                              f"--task {cfg.task}")
        run = build_run(cfg)  # every client: a method's setup may read them all (C2A)
        run.server.global_adapter, _ = resume_state(checkpoint, cfg.identity(),
                                                    data_digests(cfg))
        return cls(run, batch_size=batch_size, progress=progress)

    @property
    def clients(self) -> list[str]:
        """The clients this generator serves."""
        return list(self.run.clients)

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """One answer per request, in order; rows of all clients share batches.

        Raises:
            ValueError: a request names a client this generator does not serve.
        """
        unknown = sorted({r.client for r in requests} - set(self.run.clients))
        if unknown:
            raise ValueError(f"unknown client(s) {unknown}; this run serves {self.clients}")
        if not requests:
            return []
        clients = [r.client for r in requests]
        examples = [LMExample(r.instruction, r.input, "", r.client) for r in requests]
        if self.pool is None:
            return self._one_client_at_a_time(clients, examples)
        from tqdm.auto import tqdm

        # Each client's rows together, shortest prompts first: a batch mixes clients only where
        # one client's rows do not fill it, so no batch pads or decodes longer than the
        # per-client loop's would (a batch runs until its longest answer ends).
        order = sorted(range(len(requests)), key=lambda i: (
            clients[i], len(requests[i].instruction) + len(requests[i].input)))
        clients, examples = [clients[i] for i in order], [examples[i] for i in order]
        (global_w, local_w), = self.pool.weights(clients, examples).values()
        with tqdm(total=len(examples), desc="generate", disable=not self.progress) as bar:
            outputs = self.pool.predict(clients, examples, global_w, local_w, bar.update)
        answers = [None] * len(requests)
        for i, o, g, w in zip(order, outputs, global_w, local_w):
            answers[i] = Answer(o, float(g), float(w))
        return answers

    def _one_client_at_a_time(self, clients, examples) -> list[Answer]:
        """A method whose evaluation enters a per-client context (C2A): client by client."""
        run, answers = self.run, [None] * len(examples)
        for name in dict.fromkeys(clients):
            client = run.clients[name]
            run.algorithm.receive(client, run.server.message(client.name), None)
            evaluation = run.algorithm.final_evaluation(client)
            rows = [i for i, c in enumerate(clients) if c == name]
            g, w = evaluation.mode  # such a method's mode is a fixed (global_w, local_w)
            with entered(evaluation):
                for i in range(0, len(rows), self.batch_size):
                    batch = rows[i:i + self.batch_size]
                    outputs = run.task.predict([examples[j] for j in batch], g, w)
                    for j, output in zip(batch, outputs):
                        answers[j] = Answer(output, float(g), float(w))
        return answers

    def close(self) -> None:
        """Drops the client bank from the model."""
        if self.pool is not None:
            self.pool.close()


def read_requests(path: str | os.PathLike) -> tuple[list[dict], list[Request]]:
    """(the JSON objects, the requests) of a JSONL file of ``{"client", "instruction",
    "input"?}`` lines (blank lines skipped).

    Raises:
        MissingFileError: no such file. DataError: bad JSON, a missing or non-string field, or
            no request at all, naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--input {path}: no such file")
    objects, requests = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a line must be a JSON object, got {type(obj).__name__}")
        requests.append(Request(str_field(obj, "client", where, nonempty=True),
                                str_field(obj, "instruction", where, nonempty=True),
                                str_field(obj, "input", where, required=False) or ""))
        objects.append({**obj, "_line": number})
    if not requests:
        raise DataError(f"--input {path}: no requests (the file is empty)")
    return objects, requests


def check_clients(objects: list[dict], requests: list[Request], served: Sequence[str],
                  path) -> None:
    """Raises DataError naming the first line whose client the run does not have."""
    for obj, request in zip(objects, requests):
        if request.client not in served:
            raise DataError(f"{path}:{obj['_line']}: unknown client {request.client!r}; the "
                            f"run's clients are {list(served)}")


def write_answers(path: str | os.PathLike, objects: list[dict], answers: list[Answer]) -> Path:
    """Writes each input object plus ``output``, ``global_w`` and ``local_w`` as JSONL,
    atomically (all lines or none)."""
    lines = []
    for obj, answer in zip(objects, answers):
        row = {k: v for k, v in obj.items() if k != "_line"}
        row.update(output=answer.output, global_w=answer.global_w, local_w=answer.local_w)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(lines).encode())
    return path


def run_clients(run_dir) -> list[str]:
    """The client names of the run in ``run_dir`` (from its configuration and data)."""
    from .runner import config_from_checkpoint

    checkpoint = Path(run_dir) / "checkpoint.safetensors"
    if not checkpoint.is_file():
        raise MissingFileError(f"--run {run_dir}: no checkpoint.safetensors (not a run "
                               "directory)")
    cfg, _ = config_from_checkpoint(run_dir)
    return list(load_data(cfg)[0])


def generate_file(run_dir, input_path, out_path, *, batch_size: int = 32,
                  progress: bool = True) -> int:
    """``feddpa-fast generate``: answers every line of ``input_path`` into ``out_path``.

    Returns:
        The number of answers written.
    """
    objects, requests = read_requests(input_path)
    check_clients(objects, requests, run_clients(run_dir), input_path)
    generator = ClientGenerator.from_run(run_dir, batch_size=batch_size, progress=progress)
    try:
        answers = generator.generate(requests)
    finally:
        generator.close()
    write_answers(out_path, objects, answers)
    return len(answers)

