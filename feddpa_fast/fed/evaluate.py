"""Evaluation of personalised federated runs: P, TTP, tables and plots (docs/ARCHITECTURE.md §4).

- **P**: a client's score on its own task's test set.
- **TTP**: the mean of a client's scores over every task's test set, its own included.
Scores are accuracy (``classify``) or ROUGE-L F (``causal-lm``), in [0, 1]; tables print %.

How a client's model answers depends on the algorithm: the global adapter alone (``fedit``),
the local adapter alone (``local``), or FedDPA's instance-wise dynamic mix (``feddpa-*``):
per test instance, weights from its similarity to k seeded local training instances, applied
in one batched forward with a different mix per sequence.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from .algorithms.feddpa_weighting import WeightingConfig, instance_weights
from .checkpoint import derive_seed
from .results import FIXED

__all__ = ["anchors_for", "predictions_for", "prediction_records", "score_set",
           "evaluate_client", "fixed_weights", "scores_by_set", "format_table",
           "plot_rounds", "plot_methods"]


def anchors_for(client, k: int, seed: int):
    """The k local training instances FedDPA compares test instances with (seeded)."""
    rng = random.Random(derive_seed(seed, "anchors", client.name))
    return rng.sample(client.train, min(k, len(client.train)))


def fixed_weights(mode) -> tuple[float, float]:
    """(global_w, local_w) of a fixed evaluation mode: "global", "local" or a weight pair."""
    return {"global": (1.0, 0.0), "local": (0.0, 1.0)}[mode] if isinstance(mode, str) else mode


def _predict(task, examples, weights, batch_size) -> list[str]:
    predictions = []
    for i in range(0, len(examples), batch_size):
        if isinstance(weights[0], torch.Tensor):
            w = (weights[0][i:i + batch_size], weights[1][i:i + batch_size])
        else:
            w = weights
        predictions += task.predict(examples[i:i + batch_size], *w)
    return predictions


def predictions_for(task, examples, mode, *, anchors=None,
                    weighting: WeightingConfig | None = None, assignments=("authors",),
                    batch_size: int = 32) -> dict[str, list[str]]:
    """The loaded model's predictions for ``examples``: {FIXED: [...]} for mode "global" /
    "local" / a (global_w, local_w) tuple; for "dynamic", {assignment: [...]}, the instance
    weights computed once for all assignments."""
    return _predictions_and_weights(task, examples, mode, anchors, weighting, assignments,
                                    batch_size)[0]


def _predictions_and_weights(task, examples, mode, anchors, weighting, assignments,
                             batch_size) -> tuple[dict[str, list[str]], dict[str, tuple]]:
    """(predictions_for's dict, {key: (global weights, local weights)}, each a float for the
    whole set or a tensor with one weight per example)."""
    if mode != "dynamic":  # a named mode, or (global_w, local_w) (FDLoRA's fusion weights)
        fixed = fixed_weights(mode)
        return {FIXED: _predict(task, examples, fixed, batch_size)}, {FIXED: fixed}
    global_w, local_w = instance_weights(task, examples, anchors, weighting, batch_size)
    # instance_weights used weighting.assignment; the other assignment swaps the two weights.
    out, used = {}, {}
    for assignment in assignments:
        same = assignment == weighting.assignment
        used[assignment] = (global_w, local_w) if same else (local_w, global_w)
        out[assignment] = _predict(task, examples, used[assignment], batch_size)
    return out, used


def prediction_records(client: str, names: list[str], test_sets: dict, predicted: dict,
                       weights: dict) -> list[dict]:
    """One JSON-able row per (test example, evaluation key): client, task (the test set),
    prompt, reference, answer, the (global, local) weights it was answered with, and the
    weight assignment for FedDPA's dynamic mix."""
    rows, start = [], 0
    for name in names:
        for offset, example in enumerate(test_sets[name]):
            i = start + offset
            for key, answers in predicted.items():
                g, loc = weights[key]
                row = {"client": client, "task": name, "prompt": _prompt_text(example),
                       "reference": _reference(example), "answer": answers[i],
                       "weights": {"global": _at(g, i), "local": _at(loc, i)}}
                if key != FIXED:
                    row["assignment"] = key
                rows.append(row)
        start += len(test_sets[name])
    return rows


def _at(weight, i: int) -> float:
    return float(weight[i]) if isinstance(weight, torch.Tensor) else float(weight)


def _prompt_text(example) -> str:
    if hasattr(example, "text"):
        return example.text
    return example.instruction + (f"\n{example.input}" if example.input else "")


def _reference(example) -> str:
    return example.label if hasattr(example, "label") else example.output


