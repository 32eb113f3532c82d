"""The compressed wire (--wire-dtype) and client-level DP (--dp-clip, --dp-noise-multiplier):
bytes, dtypes, the exact clipped run at sigma 0, the accountant, seeded noise, resume."""
import json
import math
from functools import partial

import pytest
import torch
from fed_fixtures import tiny_cfg
from opacus.accountants import RDPAccountant

from feddpa_fast.fed import aggregate as aggregate_mod
from feddpa_fast.fed.checkpoint import load_checkpoint
from feddpa_fast.fed.privacy import PrivacySettings, clip_and_noise, epsilon
from feddpa_fast.fed.run_config import ConfigError, RunConfig
from feddpa_fast.fed.runner import Run, run

_cfg = partial(tiny_cfg, algo="feddpa-t")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # whole runs: `make test`, not `make test-fast`
def test_bf16_and_fp16_halve_the_bytes_and_the_server_keeps_fp32(bert_dir, tmp_path,
                                                                 uploads_seen):
    sizes = {}
    for dtype in ("fp32", "bf16", "fp16"):
        out = tmp_path / dtype
        results = run(_cfg(bert_dir, out, wire_dtype=dtype), progress=False)
        row = _rows(out)[0]
        sizes[dtype] = (row["bytes_up_per_client"], row["bytes_down"])
        assert results["wire_dtype"] == dtype
        global_state, _ = load_checkpoint(out / "checkpoint.safetensors")
        assert {t.dtype for t in global_state.values()} == {torch.float32}
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    per_run = len(uploads_seen) // 3
    for i, dtype in enumerate(("fp32", "bf16", "fp16")):
        seen = {t.dtype for _, up in uploads_seen[i * per_run:(i + 1) * per_run]
                for t in up.values()}
        assert seen == {want[dtype]}
    for dtype in ("bf16", "fp16"):  # (a tiny model: the header is a large share here)
        assert sizes[dtype][0] < sizes["fp32"][0] and sizes[dtype][1] < sizes["fp32"][1]


def test_bf16_blob_of_the_demo_adapter_is_at_most_051_of_fp32():
    """The demo's global adapter: MiniLM-L6, 6 layers x (query, value), r 8, PEFT names."""
    from feddpa_fast.fed import wire

    tensors = {}
    for layer in range(6):
        for proj in ("query", "value"):
            stem = f"base_model.model.encoder.layer.{layer}.attention.self.{proj}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(8, 384)
            tensors[f"{stem}.lora_B.weight"] = torch.randn(384, 8)
    meta = {"round": 3, "client": "sentiment", "num_examples": 100}
    fp32 = len(wire.encode(tensors, meta))
    assert fp32 == 298_216  # the demo's bytes up per client per round (README's demo table)
    for dtype in ("bf16", "fp16"):
        blob = wire.encode(wire.cast(tensors, dtype), meta)
        assert len(blob) <= 0.51 * fp32, (dtype, len(blob), fp32)


def test_aggregation_of_bf16_updates_is_fp64_inside_and_fp32_out():
    glob = {"w": torch.zeros(3)}
    ups = [{"w": torch.tensor([1.0, 2.0, 3.0]).bfloat16()},
           {"w": torch.tensor([1.0078125, 2.0, 3.0]).bfloat16()}]
    new = aggregate_mod.aggregate("uniform", glob, ups, [1, 1])
    assert new["w"].dtype == torch.float32
    assert new["w"][0].item() == (1.0 + 1.0078125) / 2  # not rounded back to bf16


def test_clip_and_noise_sigma_zero_is_the_exact_clipped_update():
    torch.manual_seed(0)
    received = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    upload = {k: v + 10 * torch.randn_like(v) for k, v in received.items()}
    settings = PrivacySettings(clip=0.5, noise_multiplier=0.0)
    out = clip_and_noise(upload, received, settings, seed=1)
    delta = {k: upload[k].double() - received[k].double() for k in upload}
    norm = math.sqrt(sum(float(d.square().sum()) for d in delta.values()))
    for k in upload:
        expected = (received[k].double() + delta[k] * (0.5 / norm)).float()
        assert torch.equal(out[k], expected)
    clipped = math.sqrt(sum(float((out[k].double() - received[k].double()).square().sum())
                            for k in out))
    assert clipped <= 0.5 + 1e-6
    small = {k: v + 1e-4 for k, v in received.items()}  # inside the ball: unchanged
    kept = clip_and_noise(small, received, settings, seed=1)
    assert all(torch.equal(kept[k], small[k]) for k in small)


def test_noise_is_seeded_and_has_the_stated_scale():
    received = {"a": torch.zeros(20000)}
    settings = PrivacySettings(clip=0.5, noise_multiplier=2.0)
    one = clip_and_noise(received, received, settings, seed=7)
    assert torch.equal(one["a"], clip_and_noise(received, received, settings, seed=7)["a"])
    assert not torch.equal(one["a"], clip_and_noise(received, received, settings, seed=8)["a"])
    assert abs(one["a"].std().item() - 1.0) < 0.03  # sigma * C = 1


