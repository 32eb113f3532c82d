"""Atomic files and the server checkpoint (docs/ARCHITECTURE.md §6).

Every state file is written to a temporary file in the same directory, flushed and fsynced,
then renamed over the old one (``os.replace`` is atomic on POSIX), and the directory is
fsynced: a crash leaves either the old file or the new one, never a torn one.

The checkpoint is one safetensors file: the global adapter's tensors plus, in its metadata, the
run state as JSON (rounds completed, the run's config, the seed). There is no opaque RNG state
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
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..atomic import atomic_write_bytes

__all__ = ["CheckpointError", "atomic_write_bytes", "derive_seed", "load_checkpoint",
           "read_metrics", "resume_state", "save_checkpoint", "save_run_checkpoint",
           "truncate_metrics"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run seed and labels (stable across runs and platforms)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def save_checkpoint(path: str | os.PathLike, global_adapter: dict[str, torch.Tensor],
                    state: dict) -> None:
    """Atomically writes the global adapter and the JSON-able ``state``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in global_adapter.items()}
    blob = st_save(tensors, metadata={"format": "pt", "state": json.dumps(state, sort_keys=True)})
    atomic_write_bytes(path, blob)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(global adapter, state) from a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        state = json.loads(header["__metadata__"]["state"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    return tensors, state


def save_run_checkpoint(path, global_adapter, config: dict, seed: int, rounds_done: int,
                        post_done: bool, sample_rates: list[float] | None = None) -> None:
    """The checkpoint both transports write after every round (and after the post step);
    ``sample_rates`` (one per attempt so far) lets a resumed run continue its DP account."""
    state = {"rounds_done": rounds_done, "post_done": post_done, "seed": seed, "config": config}
    if sample_rates:
        state["sample_rates"] = list(sample_rates)
    save_checkpoint(path, global_adapter, state)


def resume_state(path: str | os.PathLike, config: dict):
    """(global adapter, rounds done, post step done, DP sample rates) of the run checkpointed
    at ``path``;
    refuses a checkpoint of another configuration and removes checkpoint temp files left by a
    write that was killed mid-way."""
    path = Path(path)
    global_adapter, state = load_checkpoint(path)
    if state.get("config") != config:
        raise CheckpointError(f"{path} belongs to a run with another configuration; "
                              "resume with the same flags")
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink()
    return (global_adapter, state["rounds_done"], state.get("post_done", False),
            state.get("sample_rates", []))


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
