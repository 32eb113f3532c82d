"""One federated run, whatever carries its messages (docs/ARCHITECTURE.md §3).

``build_run(cfg)`` builds the parts (task, method, server, clients); ``Run.run(transport)``
plays the rounds over a transport: ``InProcess`` (fed/in_process.py, the default) or the Flower
Grid (fed/flower/server_app.py). ``run(cfg)`` is what ``feddpa-fast train`` calls.

Output directory layout:
    checkpoint.safetensors     global state + run state, written atomically after each round
    clients/<name>/            each client's state: local_r<round>.safetensors (+ the method's)
    metrics.jsonl              one line per round (losses, P, bytes, timings), then a final line
    adapters/global/           the final global adapter in PEFT's format
    adapters/<client>/local/   each client's final local adapter in PEFT's format
    results.json               final P / TTP per client and their means
    plots/rounds.png           per-round loss and own-task score
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

from ..errors import MissingFileError, RunExistsError
from .algorithms import Algorithm, get_algorithm
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    resume_state,
    save_checkpoint,
    truncate_metrics,
)
from .client import Client, TrainSettings
from .loading import build_task, data_digests, load_data
from .privacy import epsilon
from .run_config import ConfigError, RunConfig
from .run_state import RunState
from .server import Server, ServerSettings, round_row
from .transport import Transport

__all__ = ["PreparedRun", "Run", "build_run", "prepare_run", "run", "config_from_checkpoint",
           "evaluate_run", "with_run_dtype"]

log = logging.getLogger("feddpa_fast.fed")


def round_line(r: int, row: dict, sampled: int) -> str:
    """The one-line summary of a round."""
    losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
    p = f" | P {100 * row['P']:.1f}%" if "P" in row else ""
    return (f"round {r}: {len(row['accepted'])}/{sampled} updates | loss {losses}{p} | "
            f"up {row['bytes_up_per_client']:,} B/client | server {1e3 * row['server_s']:.0f} ms"
            f" | {row['round_s']:.1f} s")


@dataclasses.dataclass
class PreparedRun:
    """A run's parts before the method's setup (``prepare_run``): the task, the method and the
    clients that live in this process (all of them in process; one on a Flower ClientApp;
    none on the ServerApp). ``build`` runs the setup and makes the ``Run``, once."""

    cfg: RunConfig
    task: object
    algorithm: Algorithm
    clients: dict[str, Client]
    test: dict[str, list]
    started: float  # wall_s counts from here
    names: list[str]  # every client of the run
    reports: dict = dataclasses.field(default_factory=dict)  # the local clients' setup reports

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out) / "checkpoint.safetensors"

    def setup_report(self, name: str):
        """A local client's setup report for the method (computed once)."""
        if name not in self.reports:
            self.reports[name] = self.algorithm.setup_report(self.task, self.clients[name])
        return self.reports[name]

    def build(self, *, reports: dict | None = None, shared: dict | None = None) -> Run:
        """The method's setup, every local client joined, and the server: the ``Run``.

        Args:
            reports: the clients' setup reports gathered elsewhere (the Flower ServerApp);
                default: the local clients'.
            shared: the setup's result, given to a Flower node instead of computing it.
        """
        if shared is None:
            if reports is None:
                reports = {name: self.setup_report(name) for name in self.clients}
            shared = self.algorithm.setup(self.task, reports)
        for name, client in self.clients.items():
            self.algorithm.join(self.task, client, shared, self.setup_report(name))
        server = Server(self.algorithm.initial_global(self.task), self.names,
                        ServerSettings.from_config(self.cfg), self.cfg.seed, self.algorithm)
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(PreparedRun)}
        return Run(**parts, server=server, shared=shared)


