"""``--dtype``: the frozen base in fp32 / bf16 / fp16 with fp32 adapter masters
(feddpa_fast/precision.py, docs/precision.md): the default by device, what a run records and a
resumed run keeps, bit-identical resume in each dtype, bf16 against fp32 after a few steps,
fp16's loss scaling."""
import dataclasses

import pytest
import torch
from fed_fixtures import causal_lm_data_dir, interrupted_then_resumed, tiny_cfg, tiny_llama_dir
from safetensors.torch import load_file

from feddpa_fast import precision
from feddpa_fast.fed import runner
from feddpa_fast.fed.checkpoint import load_checkpoint, read_metrics
from feddpa_fast.fed.cli import build_parser, config_from_args
from feddpa_fast.fed.run_config import ConfigError, RunConfig
from feddpa_fast.fed.training import loss_scaler

DTYPES = ("fp32", "bf16", "fp16")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    return tiny_llama_dir(root), causal_lm_data_dir(root)


def _cfg(lm, out, **overrides):
    model_dir, data_dir = lm
    return tiny_cfg(model_dir, out, task="causal-lm", data=str(data_dir),
                    target_modules=("q_proj", "v_proj"), **overrides)


def test_the_default_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    assert precision.default_base_dtype("cuda")[0] == "bf16"
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"),
                                       (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        name, reason = precision.default_base_dtype("cpu")
        assert name == expected, (amx, avx512_bf16)
        assert ("natively (AMX)" in reason) == amx
        assert ("natively" in reason) == (expected == "bf16")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the helpers
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert precision.default_base_dtype("cpu")[0] == "fp32"


def test_dtype_names_and_master_dtypes():
    assert precision.base_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="'int8'"):
        precision.base_dtype("int8")
    assert precision.master_dtype(torch.bfloat16) is torch.float32
    assert precision.master_dtype(torch.float16) is torch.float32
    assert precision.master_dtype(torch.float64) is torch.float64


def test_the_flag_the_checkpoint_and_the_machine_decide_in_that_order(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: "AMX")
    assert RunConfig(dtype="fp16").with_base_dtype("fp32")[0].dtype == "fp16"
    cfg, why = RunConfig().with_base_dtype("fp32")
    assert cfg.dtype == "fp32" and "checkpoint" in why
    cfg, why = RunConfig().with_base_dtype()
    assert cfg.dtype == "bf16" and "AMX" in why
    args = build_parser().parse_args(["train", "--dtype", "bf16"])
    assert config_from_args(args).dtype == "bf16"
    with pytest.raises(ConfigError, match="dtype"):
        config_from_args(build_parser().parse_args(["train", "--dtype", "int8"]))
    with pytest.raises(ConfigError, match="dtype"):
        RunConfig(dtype="fp64")


