"""Atomic writes, seed derivation and the server checkpoint."""
import dataclasses
import os
import struct

import pytest
import torch

from feddpa_fast.atomic import atomic_write_bytes
from feddpa_fast.fed.checkpoint import (
    CheckpointError,
    derive_seed,
    load_checkpoint,
    save_checkpoint,
)
from feddpa_fast.fed.run_state import RunState


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"good")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"bad")
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_derive_seed_is_stable_and_distinguishes_its_parts():
    assert derive_seed(0, "local-init", "c1") == derive_seed(0, "local-init", "c1")
    seeds = {derive_seed(0, 1, "a"), derive_seed(0, 1, "b"), derive_seed(1, 1, "a"),
             derive_seed(0, 2, "a")}
    assert len(seeds) == 4 and all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_seed(0, "x") == 2510927220155801981  # pinned: resume relies on stability


def test_checkpoint_round_trip_and_corruption(tmp_path):
    adapter = {"k": torch.arange(6.0).reshape(2, 3)}
    state = RunState(config={"algo": "fedit"}, seed=3, rounds_done=2, sample_rates=(0.5,),
                     data_sha256={"train.jsonl": "ab"})
    save_checkpoint(tmp_path / "c", adapter, state)
    tensors, loaded = load_checkpoint(tmp_path / "c")
    assert torch.equal(tensors["k"], adapter["k"]) and loaded == state
    (tmp_path / "c").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")


