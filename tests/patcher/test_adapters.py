"""PEFT equivalence and PEFT-format adapter I/O (docs/ARCHITECTURE.md §2)."""
import copy
import json

import pytest
import torch
from tiny_models import batch, build, output_of, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.adapters import AdapterError, adapter_state_dict
from feddpa_fast.layers import dual_lora_layers

peft = pytest.importorskip("peft")

ONLY = {"global": (1.0, 0.0), "local": (0.0, 1.0)}


def _pair(kind, adapter="global", r=4, alpha=8):
    """(our patched model, a PEFT model with the same weights in its 'default' adapter)."""
    base, targets = build(kind)
    ours = fd.patch(copy.deepcopy(base), fd.DualLoRAConfig(
        r=r, alpha=alpha, dropout=0.0, target_modules=targets))
    randomize_lora_b(ours)
    peft_cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                               target_modules=list(targets), fan_in_fan_out=kind == "gpt2")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    peft.set_peft_model_state_dict(theirs, adapter_state_dict(ours, adapter))
    return base, ours, theirs


@pytest.mark.parametrize("kind, adapter", [("llama", "global"), ("llama", "local"),
                                           ("gpt2", "global"), ("bert", "local"),
                                           ("mistral", "global")])
def test_one_adapter_at_weight_one_equals_peft_logits_and_gradients(kind, adapter):
    _, ours, theirs = _pair(kind, adapter)
    inputs = batch(kind)
    with fd.mix(ours, *ONLY[adapter]):
        out = output_of(ours, inputs)
        out.square().mean().backward()
    ref = output_of(theirs, inputs)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    peft_params = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if f".{adapter}." not in name:
            continue
        peft_name = "base_model.model." + name.replace(f".{adapter}.", ".default.")
        torch.testing.assert_close(p.grad, peft_params[peft_name].grad, rtol=1e-4, atol=1e-6,
                                   msg=name)
        compared += 1
    assert compared == 2 * len(dual_lora_layers(ours))


@pytest.mark.parametrize("kind, adapter", [("llama", "global"), ("gpt2", "local"),
                                           ("qwen2", "local")])
def test_peft_loads_what_we_save(tmp_path, kind, adapter):
    base, ours, _ = _pair(kind)
    with torch.no_grad():  # make the two adapters differ
        for n, p in ours.named_parameters():
            if ".local." in n:
                p.mul_(-0.5)
    fd.save_adapter(ours, tmp_path / "a", adapter=adapter)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    inputs = batch(kind)
    with torch.no_grad(), fd.mix(ours, *ONLY[adapter]):
        torch.testing.assert_close(output_of(loaded, inputs), output_of(ours, inputs),
                                   rtol=1e-5, atol=1e-5)


def test_we_load_what_peft_saves_and_honour_its_alpha(tmp_path):
    base, targets = build("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.0, target_modules=list(targets)))
    randomize_lora_b(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = fd.patch(copy.deepcopy(base), fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0,
                                                           target_modules=targets))
    fd.load_adapter(ours, tmp_path / "peft", adapter="local")
    assert all(layer.scaling["local"] == 3.0 for _, layer in dual_lora_layers(ours))
    inputs = batch("llama")
    with torch.no_grad(), fd.mix(ours, 0.0, 1.0):
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs.eval(), inputs),
                                   rtol=1e-5, atol=1e-5)