def _interrupted_then_resumed(cfg, monkeypatch):
    """The run killed after its first round's checkpoint, then resumed without the flag: the
    checkpoint's dtype, whatever this machine's default."""
    return interrupted_then_resumed(cfg, monkeypatch, dataclasses.replace(cfg, dtype=None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtype_trains_and_resumes_bit_identically(lm, tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(precision, "native_bf16_cpu",  # the other dtype by default
                        lambda: None if dtype != "fp32" else "AMX")
    straight = runner.run(_cfg(lm, tmp_path / "straight", algo="feddpa-t", dtype=dtype),
                          progress=False)
    resumed = _interrupted_then_resumed(
        _cfg(lm, tmp_path / "resumed", algo="feddpa-t", dtype=dtype), monkeypatch)
    assert straight["dtype"] == resumed["dtype"] == dtype
    a, state = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    b, _ = load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert state.config["dtype"] == dtype
    assert all(t.dtype == torch.float32 for t in a.values())  # fp32 adapters, any base
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("echo", "plural"):
        local = f"adapters/{name}/local/adapter_model.safetensors"
        la, lb = load_file(tmp_path / "straight" / local), load_file(tmp_path / "resumed" / local)
        assert all(t.dtype == torch.float32 for t in la.values())
        assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert straight["per_client"] == resumed["per_client"]


def test_a_resume_with_another_dtype_is_refused(lm, tmp_path):
    cfg = _cfg(lm, tmp_path / "r", algo="fedit", rounds=1, dtype="fp32")
    runner.run(cfg, progress=False)
    with pytest.raises(RuntimeError, match="dtype"):
        runner.run(dataclasses.replace(cfg, dtype="bf16"), resume=True, progress=False)


def _learned(cfg) -> tuple[torch.Tensor, list[float]]:
    """(every learned B flattened into one vector, the training loss of each round)."""
    runner.run(cfg, progress=False)
    adapter, _ = load_checkpoint(f"{cfg.out}/checkpoint.safetensors")
    rows = read_metrics(f"{cfg.out}/metrics.jsonl")
    update = torch.cat([adapter[k].flatten() for k in sorted(adapter) if "lora_B" in k])
    return update, [r["loss_global"] for r in rows if "loss_global" in r]


def test_bf16_learns_what_fp32_learns_within_a_stated_tolerance(lm, tmp_path):
    """FedIT, 2 rounds x 2 AdamW steps at lr 1e-2 from the same init, fp32 and bf16 base.
    Stated tolerance: each round's training loss within 1e-4 relative of fp32's, and the
    learned update (every B: B starts at 0) at cosine >= 0.99 with fp32's. bf16's 8-bit
    mantissa (unit roundoff 3.9e-3) perturbs the base's activations and the adapters'
    gradients; AdamW's normalised steps turn small gradient differences into whole-step
    differences on some elements. Measured on this tiny model: losses 1.5e-5 relative apart,
    cosine 0.996 (per layer, B differs by up to 12% relative L2)."""
    settings = dict(algo="fedit", lr=1e-2, final_eval="none")
    ref, ref_losses = _learned(_cfg(lm, tmp_path / "fp32", dtype="fp32", **settings))
    low, low_losses = _learned(_cfg(lm, tmp_path / "bf16", dtype="bf16", **settings))
    assert ref.abs().sum() > 0 and len(ref_losses) == 2  # it learned something
    torch.testing.assert_close(torch.tensor(low_losses), torch.tensor(ref_losses), rtol=1e-4,
                               atol=0)
    cosine = float(torch.nn.functional.cosine_similarity(low, ref, dim=0))
    assert cosine >= 0.99, cosine


def test_fp16_scales_the_loss_and_the_others_do_not(lm):
    from feddpa_fast.fed.loading import build_task

    for dtype, scaled in (("fp16", True), ("bf16", False), ("fp32", False)):
        task = build_task(_cfg(lm, "unused", dtype=dtype))
        assert next(task.model.parameters()).dtype == precision.base_dtype(dtype)
        assert loss_scaler(task.model).is_enabled() == scaled, dtype


def test_fp16_loss_scaling_keeps_gradients_that_fp16_would_flush_to_zero(lm):
    """An fp16 base flushes activation gradients below 6e-8 to zero on the way back; the
    loss scaled by the trainer's initial scale (2^10) keeps some of them, and unscaling
    restores their true size."""
    from feddpa_fast.fed.loading import build_task
    from feddpa_fast.mixing import mix, set_trainable

    task = build_task(_cfg(lm, "unused", dtype="fp16"))
    set_trainable(task.model, "global")
    examples = [type("E", (), {"instruction": "repeat the word cat", "input": "",
                               "output": "cat"})()]
    grads = {}
    initial = loss_scaler(task.model).get_scale()
    assert initial == 2.0 ** 10
    for scale in (1.0, initial):
        task.model.zero_grad(set_to_none=True)
        with mix(task.model, 1.0, 0.0):
            (task.loss(examples) * 1e-6 * scale).backward()  # a small loss: tiny gradients
        grads[scale] = torch.cat([p.grad.flatten() / scale for p in task.model.parameters()
                                  if p.requires_grad])
    kept, lost = (grads[initial] != 0).sum(), (grads[1.0] != 0).sum()
    assert kept > lost  # unscaled, fp16 flushed gradients that scaling kept


@pytest.mark.slow
def test_compile_trains_and_scores_as_the_eager_run(lm, tmp_path):
    """--compile (inductor) trains the same FedIT rounds as eager, dropout masks included:
    the same training losses within 1e-4 relative and the learned update (every B) at cosine
    >= 0.99 (inductor reorders fp32 sums; AdamW's normalised steps amplify that, as in the bf16
    test above)."""
    settings = dict(algo="fedit", dtype="fp32", lr=1e-2, final_eval="none")
    ref, ref_losses = _learned(_cfg(lm, tmp_path / "eager", **settings))
    got, got_losses = _learned(_cfg(lm, tmp_path / "compiled", compile=True, **settings))
    _, state = load_checkpoint(tmp_path / "compiled" / "checkpoint.safetensors")
    assert state.config["compile"] is True
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(ref_losses), rtol=1e-4,
                               atol=0)
    cosine = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))
    assert cosine >= 0.99, cosine
