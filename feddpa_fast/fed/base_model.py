"""The "base model, no adapter" row of a comparison: the untrained base (both adapters at float
weight 0, so every patched layer is its base layer) on every client's test sets, written as a
method's run would be: results.json and predictions.jsonl in ``out``. It is the floor a method
must clear before "FedIT learned something" can be said (docs/trainer.md, the budget rule)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import atomic_write_bytes
from .evaluate import prediction_records, predictions_for, scores_by_set
from .loading import build_task, load_data
from .results import FIXED, summarise

__all__ = ["BASE", "evaluate_base"]

BASE = "base"  # its directory under the compare root, and its name in the comparisons
LABEL = "base model, no adapter"  # its row in the comparison table


def evaluate_base(cfg, out: Path, *, batch_size: int = 32) -> dict:
    """Scores the base model on every test set once (it is the same model for every client)
    and gives each client the record a method's client gets (P on its own set, TTP over all).

    Args:
        cfg: the compared runs' ``RunConfig`` (model, dtype, data, test limit, decoding).
        out: the directory for results.json and predictions.jsonl.
        batch_size: sequences per ``generate``.

    Returns:
        The results dict (results.json): method ``LABEL``, P, TTP, per_client.
    """
    from .final import limit

    started = time.perf_counter()
    cfg, _ = cfg.with_base_dtype()
    task = build_task(cfg)
    _, test = load_data(cfg)
    test_sets = {name: limit(test[name], cfg.test_limit) for name in test}
    names = list(test_sets)
    pooled = [e for name in names for e in test_sets[name]]
    predicted = predictions_for(task, pooled, (0.0, 0.0), batch_size=batch_size)
    per_client, records = {}, []
    for client in names:
        scores = scores_by_set(task, names, test_sets, predicted, own=client)
        per_client[client] = {**scores[FIXED], "by_assignment": None}
        records += prediction_records(client, names, test_sets, predicted,
                                      {FIXED: (0.0, 0.0)})
    results = {"method": LABEL, **summarise(per_client), "per_client": per_client,
               "bytes_per_client_round": 0, "dtype": cfg.dtype,
               "wall_s": time.perf_counter() - started}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "predictions.jsonl",
                       "".join(json.dumps(row) + "\n" for row in records).encode())
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    return results
