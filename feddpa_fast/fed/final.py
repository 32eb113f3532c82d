"""Evaluation on a client (the score after a round; the final entry: P and TTP, both weight
assignments for FedDPA's dynamic mix, the client's adapters in PEFT format), run where the
client lives, and the end of a run: results.json, the final metrics line and the plots."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from ..atomic import atomic_write_bytes
from .checkpoint import read_metrics
from .evaluate import evaluate_client, plot_rounds
from .results import FIXED, client_record, summarise
from .reuse import reused_from

# A final entry's answers (evaluate.prediction_records), taken out of it into predictions.jsonl.
PREDICTIONS = "predictions"

__all__ = ["assignments_of", "entered", "evaluate_clients", "final_entry", "finish", "limit",
           "round_score", "test_sets_of"]


def limit(examples, n):
    """The first ``n`` examples (all of them when ``n`` is None)."""
    return list(examples)[:n] if n else list(examples)


def entered(evaluation):
    """The context an ``Evaluation`` asks for (none by default)."""
    return evaluation.context() if evaluation.context else contextlib.nullcontext()


def assignments_of(cfg) -> list[str]:
    """The weight assignments the final evaluation scores: the run's first."""
    return [cfg.weighting.assignment] + [
        a for a in ("authors", "opposite") if a != cfg.weighting.assignment]


def test_sets_of(run) -> dict[str, list]:
    """{task: its test examples, cut to --test-limit}."""
    return {n: limit(run.test[n], run.cfg.test_limit) for n in run.test}


def round_score(run, client, received: dict, r: int) -> float:
    """The client's own-task score after round ``r`` (the method's round evaluation), from
    the global state it ``received``; what a Flower node answers too."""
    algorithm, name = run.algorithm, client.name
    algorithm.receive(client, received, r + 1)
    evaluation = algorithm.round_evaluation(client)
    with entered(evaluation):
        result = evaluate_client(run.task, client, evaluation.mode,
                                 {name: limit(run.test[name], run.cfg.test_limit)}, own=name,
                                 seed=run.cfg.seed, weighting=run.cfg.weighting, own_only=True)
    return next(iter(result.values()))["P"]


def final_entry(run, client, received: dict, shared: dict | None = None,
                outputs=None) -> dict:
    """The client's results.json record (fed/results.py), with its predictions, from the final
    global state it ``received``; saves its outputs (the shared model holds
    its adapters only now). ``shared``: an entry of another client whose model was the same
    (the method says when), reused instead of scoring again. ``outputs``: the directory whose
    ``adapters/<client>/local`` receives the local adapter in PEFT format (default: the run's
    out; a Flower node passes its own state directory)."""
    cfg, algorithm, name = run.cfg, run.algorithm, client.name
    algorithm.receive(client, received, None)
    evaluation = algorithm.final_evaluation(client)
    report = algorithm.client_report(client)
    if cfg.final_eval == "none":  # training only: the outputs, no scores
        entry = dict(report)
    elif evaluation.client_independent and shared is not None:
        per_set = shared["per_set"]  # one model for every client: scored once
        scores = {FIXED: {"P": per_set[name], "TTP": shared["TTP"], "per_set": per_set}}
        entry = {**client_record(scores, cfg.weighting.assignment, report),
                 PREDICTIONS: [{**row, "client": name} for row in shared[PREDICTIONS]]}
    else:
        records = []
        with entered(evaluation):
            scores = evaluate_client(run.task, client, evaluation.mode, test_sets_of(run),
                                     own=name, seed=cfg.seed, weighting=cfg.weighting,
                                     assignments=assignments_of(cfg), records=records)
        entry = {**client_record(scores, cfg.weighting.assignment, report),
                 PREDICTIONS: records}
    algorithm.save_client_outputs(client, run.out if outputs is None else Path(outputs))
    return entry


def evaluate_clients(run, progress: bool = True) -> dict:
    """{client: final entry} for every client of an in-process run, one client at a time
    (fed/pooled_eval.py batches across clients where the method allows it)."""
    from tqdm.auto import tqdm

    per_client, shared = {}, None
    for name, client in tqdm(run.clients.items(), desc="evaluate", leave=False,
                             disable=not progress):
        received = run.server.message(name)  # as the client receives it
        per_client[name] = final_entry(run, client, received, shared)
        if per_client[name].get("by_assignment", True) is None:  # a fixed mix: reusable
            shared = per_client[name]
    return per_client


def _previous_results(out) -> dict:
    """The results.json already in ``out`` ({} when there is none or it is unreadable)."""
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def finish(run, per_client: dict, wall_start: float) -> dict:
    """Saves the global outputs and writes results.json, the final metrics line and the plots
    from every client's final entry (whichever transport gathered them)."""
    cfg, out = run.cfg, run.out
    missing = [n for n in run.server.client_names if n not in per_client]  # a dead node's
    per_client = {n: dict(per_client[n]) for n in run.server.client_names if n in per_client}
    predictions = [row for entry in per_client.values() for row in entry.pop(PREDICTIONS, [])]
    run.algorithm.save_global_outputs(run.task, run.server.global_adapter, out)
    # None: --final-eval none
    summary = (summarise(per_client) if cfg.final_eval == "all"
               else {"P": None, "TTP": None, "by_assignment": None})
    rows = read_metrics(out / "metrics.jsonl")
    results = {
        "method": cfg.algo, "P": summary["P"], "TTP": summary["TTP"],
        "by_assignment": summary["by_assignment"],
        "per_client": per_client,
        "bytes_per_client_round": max((r.get("bytes_up_per_client", 0) for r in rows), default=0),
        # One message's tensors in fp32 (FedALT's server keeps one adapter per client).
        "global_adapter_bytes": sum(t.numel() * t.element_size()
                                    for t in run.algorithm.message_spec(
                                        run.server.global_adapter).values()),
        "dtype": cfg.dtype,
        "wire_dtype": cfg.wire_dtype,
        "dp": ({"clip": cfg.dp_clip, "noise_multiplier": cfg.dp_noise_multiplier,
                "delta": cfg.dp_delta, "epsilon": run.epsilon()}
               if cfg.privacy.enabled else None),
        "server_s": sum(r.get("server_s", 0) for r in rows),
        "rounds_s": sum(r.get("round_s", 0) for r in rows),
        "wall_s": time.perf_counter() - wall_start,
        "reused_rounds_of": reused_from(out),  # compare started it from another's rounds
    }
    if missing:  # P and TTP are means over the clients that were evaluated
        results["eval_missing"] = missing
    timing = ["wall_s"]
    if run.evaluation_only:  # the training's wall time stays; the evaluation's has its own key
        timing.append("eval_wall_s")
        results["eval_wall_s"] = results["wall_s"]
        results["wall_s"] = _previous_results(out).get("wall_s")
    with (out / "metrics.jsonl").open("a") as f:
        final_row = {"final": True, **{k: results[k] for k in ("P", "TTP", *timing)}}
        if missing:
            final_row["eval_missing"] = missing
        f.write(json.dumps(final_row) + "\n")
    if cfg.final_eval == "all":
        atomic_write_bytes(out / "predictions.jsonl",
                           "".join(json.dumps(row) + "\n" for row in predictions).encode())
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    (out / "plots").mkdir(exist_ok=True)
    plot_rounds(out / "metrics.jsonl", out / "plots" / "rounds.png")
    return results
