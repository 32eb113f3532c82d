"""Fault injection: kill -9 mid-checkpoint, disk-full / permission errors while checkpointing,
a client that crashes mid-round."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial

import pytest
import torch
from fed_fixtures import tiny_cfg

from feddpa_fast.fed import checkpoint as checkpoint_mod
from feddpa_fast.fed.checkpoint import load_checkpoint
from feddpa_fast.fed.client import Client
from feddpa_fast.fed.runner import run

# Three rounds, so a kill or a failure can land in the middle of the run.
_cfg = partial(tiny_cfg, algo="feddpa-t", rounds=3, test_limit=4, seed=5, alpha=16.0)


def _same_global(a_dir, b_dir):
    a, _ = load_checkpoint(a_dir / "checkpoint.safetensors")
    b, _ = load_checkpoint(b_dir / "checkpoint.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_SLOW_CHECKPOINT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    marker = Path(sys.argv[1])
    real_replace = os.replace
    seen = []
    def slow_replace(src, dst):
        if str(dst).endswith("checkpoint.safetensors"):
            seen.append(dst)
            if len(seen) == 2:  # round 1's checkpoint: temp file written and fsynced
                marker.write_text("in the window")
                time.sleep(30)
        real_replace(src, dst)
    os.replace = slow_replace
    from feddpa_fast.fed.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _argv(model_dir, out):
    return ["train", "--algo", "feddpa-t", "--model", str(model_dir), "--clients", "2",
            "--rounds", "3", "--max-steps", "2", "--batch-size", "8", "--test-limit", "4",
            "--lr", "0.01", "--r", "4", "--seed", "5", "--out", str(out), "--quiet"]


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_checkpoint_then_resume(bert_dir, tmp_path):
    reference = tmp_path / "reference"
    run(_cfg(bert_dir, reference), progress=False)
    out, marker = tmp_path / "killed", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHECKPOINT, str(marker)]
                            + _argv(bert_dir, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached its first checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Killed between fsync and rename: round 0's checkpoint is intact, round 1's temp file
    # is left behind; resuming redoes round 1 and removes the leftover.
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]
    _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state.rounds_done == 1
    run(_cfg(bert_dir, out), resume=True, progress=False)
    assert _same_global(reference, out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(bert_dir, tmp_path,
                                                                        monkeypatch):
    reference = tmp_path / "reference"
    run(_cfg(bert_dir, reference), progress=False)
    out = tmp_path / "full"
    real = checkpoint_mod.atomic_write_bytes
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint after round 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint_mod, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="No space left"):
        run(_cfg(bert_dir, out), progress=False)
    _, state = load_checkpoint(out / "checkpoint.safetensors")  # the previous one, intact
    assert state.rounds_done == 1
    monkeypatch.setattr(checkpoint_mod, "atomic_write_bytes", real)
    run(_cfg(bert_dir, out), resume=True, progress=False)
    assert _same_global(reference, out)


def test_a_permission_error_while_checkpointing_is_clear_and_loses_nothing(bert_dir, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "ro"
    real = checkpoint_mod.atomic_write_bytes

    def denied(path, data):
        if path.exists():  # every checkpoint after the first
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint_mod, "atomic_write_bytes", denied)
    with pytest.raises(PermissionError):
        run(_cfg(bert_dir, out), progress=False)
    tensors, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state.rounds_done == 1 and all(torch.isfinite(t).all() for t in tensors.values())


def test_a_client_that_crashes_mid_round_is_left_out(bert_dir, tmp_path, monkeypatch):
    """The crash is in ``begin_round``, which both the one-client loop and a cohort run."""
    real = Client.begin_round

    def flaky(self, broadcast, round_index, expected):
        if self.name == "product" and round_index == 1:
            raise ConnectionResetError("client vanished")
        return real(self, broadcast, round_index, expected)

    monkeypatch.setattr(Client, "begin_round", flaky)
    results = run(_cfg(bert_dir, tmp_path / "r"), progress=False)
    import json
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    accepted = {r["round"]: r["accepted"] for r in rows if "round" in r}
    assert accepted[1] == ["sentiment"] and accepted[0] == accepted[2] == ["sentiment", "product"]
    assert 0 <= results["P"] <= 1
