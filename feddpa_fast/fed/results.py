"""One result record per client, the same for every method: what ``final_entry``
(fed/final.py) produces where the client lives, what a Flower node sends back, and what
results.json holds under ``per_client``.

    {"P": own-task score, "TTP": mean over every task's test set, "per_set": {task: score},
     "by_assignment": {"authors": {...}, "opposite": {...}} or null,
     ...the method's report (``Algorithm.client_report``: FDLoRA's "fusion" search record)}

P, TTP and per_set are those of the run's mix: the method's fixed one, or for FedDPA's
instance-wise weighting the run's ``--weighting-assignment``, both assignments listed under
``by_assignment``. The run-level record (``summarise``) has the same shape.
"""
from __future__ import annotations

__all__ = ["FIXED", "client_record", "summarise"]

# The key evaluate.evaluate_client gives the scores of a method with one fixed mix.
FIXED = "fixed"


def client_record(scores: dict[str, dict], assignment: str, report: dict) -> dict:
    """A client's record from evaluate_client's {mix: {"P", "TTP", "per_set"}}.

    Args:
        scores: {FIXED: ...} for a fixed mix, {assignment: ...} for the dynamic one.
        assignment: the run's weight assignment: the record's P / TTP / per_set for the
            dynamic mix (a fixed mix has only FIXED).
        report: the method's own report of the client, merged in.
    """
    fixed = FIXED in scores
    record = {**scores[FIXED if fixed else assignment], "by_assignment": None if fixed else scores}
    return {**record, **report}


def summarise(per_client: dict[str, dict]) -> dict:
    """{"P", "TTP", "by_assignment"} means over the clients' records (by_assignment: per
    assignment, or None for a fixed mix)."""
    def means(records: list[dict]) -> dict:
        return {m: sum(r[m] for r in records) / len(records) for m in ("P", "TTP")}

    records = list(per_client.values())
    first = records[0]["by_assignment"]
    by_assignment = None if first is None else {
        key: means([r["by_assignment"][key] for r in records]) for key in first}
    return {**means(records), "by_assignment": by_assignment}
