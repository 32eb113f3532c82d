"""Reusing the rounds one method shares with another (``Algorithm.shares_rounds_with``):
FedDPA-F's federated phase is FedIT's, with the same derived seeds, so ``feddpa-fast compare``
starts FedDPA-F from FedIT's finished rounds instead of training them again
(docs/ARCHITECTURE.md §4). The result equals a separate run bit for bit
(tests/fed/test_reuse.py): the rounds' seeds depend on (seed, round, client, phase), never on
the method's name.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..atomic import atomic_write_bytes
from .algorithms import get_algorithm
from .checkpoint import CheckpointError, load_checkpoint, read_metrics, save_checkpoint
from .options import ConfigError

__all__ = ["REUSED", "reused_from", "seed_from_rounds"]

REUSED = "reused_rounds.json"  # in a run directory seeded from another run's rounds


def seed_from_rounds(source_dir, cfg) -> bool:
    """Starts ``cfg.out`` from the finished rounds of the run in ``source_dir``: its checkpoint
    (renamed to this run) and its per-round metrics lines; the post step and the final
    evaluation are left to ``run(cfg, resume=True)``.

    Args:
        source_dir: a finished run of ``cfg``'s ``shares_rounds_with`` method.
        cfg: the run to start; every setting but the method must equal the source's.

    Returns:
        True when ``cfg.out`` was seeded; False when it already holds a checkpoint (a resumed
        compare), which is then left alone.

    Raises:
        CheckpointError: the source is another configuration or has not finished its rounds.
    """
    out = Path(cfg.out)
    if (out / "checkpoint.safetensors").exists():
        return False
    source_dir = Path(source_dir)
    source_algo = get_algorithm(cfg).shares_rounds_with
    if source_algo is None:
        raise ConfigError(f"{cfg.algo} shares its rounds with no other method")
    tensors, state = load_checkpoint(source_dir / "checkpoint.safetensors")
    expected = {**cfg.identity(), "algo": source_algo}
    if state.config != expected:
        differing = sorted(k for k in expected if state.config.get(k) != expected[k])
        raise CheckpointError(f"{source_dir}: its run differs from {cfg.algo}'s in {differing}; "
                         "its rounds cannot be reused")
    if state.rounds_done != cfg.rounds:
        raise CheckpointError(f"{source_dir}: {state.rounds_done} of {cfg.rounds} rounds done; "
                         "only a finished run's rounds are reused")
    rows = [r for r in read_metrics(source_dir / "metrics.jsonl") if "round" in r]
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write_bytes(out / REUSED, (json.dumps({"algo": source_algo, "run": str(source_dir)})
                                      + "\n").encode())
    # The checkpoint last: it is what makes the directory a run (and resumable).
    save_checkpoint(out / "checkpoint.safetensors", tensors,
                    dataclasses.replace(state, config=cfg.identity(), post_done=False))
    return True


def reused_from(run_dir) -> str | None:
    """The method whose rounds ``run_dir`` started from (None: it trained its own)."""
    try:
        return json.loads((Path(run_dir) / REUSED).read_text())["algo"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
