"""The end of an in-process run: each client's final evaluation (P and TTP; both weight
assignments for FedDPA's dynamic mix), the adapters in PEFT format, results.json and plots."""
from __future__ import annotations

import contextlib
import json
import time

from ..evaluate import evaluate_client, plot_rounds

__all__ = ["entered", "finish", "evaluate_clients", "summarise"]


def entered(evaluation):
    """The context an ``Evaluation`` asks for (none by default)."""
    return evaluation.context() if evaluation.context else contextlib.nullcontext()


def _assignments(cfg) -> list[str]:
    return [cfg.weighting.assignment] + [
        a for a in ("authors", "opposite") if a != cfg.weighting.assignment]


def evaluate_clients(run, progress: bool = True) -> dict:
    """{client: {key: {"P", "TTP", "per_set"}} (+ the method's report)}; saves each client's
    outputs as it goes (the shared model holds that client's adapters only then)."""
    from tqdm.auto import tqdm

    from .in_process import limit

    cfg, algorithm = run.cfg, run.algorithm
    test_sets = {n: limit(run.test[n], cfg.test_limit) for n in run.test}
    per_client, shared = {}, None
    for name, client in tqdm(run.clients.items(), desc="evaluate", leave=False,
                             disable=not progress):
        algorithm.receive(client, run.server.expected(), None)  # as a client receives it
        evaluation = algorithm.final_evaluation(client)
        if evaluation.client_independent and shared is not None:
            per_set = shared["fixed"]["per_set"]  # one model for every client: scored once
            per_client[name] = {"fixed": {"P": per_set[name], "per_set": per_set,
                                          "TTP": shared["fixed"]["TTP"]}}
        else:
            with entered(evaluation):
                per_client[name] = evaluate_client(
                    run.task, client, evaluation.mode, test_sets, own=name, seed=cfg.seed,
                    weighting=cfg.weighting, assignments=_assignments(cfg))
            shared = per_client[name]
        per_client[name].update(algorithm.client_report(client))
        algorithm.save_client_outputs(client, run.out)
    return per_client


def summarise(per_client: dict) -> dict:
    """{key: {"P": mean, "TTP": mean}} over the clients, for every evaluation key."""
    keys = [k for k, v in per_client[next(iter(per_client))].items() if "P" in v]
    return {key: {m: sum(v[key][m] for v in per_client.values()) / len(per_client)
                  for m in ("P", "TTP")} for key in keys}


def finish(run, wall_start: float, progress: bool = True) -> dict:
    """Evaluates every client, saves the outputs, writes results.json and the plots."""
    cfg, out = run.cfg, run.out
    per_client = evaluate_clients(run, progress)
    run.algorithm.save_global_outputs(run.task, run.server.global_adapter, out)
    summary = summarise(per_client)
    dynamic = cfg.weighting.assignment in summary
    main_key = cfg.weighting.assignment if dynamic else "fixed"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = {
        "method": cfg.algo, "P": summary[main_key]["P"], "TTP": summary[main_key]["TTP"],
        "by_assignment": summary if dynamic else None,
        "per_client": per_client,
        "bytes_per_client_round": max((r.get("bytes_up_per_client", 0) for r in rows), default=0),
        "global_adapter_bytes": sum(t.numel() * t.element_size()
                                    for t in run.server.global_adapter.values()),
        "wire_dtype": cfg.wire_dtype,
        "dp": ({"clip": cfg.dp_clip, "noise_multiplier": cfg.dp_noise_multiplier,
                "delta": cfg.dp_delta, "epsilon": run.epsilon()}
               if cfg.privacy.enabled else None),
        "server_s": sum(r.get("server_s", 0) for r in rows),
        "rounds_s": sum(r.get("round_s", 0) for r in rows),
        "wall_s": time.perf_counter() - wall_start,
    }
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"final": True, **{k: results[k] for k in ("P", "TTP", "wall_s")}})
                + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "plots").mkdir(exist_ok=True)
    plot_rounds(out / "metrics.jsonl", out / "plots" / "rounds.png")
    return results