@dataclasses.dataclass(kw_only=True)
class Run(PreparedRun):
    """One run, built once (``PreparedRun.build`` / ``build_run``): the prepared parts, the
    server and the method's shared setup result; ``run(transport)`` plays it."""

    server: Server
    shared: dict  # what the method's setup gave every client
    sample_rates: list[float] = dataclasses.field(default_factory=list)  # the DP account's steps
    evaluation_only: bool = False  # `eval --run`: the training's wall_s is kept (final.finish)
    pooled_eval: bool = True  # the final evaluation batches rows across clients (final.py)
    data_sha256: dict = dataclasses.field(default_factory=dict)  # set by _restore, checkpointed

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def run(self, transport: Transport | None = None, *, resume: bool = False,
            progress: bool = True):
        """Plays (or resumes) the rounds, the post step and the final step over ``transport``.

        Args:
            transport: a ``Transport`` (fed/transport.py): ``InProcess`` (default) or the
                Flower ServerApp's ``GridTransport``.
            resume: continue from ``checkpoint.safetensors`` in ``cfg.out``.
            progress: progress bars and a line per round on stderr.

        Returns:
            What ``transport.finish`` returns (in-process: the results dict of results.json).
        """
        from tqdm.auto import tqdm

        from .in_process import InProcess

        transport = transport or InProcess(self, progress)
        self.out.mkdir(parents=True, exist_ok=True)
        done, post_done = self._restore(resume)
        truncate_metrics(self.out / "metrics.jsonl", done if resume else None)
        bar = tqdm(range(done, self.cfg.rounds), desc=self.cfg.algo, unit="round",
                   disable=not progress, initial=done, total=self.cfg.rounds)
        for r in bar:
            row = self._round(r, transport)
            bar.set_postfix_str(f"P {100 * row['P']:.1f}%" if "P" in row else "")
            if progress:
                tqdm.write(round_line(r, row, len(row["sampled"])), file=sys.stderr)
            else:
                log.info(round_line(r, row, len(row["sampled"])))
        if self.algorithm.post_step and not post_done:
            transport.post_train(self.cfg.rounds, self.server.broadcasts(
                self.cfg.rounds, self.server.client_names))
            self._checkpoint(self.cfg.rounds, True)
        return transport.finish(self.started)

    def epsilon(self) -> float | None:
        """The DP epsilon spent so far (None: no DP, or no noise, i.e. unbounded)."""
        if not self.cfg.privacy.enabled:
            return None
        spent = epsilon(self.cfg.privacy, self.sample_rates)
        return spent if math.isfinite(spent) else None

    def _restore(self, resume: bool) -> tuple[int, bool]:
        """(rounds done, post step done) from the checkpoint when resuming; the clients drop
        local adapters the checkpoint does not cover."""
        done, post_done = 0, False
        self.data_sha256 = data_digests(self.cfg)
        if resume:
            if not self.checkpoint_path.exists():
                raise MissingFileError(f"--resume: no checkpoint at {self.checkpoint_path}")
            self.server.global_adapter, state = resume_state(
                self.checkpoint_path, self.cfg.identity(), self.data_sha256)
            done, post_done = state.rounds_done, state.post_done
            self.sample_rates = list(state.sample_rates)
        for client in self.clients.values():
            client.discard_uncommitted(done, post_done)
        return done, post_done

    def _checkpoint(self, rounds_done: int, post_done: bool) -> None:
        start = time.perf_counter()
        state = RunState(config=self.cfg.identity(), seed=self.cfg.seed,
                         rounds_done=rounds_done, post_done=post_done,
                         sample_rates=tuple(self.sample_rates), data_sha256=self.data_sha256)
        save_checkpoint(self.checkpoint_path, self.server.global_adapter, state)
        self.server.server_seconds += time.perf_counter() - start

    def _round(self, r: int, transport) -> dict:
        """One round: exchange and aggregate, score, one metrics line, checkpoint."""
        round_start, server_before = time.perf_counter(), self.server.server_seconds
        sampled, broadcasts, replies, stats, accepted = self.server.run_round(
            r, transport.exchange, self.algorithm.uploads)
        rate = len(sampled) / len(self.server.client_names)
        self.sample_rates += [rate] * self.server.attempts  # every attempt's uploads count
        row = round_row(r, sampled, accepted, replies, broadcasts, stats)
        if self.cfg.privacy.enabled:
            row["epsilon"] = self.epsilon()
        if self.cfg.eval_every and (r + 1) % self.cfg.eval_every == 0:
            row["P"], missing = transport.round_score(r)
            if missing:  # scored without them (a dead Flower node): named, not hidden
                row["eval_missing"] = missing
        # The metrics line, then the checkpoint: a run killed in between redoes the round (the
        # same round, bit for bit) and truncate_metrics drops the line, so every committed
        # round has exactly one line. server_s therefore leaves out this checkpoint's write.
        row["server_s"] = self.server.server_seconds - server_before
        row["round_s"] = time.perf_counter() - round_start
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._checkpoint(r + 1, False)
        return row


