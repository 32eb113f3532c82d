"""The server checkpoint and the run's metrics file (docs/ARCHITECTURE.md §6).

The checkpoint is one safetensors file, written atomically (feddpa_fast/atomic.py) and sealed
with the SHA-256 of its tensors (feddpa_fast/sealed.py): the global adapter's tensors plus, in
its metadata, the ``RunState`` as JSON (fed/run_state.py: rounds completed, the run's config,
the seed, the DP account, the data's digests). There is no opaque RNG state
to save: every random stream of the run (client sampling, shuffling, dropout, adapter init) is
derived from ``(seed, round, client, phase)`` (``derive_seed``), so the seed and the round *are*
the RNG state, and a resumed run replays exactly what an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes
from ..errors import FeddpaError, MissingFileError
from ..sealed import IntegrityError, read_sealed, sealed_bytes
from .options import resolved_source
from .run_state import RunState

__all__ = ["CheckpointError", "derive_seed", "load_checkpoint", "read_metrics", "resume_state",
           "save_checkpoint", "truncate_metrics"]


class CheckpointError(FeddpaError, RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run seed and labels (stable across runs and platforms)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def save_checkpoint(path: str | os.PathLike, global_adapter: dict[str, torch.Tensor],
                    state: RunState) -> None:
    """Atomically writes the global adapter and the run's state, sealed with the SHA-256 of
    its tensors (feddpa_fast/sealed.py): what both transports write after every round (and
    after the post step)."""
    blob = sealed_bytes(global_adapter, {"format": "pt",
                                         "state": json.dumps(state.to_json(), sort_keys=True)})
    atomic_write_bytes(path, blob)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RunState]:
    """(global adapter, state) from a checkpoint written by ``save_checkpoint``, its digest
    verified (a checkpoint without one, from before digests, is read unverified) and its state
    read through its schema (fed/run_state.py).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: a file that is not a readable, intact checkpoint, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    try:
        tensors, metadata = read_sealed(path, required=False)
        state = RunState.from_json(json.loads(metadata["state"]))
    except IntegrityError as exc:
        raise CheckpointError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    return tensors, state


def resume_state(path: str | os.PathLike, config: dict,
                 data_sha256: dict[str, str] | None = None):
    """(global adapter, RunState) of the run checkpointed at ``path``; refuses a checkpoint of
    another configuration, or of other data contents (when both digests are known), and
    removes checkpoint temp files left by a write killed mid-way."""
    path = Path(path)
    global_adapter, state = load_checkpoint(path)
    saved, asked = _comparable(state.config), _comparable(config)
    if saved != asked:
        raise CheckpointError(f"{path} belongs to a run with another configuration "
                              f"({config_difference(saved, asked)}); resume with the same flags")
    recorded = state.data_sha256
    changed = sorted(n for n in recorded if data_sha256 and recorded[n] != data_sha256.get(n))
    if changed:
        raise CheckpointError(f"{path}: the data changed since the run started ("
                              f"{', '.join(changed)} of --data {config.get('data')}: another "
                              "SHA-256); resume with the data the run was trained on")
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink()
    return global_adapter, state


def _comparable(config: dict) -> dict:
    """A recorded identity with its --model / --data directories resolved (checkpoints from
    before identities resolved them hold the path as typed, relative to the run's cwd)."""
    return {k: resolved_source(v) if k in ("model", "data") and isinstance(v, str) else v
            for k, v in config.items()}


def config_difference(saved: dict, asked: dict) -> str:
    """The settings that differ, as "key: checkpoint X, now Y" (at most 6 named)."""
    keys = sorted(k for k in set(saved) | set(asked) if saved.get(k) != asked.get(k))
    parts = [f"{k}: checkpoint {saved.get(k, '(absent)')!r}, now {asked.get(k, '(absent)')!r}"
             for k in keys[:6]]
    return "; ".join(parts) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")


def truncate_metrics(path: str | os.PathLike, rounds_done: int | None) -> None:
    """Starts a run's metrics.jsonl afresh (``rounds_done`` None), or keeps only the lines of
    rounds a resumed checkpoint covers."""
    path = Path(path)
    if rounds_done is None or not path.exists():
        path.write_text("")
        return
    kept = [line for line, row in zip(*_lines_and_rows(path))
            if row.get("round", 1 << 30) < rounds_done]
    path.write_text("".join(line + "\n" for line in kept))


def _lines_and_rows(path: Path) -> tuple[list[str], list[dict]]:
    """The lines of a metrics file that parse as JSON objects, and those objects (a line torn
    by a kill mid-write is skipped)."""
    lines, rows = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            lines.append(line)
            rows.append(row)
    return lines, rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl (torn lines skipped)."""
    return _lines_and_rows(Path(path))[1]