def test_truncate_metrics_skips_a_line_torn_by_a_kill(tmp_path):
    from feddpa_fast.fed.checkpoint import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0, "P": 0.5}\n{"round": 1, "P": 0.6}\n{"round": 2, "P"')
    assert [r["round"] for r in read_metrics(path)] == [0, 1]
    truncate_metrics(path, 1)
    assert path.read_text() == '{"round": 0, "P": 0.5}\n'


def _flip_exponent_bit(path, tensor_offset=0):
    """Turns the first float32 of the tensor data into a huge finite value (one bit)."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little") + tensor_offset
    (value,) = struct.unpack("<f", blob[start:start + 4])
    blob[start + 3] ^= 0x40  # the exponent's top bit: 0.5 -> 1.7e38, still finite
    (flipped,) = struct.unpack("<f", blob[start:start + 4])
    assert flipped != value and abs(flipped) < float("inf")
    path.write_bytes(bytes(blob))


def test_a_finite_bit_flip_in_a_checkpoint_is_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path / "c", {"k": torch.full((2, 3), 0.5)},
                    RunState(config={}, seed=0, rounds_done=1))
    _flip_exponent_bit(tmp_path / "c")
    before = (tmp_path / "c").read_bytes()
    with pytest.raises(CheckpointError, match=r"c: its tensors do not match the SHA-256"):
        load_checkpoint(tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == before  # nothing rewritten


def test_a_checkpoint_from_before_digests_still_loads(tmp_path):
    from safetensors.torch import save as st_save
    old_state = '{"config": {"algo": "fedit"}, "rounds_done": 1, "seed": 0}'
    (tmp_path / "old").write_bytes(st_save({"k": torch.ones(2)},
                                           metadata={"format": "pt", "state": old_state}))
    tensors, state = load_checkpoint(tmp_path / "old")
    assert state.rounds_done == 1 and torch.equal(tensors["k"], torch.ones(2))


def test_a_schema_1_identity_reads_as_the_run_it_was(tmp_path):
    """Schema 1 left out the options added later when they held the value such runs ran with,
    and named r / target_modules rank / targets: read through the schema, the identity equals
    today's full one of the same run."""
    from feddpa_fast.fed.run_config import RunConfig

    today = RunConfig(prompt_format="alpaca", r=4, target_modules=("query",),
                      dtype="fp32", cohort_size=1).identity()
    old_names = {"r": "rank", "target_modules": "targets"}  # the trainer's names then
    schema_1 = {old_names.get(k, k): v for k, v in today.items()
                if k not in ("num_beams", "max_new_tokens", "prompt_format", "search_examples",
                             "wire_dtype", "dp_clip", "dp_noise_multiplier", "dp_delta",
                             "dtype", "compile", "cohort_size")}
    assert schema_1["rank"] == 4 and schema_1["targets"] == ["query"]
    state = RunState.from_json({"config": schema_1, "seed": 0, "rounds_done": 2})
    assert state.config == today
    assert RunState.from_json(state.to_json()) == state  # schema 4 records it as is
    # Schema 2 recorded every option but the base dtype and compile: those runs ran the base
    # in fp32, eagerly. Schema 3 recorded all but cohort_size: they trained one at a time.
    schema_2 = {k: v for k, v in today.items() if k not in ("dtype", "compile", "cohort_size")}
    assert RunState.from_json({"schema": 2, "config": schema_2, "seed": 0,
                               "rounds_done": 2}).config == today
    schema_3 = {k: v for k, v in today.items() if k != "cohort_size"}
    assert RunState.from_json({"schema": 3, "config": schema_3, "seed": 0,
                               "rounds_done": 2}).config == today
    with pytest.raises(ValueError, match="schema 5"):
        RunState.from_json({**state.to_json(), "schema": 5})
    for bad in ({"seed": 0}, {"config": {}, "seed": 0}):
        with pytest.raises(ValueError, match="without"):
            RunState.from_json(bad)


def test_finished_counts_the_post_step():
    state = RunState(config={}, seed=0, rounds_done=3)
    assert state.finished(3, None) and not state.finished(4, None)
    assert not state.finished(3, "local fine-tuning")
    assert dataclasses.replace(state, post_done=True).finished(3, "local fine-tuning")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_end_with_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
        with open(tmp_path / "b", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask


def test_resume_refuses_a_changed_checkpoint_or_local_adapter_and_names_settings(
        bert_dir, tmp_path, monkeypatch):
    from fed_fixtures import tiny_cfg

    from feddpa_fast.fed.runner import Run, run

    original = Run._round

    def stop_after_round_1(self, r, *args, **kwargs):
        row = original(self, r, *args, **kwargs)
        if r == 1:
            raise KeyboardInterrupt("killed after round 1's checkpoint")
        return row

    settings = dict(algo="feddpa-t", test_limit=4, rounds=3)
    cfg = tiny_cfg(bert_dir, tmp_path / "cut", **settings)
    monkeypatch.setattr(Run, "_round", stop_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    monkeypatch.setattr(Run, "_round", original)
    # Another setting: named, with both values.
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.01, now 0\.02"):
        run(tiny_cfg(bert_dir, tmp_path / "cut", **settings, lr=0.02), resume=True,
            progress=False)
    local = tmp_path / "cut" / "clients" / "sentiment" / "local_r0001.safetensors"
    saved = local.read_bytes()
    _flip_exponent_bit(local)
    with pytest.raises(CheckpointError, match="local_r0001.safetensors: its tensors"):
        run(cfg, resume=True, progress=False)
    local.write_bytes(saved)
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    _flip_exponent_bit(ckpt)
    corrupted = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="checkpoint.safetensors: its tensors"):
        run(cfg, resume=True, progress=False)
    assert ckpt.read_bytes() == corrupted  # refused, nothing overwritten


def test_a_relative_or_absolute_data_path_is_the_same_run(tmp_path, monkeypatch):
    from feddpa_fast.fed.checkpoint import resume_state
    from feddpa_fast.fed.run_config import RunConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    relative, absolute = RunConfig(data="data"), RunConfig(data=str(tmp_path / "data"))
    assert relative.identity() == absolute.identity()
    assert relative.identity()["data"] == str(tmp_path / "data")  # recorded resolved
    # A checkpoint from before identities resolved paths holds the path as typed.
    old = {**absolute.identity(), "data": "data"}
    save_checkpoint(tmp_path / "c", {"k": torch.ones(1)},
                    RunState(config=old, seed=0, rounds_done=1))
    assert resume_state(tmp_path / "c", absolute.identity())[1].rounds_done == 1
    with pytest.raises(CheckpointError, match=r"rounds: checkpoint 3, now 4"):
        resume_state(tmp_path / "c", RunConfig(data="data", rounds=4).identity())


def test_resume_refuses_data_whose_contents_changed(tmp_path, monkeypatch):
    from fed_fixtures import causal_lm_data_dir, tiny_llama_dir

    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.runner import Run, run

    data = causal_lm_data_dir(tmp_path)
    cfg = RunConfig(algo="fedit", model=str(tiny_llama_dir(tmp_path)), task="causal-lm",
                    data=str(data), clients=2, rounds=2, max_steps=1, batch_size=4, r=4,
                    test_limit=2, max_new_tokens=2, out=str(tmp_path / "cut"),
                    target_modules=("q_proj", "v_proj"))
    original = Run._round

    def stop_after_round_0(self, r, *args, **kwargs):
        original(self, r, *args, **kwargs)
        raise KeyboardInterrupt("killed after round 0's checkpoint")

    monkeypatch.setattr(Run, "_round", stop_after_round_0)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    monkeypatch.setattr(Run, "_round", original)
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")[1]
    assert set(state.data_sha256) == {"train.jsonl", "test.jsonl"}
    test_file = data / "test.jsonl"
    kept = test_file.read_bytes()
    test_file.write_bytes(kept.replace(b"lamp", b"lump"))  # the same shape, other contents
    with pytest.raises(CheckpointError, match=r"test.jsonl of --data .*another SHA-256"):
        run(cfg, resume=True, progress=False)
    test_file.write_bytes(kept)
    assert run(cfg, resume=True, progress=False)["P"] >= 0  # the same data resumes