def test_save_replaces_an_existing_adapter_directory(tmp_path):
    _, ours, _ = _pair("llama")
    fd.save_adapter(ours, tmp_path / "a", adapter="global")
    fd.save_adapter(ours, tmp_path / "a", adapter="local")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # no temp-file leftovers
    other = fd.patch(build("llama")[0], fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0))
    fd.load_adapter(other, tmp_path / "a", adapter="global")
    expected = adapter_state_dict(ours, "local")
    got = adapter_state_dict(other, "global")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def _corrupt(directory, kind):
    cfg_path = directory / "adapter_config.json"
    weights = directory / "adapter_model.safetensors"
    if kind == "missing weights":
        weights.unlink()
    elif kind == "missing config":
        cfg_path.unlink()
    elif kind == "bad json":
        cfg_path.write_text("{not json")
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:40])
    else:
        cfg = json.loads(cfg_path.read_text())
        if kind == "other rank":
            cfg["r"] = 8
        elif kind == "other targets":
            cfg["target_modules"] = ["k_proj"]
        elif kind == "dora":
            cfg["use_dora"] = True
        cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind, error", [
    ("missing weights", FileNotFoundError), ("missing config", FileNotFoundError),
    ("bad json", AdapterError), ("truncated weights", AdapterError),
    ("other rank", AdapterError), ("other targets", AdapterError), ("dora", AdapterError),
])
def test_bad_adapter_directories_raise_and_leave_the_model_unchanged(tmp_path, kind, error):
    _, ours, _ = _pair("llama")
    fd.save_adapter(ours, tmp_path / "a")
    _corrupt(tmp_path / "a", kind)
    target = fd.patch(build("llama", seed=3)[0], fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0))
    snapshot = _snapshot(target)
    with pytest.raises(error):
        fd.load_adapter(target, tmp_path / "a")
    assert _unchanged(target, snapshot)


def test_wrong_shapes_and_non_finite_tensors_raise_and_change_nothing(tmp_path):
    _, ours, _ = _pair("llama")
    target = fd.patch(build("llama", seed=3)[0], fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0))
    snapshot = _snapshot(target)
    good = adapter_state_dict(ours, "global")
    last = sorted(good)[-1]
    for bad_value, match in ((torch.zeros(3, 3), "shape"),
                             (torch.full_like(good[last], float("nan")), "non-finite")):
        tensors = dict(good, **{last: bad_value})
        with pytest.raises(AdapterError, match=match):
            fd.adapters.load_adapter_state_dict(target, tensors, "global")
        assert _unchanged(target, snapshot)
    with pytest.raises(AdapterError, match="missing"):
        fd.adapters.load_adapter_state_dict(target, {k: good[k] for k in sorted(good)[1:]})
    with pytest.raises(FileNotFoundError):
        fd.load_adapter(target, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="adapter must be one of"):
        fd.save_adapter(target, tmp_path / "x", adapter="default")
    assert _unchanged(target, snapshot)


def test_saving_keeps_other_files_in_the_directory(tmp_path):
    _, ours, _ = _pair("llama")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    fd.save_adapter(ours, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]


def test_rslora_scaling_survives_a_save_and_reload(tmp_path):
    base, targets = build("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), use_rslora=True))
    theirs.save_pretrained(tmp_path / "peft")
    ours = fd.patch(copy.deepcopy(base), fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0,
                                                           target_modules=targets))
    fd.load_adapter(ours, tmp_path / "peft", adapter="global")
    assert dual_lora_layers(ours)[0][1].scaling["global"] == 4.0  # 8 / sqrt(4)
    fd.save_adapter(ours, tmp_path / "ours", adapter="global")
    again = fd.patch(copy.deepcopy(base), fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0,
                                                            target_modules=targets))
    fd.load_adapter(again, tmp_path / "ours", adapter="global")
    assert dual_lora_layers(again)[0][1].scaling["global"] == 4.0


def test_a_saved_adapter_changed_on_disk_is_refused_and_peft_still_reads_ours(tmp_path):
    import struct

    from feddpa_fast.sealed import DIGEST_KEY

    _, model, _ = _pair("llama", adapter="local")
    fd.save_adapter(model, tmp_path / "a", adapter="local")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:  # what PEFT reads: the tensors, extra metadata ok
        assert f.metadata()["format"] == "pt" and DIGEST_KEY in f.metadata()
    blob = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little")
    blob[start + 3] ^= 0x40  # one exponent bit of the first float32: a finite value
    assert abs(struct.unpack("<f", blob[start:start + 4])[0]) < float("inf")
    weights.write_bytes(bytes(blob))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fd.AdapterError, match="adapter_model.safetensors: its tensors"):
        fd.load_adapter(model, tmp_path / "a", adapter="local")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