def prepare_run(cfg: RunConfig, *, clients: list[str] | None = None,
                state_root: Path | None = None) -> PreparedRun:
    """A run's parts before the method's setup: data (checked first), the patched model, the
    method and the local clients; ``PreparedRun.build`` adds the setup and the server.

    Args:
        cfg: the run's configuration.
        clients: the names of the clients that live in this process (default: all of them;
            ``[]`` on a Flower ServerApp, one name on a ClientApp).
        state_root: where the clients' state directories are (default ``<out>/clients``).

    Raises:
        ConfigError / data.DataError / MissingFileError: bad data or model, before the model
            loads when the data is at fault.
    """
    started = time.perf_counter()
    cfg, _ = cfg.with_base_dtype()  # an unset --dtype: this machine's default
    cfg.check_sources()  # both, before the data is parsed and the model loaded
    train, test = load_data(cfg)
    names = list(train) if clients is None else list(clients)
    unknown = [n for n in names if n not in train]
    if unknown:  # before the model loads
        raise ConfigError(f"no such clients in the data: {unknown}; the run's clients are "
                          f"{list(train)}")
    task = build_task(cfg)
    algorithm = get_algorithm(cfg)
    hostile = set(list(train)[: cfg.hostile_clients]) if cfg.hostile else set()
    state_root = Path(cfg.out) / "clients" if state_root is None else Path(state_root)
    built = {name: Client(name, train[name], test[name], state_root / name, task,
                          algorithm, TrainSettings.from_config(cfg), cfg.seed,
                          attack=cfg.hostile if name in hostile else None,
                          wire_dtype=cfg.wire_dtype, privacy=cfg.privacy)
             for name in names}
    return PreparedRun(cfg, task, algorithm, built, test, started, names=list(train))


def build_run(cfg: RunConfig, *, clients: list[str] | None = None,
              state_root: Path | None = None, reports: dict | None = None) -> Run:
    """``prepare_run`` and ``PreparedRun.build``: the parts of a run, ready to run.

    Args:
        cfg, clients, state_root: as ``prepare_run``.
        reports: the clients' setup reports when they were gathered elsewhere (the Flower
            ServerApp); default: from the local clients.

    Returns:
        A ``Run``.
    """
    return prepare_run(cfg, clients=clients, state_root=state_root).build(reports=reports)


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Runs (or resumes) a federated run in this process.

    Args:
        cfg: the run's configuration (``cfg.out`` is the output directory).
        resume: continue the run checkpointed in ``cfg.out``.
        progress: progress bars and per-round lines.

    Returns:
        The results dict also written to results.json.

    Raises:
        RunExistsError: ``cfg.out`` holds a run and ``resume`` is False (nothing is loaded).
        MissingFileError: ``resume`` without a checkpoint in ``cfg.out``.
    """
    ckpt_path = Path(cfg.out) / "checkpoint.safetensors"
    if ckpt_path.exists() and not resume:
        raise RunExistsError(f"{cfg.out} already holds a run; pass --resume to continue it or "
                              "choose another --out")
    if resume and not ckpt_path.exists():
        raise MissingFileError(f"--resume: no checkpoint at {ckpt_path}")
    cfg, why = with_run_dtype(cfg, ckpt_path if resume else None)
    built = build_run(cfg)  # bad data or model fail here, before the line below
    line = f"base model dtype: {cfg.dtype} ({why}); adapters fp32"
    if progress:
        print(line, file=sys.stderr)
    else:
        log.info(line)
    return built.run(resume=resume, progress=progress)


def with_run_dtype(cfg: RunConfig, checkpoint: Path | None = None) -> tuple[RunConfig, str]:
    """``cfg`` with its base model dtype fixed (``RunConfig.with_base_dtype``), and why.

    Args:
        cfg: the run's configuration.
        checkpoint: the checkpoint of the run being resumed, if any: an unset ``--dtype``
            takes the dtype it recorded.

    Returns:
        ``(config, reason)``: the config with ``dtype`` set, and why it is that dtype.
    """
    recorded = None
    if checkpoint is not None and Path(checkpoint).exists():
        recorded = load_checkpoint(checkpoint)[1].config.get("dtype")
    return cfg.with_base_dtype(recorded)


def config_from_checkpoint(run_dir) -> tuple[RunConfig, RunState]:
    """(RunConfig, state) a run directory's checkpoint was written with."""
    run_dir = Path(run_dir)
    _, state = load_checkpoint(run_dir / "checkpoint.safetensors")
    return RunConfig.from_identity(state.config, run_dir), state


def evaluate_run(run_dir, *, progress: bool = True, pooled: bool = True) -> dict:
    """Re-runs the final evaluation of a finished run from its checkpoint and client states
    (rewrites results.json, the adapters and the plots); ``pooled=False`` evaluates one
    client at a time instead of in batches across clients."""
    cfg, state = config_from_checkpoint(run_dir)
    if not state.finished(cfg.rounds, get_algorithm(cfg).post_step):
        raise CheckpointError(f"{run_dir}: the run stopped after {state.rounds_done} of "
                              f"{cfg.rounds} rounds; finish it with train --resume first")
    evaluation = build_run(cfg)
    evaluation.evaluation_only = True
    evaluation.pooled_eval = pooled
    return evaluation.run(resume=True, progress=progress)