def score_set(task, examples, mode: str, *, anchors=None, weighting: WeightingConfig | None = None,
              assignments=("authors",), batch_size: int = 32) -> dict[str, float]:
    """Scores of the loaded model on ``examples``, keyed as ``predictions_for``."""
    if not examples:
        return {a: float("nan") for a in (assignments if mode == "dynamic" else [FIXED])}
    predicted = predictions_for(task, examples, mode, anchors=anchors, weighting=weighting,
                                assignments=assignments, batch_size=batch_size)
    return {key: task.score(examples, p) for key, p in predicted.items()}


def evaluate_client(task, client, mode: str, test_sets: dict, *, own: str, seed: int,
                    weighting: WeightingConfig, assignments=None, batch_size: int = 32,
                    own_only: bool = False, records: list | None = None) -> dict:
    """{key: {"P": .., "TTP": .., "per_set": {name: score}}} for the adapters loaded in the
    model; key = FIXED ("fixed") for global / local, each weight assignment for "dynamic".
    ``records``: a list that receives ``prediction_records``' rows (predictions.jsonl).

    The test sets are pooled into one list, so every batch is full (``batch_size`` sequences
    per ``generate``: a decoding step costs about the same for 10 sequences as for 32 on a CPU)
    and the anchors are represented once; each set is then scored on its own."""
    anchors = anchors_for(client, weighting.k, seed) if mode == "dynamic" else None
    assignments = assignments or (weighting.assignment,)
    names = [own] if own_only else list(test_sets)
    pooled = [e for name in names for e in test_sets[name]]
    keys = list(assignments) if mode == "dynamic" else [FIXED]
    predicted, weights = (_predictions_and_weights(task, pooled, mode, anchors, weighting,
                                                   assignments, batch_size)
                          if pooled else ({key: [] for key in keys}, {}))
    if records is not None and pooled:
        records += prediction_records(own, names, test_sets, predicted, weights)
    return scores_by_set(task, names, test_sets, predicted, own=own, own_only=own_only)


def scores_by_set(task, names: list[str], test_sets: dict, predicted: dict, *, own: str,
                  own_only: bool = False) -> dict:
    """``evaluate_client``'s result from one client's ``predicted`` answers ({key: answers
    over the test sets ``names``, pooled in that order}): each set scored on its own."""
    per_set, start = {key: {} for key in predicted}, 0
    for name in names:
        examples, stop = test_sets[name], start + len(test_sets[name])
        for key in predicted:
            per_set[key][name] = (task.score(examples, predicted[key][start:stop])
                                  if examples else float("nan"))
        start = stop
    result = {}
    for key in predicted:
        result[key] = {"P": per_set[key][own], "per_set": per_set[key]}
        if not own_only:
            result[key]["TTP"] = sum(per_set[key].values()) / len(per_set[key])
    return result


def _epsilon_cell(dp: dict | None) -> str:
    if not dp:
        return "—"  # no DP
    return "∞" if dp["epsilon"] is None else f"{dp['epsilon']:.2f}"  # None: no noise


def format_table(rows: list[dict]) -> str:
    """Markdown table: method, P, TTP (means over clients, %), bytes up per client per round,
    wall time, the DP epsilon spent (— without DP)."""
    lines = ["| method | P (%) | TTP (%) | bytes up / client / round | wall time (s) | DP ε |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['P']:.2f} | {100 * r['TTP']:.2f} | "
                     f"{r.get('bytes_per_client_round', 0):,} | {r.get('wall_s', 0):.1f} | "
                     f"{_epsilon_cell(r.get('dp'))} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_rounds(metrics_path: Path, out_path: Path) -> Path:
    """Per-round training loss and own-task score from a run's metrics.jsonl."""
    from .checkpoint import read_metrics

    fig = rounds_figure([r for r in read_metrics(metrics_path) if "round" in r])
    fig.savefig(out_path, dpi=110)
    _pyplot().close(fig)
    return out_path


def rounds_figure(rows: list[dict]):
    """The figure of ``plot_rounds`` from its metrics rows (those with a "round")."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rounds = [r["round"] for r in rows]
    for key in sorted({k for r in rows for k in r if k.startswith("loss_")}):
        axes[0].plot(rounds, [r.get(key, float("nan")) for r in rows], marker="o", label=key)
    axes[0].set_xlabel("round"), axes[0].set_ylabel("mean training loss"), axes[0].legend()
    axes[1].plot(rounds, [100 * r.get("P", float("nan")) for r in rows], marker="o")
    axes[1].set_xlabel("round"), axes[1].set_ylabel("P: own-task score (%)")
    for ax in axes:  # rounds are whole numbers: no 0.2, 0.4 ... ticks
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_methods(rows: list[dict], out_path: Path) -> Path:
    """Grouped bars of P and TTP per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 3.8))
    xs = torch.arange(len(rows)).tolist()
    ax.bar([x - 0.2 for x in xs], [100 * r["P"] for r in rows], width=0.4, label="P")
    ax.bar([x + 0.2 for x in xs], [100 * r["TTP"] for r in rows], width=0.4, label="TTP")
    ax.set_xticks(xs, [r["method"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("score (%)"), ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
