"""The final evaluation of every client in batched passes across clients (docs/trainer.md,
"Many clients in one batch").

Each client answers every task's test set (TTP), so the rows are (client, test example) pairs:
N clients x the pooled test sets. They are ordered example-major, the N clients' copies of one
example next to each other, so a batch of 32 holds 32 / N distinct prompts: it pads to the
longest of those few. One pass represents the rows for FedDPA's dynamic weighting, one
generates per weight assignment; each client's answers are then scored exactly as
``evaluate.evaluate_client`` scores them. Results equal the per-client evaluation up to float
summation order (a batch's padding and its op call differ), which can flip a greedy token.
"""
from __future__ import annotations

from .client_pool import ClientPool
from .evaluate import prediction_records, scores_by_set
from .final import PREDICTIONS, assignments_of, test_sets_of
from .results import FIXED, client_record

__all__ = ["evaluate_pooled"]


def evaluate_pooled(run, progress: bool = True, batch_size: int = 32) -> dict:
    """{client: final entry} (as ``final.final_entry`` makes it) for every client of an
    in-process run whose method ``client_pool.can_pool``; saves each client's outputs.

    Args:
        run: a built ``Run`` at its end (the server holds the final global state).
        progress: progress bars.
        batch_size: rows (of any clients) per forward / ``generate`` call.
    """
    from tqdm.auto import tqdm

    algorithm, cfg = run.algorithm, run.cfg
    reports = {}

    def loaded(client):
        reports[client.name] = algorithm.client_report(client)
        algorithm.save_client_outputs(client, run.out)

    pool = ClientPool(run, batch_size=batch_size, on_loaded=loaded,
                      progress=progress)
    try:
        test_sets = test_sets_of(run)
        names = list(test_sets)
        pooled = [e for name in names for e in test_sets[name]]
        clients = [c for _ in pooled for c in pool.names]  # example-major
        examples = [e for e in pooled for _ in pool.names]
        weights = pool.weights(clients, examples, assignments_of(cfg)) if pooled else {}
        answers = {}
        with tqdm(total=len(examples) * len(weights), desc="evaluate", leave=False,
                  disable=not progress) as bar:
            for key, (global_w, local_w) in weights.items():
                answers[key] = pool.predict(clients, examples, global_w, local_w, bar.update)
    finally:
        pool.close()
    keys = list(weights) or ([FIXED] if not pool.dynamic else assignments_of(cfg))
    per_client = {}
    for i, name in enumerate(pool.names):
        mine = slice(i, None, len(pool.names))  # this client's rows, in pooled order
        predicted = {key: answers[key][mine] if pooled else [] for key in keys}
        used = {key: (g[mine], w[mine]) for key, (g, w) in weights.items()}
        scores = scores_by_set(run.task, names, test_sets, predicted, own=name)
        records = prediction_records(name, names, test_sets, predicted, used) if pooled else []
        per_client[name] = {**client_record(scores, cfg.weighting.assignment, reports[name]),
                            PREDICTIONS: records}
    return per_client