@pytest.mark.slow  # whole runs: `make test`, not `make test-fast`
def test_epsilon_is_the_accountants_and_is_reported_per_round(bert_dir, tmp_path):
    out = tmp_path / "dp"
    results = run(_cfg(bert_dir, out, rounds=3, fraction=0.5, dp_clip=0.5,
                       dp_noise_multiplier=1.0, dp_delta=1e-4), progress=False)
    rows = [r for r in _rows(out) if "round" in r]
    accountant = RDPAccountant()
    for r in rows:  # one client of two per round: q = 0.5
        accountant.step(noise_multiplier=1.0, sample_rate=0.5)
        assert r["epsilon"] == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-12)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert results["dp"] == {"clip": 0.5, "noise_multiplier": 1.0, "delta": 1e-4,
                             "epsilon": rows[-1]["epsilon"]}
    assert epsilon(PrivacySettings(0.5, 0.0), [1.0]) == math.inf
    with pytest.raises(ConfigError, match="--dp-clip"):
        RunConfig(dp_noise_multiplier=1.0)


@pytest.mark.slow  # whole runs: `make test`, not `make test-fast`
def test_sigma_zero_run_equals_the_client_clipped_run(bert_dir, tmp_path, uploads_seen):
    """With noise 0, every upload is exactly received + clip(update)."""
    run(_cfg(bert_dir, tmp_path / "c", dp_clip=1e-3, dp_noise_multiplier=0.0), progress=False)
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["dp"]["epsilon"] is None  # no noise: unbounded
    ckpt, _ = load_checkpoint(tmp_path / "c" / "checkpoint.safetensors")
    assert uploads_seen and all(set(u) == set(ckpt) for _, u in uploads_seen)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_resume_is_bit_identical_with_every_wire_dtype_and_dp(bert_dir, tmp_path, monkeypatch,
                                                             dtype):
    kw = dict(rounds=3, wire_dtype=dtype, dp_clip=0.5, dp_noise_multiplier=0.5)
    reference = run(_cfg(bert_dir, tmp_path / "ref", **kw), progress=False)
    original = Run._round

    def crash_after_round_1(self, r, transport):
        row = original(self, r, transport)
        if r == 1:
            raise KeyboardInterrupt("killed after round 1's checkpoint")
        return row

    monkeypatch.setattr(Run, "_round", crash_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(bert_dir, tmp_path / "cut", **kw), progress=False)
    monkeypatch.setattr(Run, "_round", original)
    resumed = run(_cfg(bert_dir, tmp_path / "cut", **kw), resume=True, progress=False)
    a, _ = load_checkpoint(tmp_path / "ref" / "checkpoint.safetensors")
    b, state = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(state.sample_rates) == 3
    assert resumed["dp"]["epsilon"] == reference["dp"]["epsilon"]
    assert (resumed["P"], resumed["TTP"]) == (reference["P"], reference["TTP"])


def test_a_compressed_wire_keeps_the_fp32_master_below_the_wire_resolution():
    """Master 1.0001 is sent as bf16 1.0; an upload equal to what was sent leaves 1.0001."""
    from feddpa_fast.fed import wire
    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.server import Server, ServerSettings

    server = Server({"w": torch.tensor([1.0001, -2.0003])}, ["a"],
                    ServerSettings.from_config(RunConfig(wire_dtype="bf16")), seed=0)
    sent, _ = wire.decode(server.broadcasts(0, ["a"])["a"], server.expected(), round=0,
                          sender="server")
    assert sent["w"].dtype == torch.bfloat16 and sent["w"][0].item() == 1.0
    blob = wire.encode(sent, {"round": 0, "client": "a", "num_examples": 1})
    new, accepted = server.aggregate_round(0, {"a": blob})
    assert accepted == ["a"] and new["w"].dtype == torch.float32
    assert torch.equal(new["w"], torch.tensor([1.0001, -2.0003]))


@pytest.mark.slow  # whole runs: `make test`, not `make test-fast`
def test_fdlora_round_0_is_clipped_against_its_own_starting_point(bert_dir, tmp_path,
                                                                  uploads_seen):
    """FDLoRA's round 0 uploads the personalized adapter: its DP update is trained - fresh
    local init, not trained - the received global (a different random init)."""
    from feddpa_fast.adapters import adapter_state_dict
    from feddpa_fast.fed.checkpoint import derive_seed
    from feddpa_fast.fed.loading import build_task
    from feddpa_fast.fed.training import init_adapter

    cfg = _cfg(bert_dir, tmp_path / "f", algo="fdlora", rounds=1, dp_clip=0.05,
               dp_noise_multiplier=0.0)
    run(cfg, progress=False)
    task = build_task(cfg)
    first = uploads_seen[0][1]  # the first client's round-0 upload ("sentiment")
    init_adapter(task.model, "local", derive_seed(cfg.seed, "local-init", "sentiment"))
    start = adapter_state_dict(task.model, "local")
    init_adapter(task.model, "global", derive_seed(cfg.seed, "global-init"))
    received = adapter_state_dict(task.model, "global")
    key_map = dict(zip(sorted(start), sorted(first)))  # local keys -> uploaded names

    def norm(a, b):
        return math.sqrt(sum(float((a[key_map[k]].double() - b[k].double()).square().sum())
                             for k in b))

    assert norm(first, start) <= 0.05 + 1e-6
    assert norm(first, {k: received[k2] for k, k2 in zip(sorted(start), sorted(received))}) \
        > 1.0
