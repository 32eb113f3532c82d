"""Every bad input to lora_linear raises the documented ValueError / TypeError naming the
argument, on every backend that checks (native, reference)."""
import pytest
import torch
from op_cases import make_inputs

from feddpa_fast.kernels import lora_linear

BACKENDS = ["native", "reference"]


def base_inputs():
    return make_inputs((6,), 16, 12, 4, torch.float32)


CASES = [
    # (description, mutation, error type, message fragment)
    ("rank mismatch", lambda d: d.update(lora_b=torch.randn(12, 5)), ValueError, "rank mismatch"),
    ("K of weight", lambda d: d.update(weight=torch.randn(12, 15)), ValueError, "weight has K"),
    ("K of lora_a", lambda d: d.update(lora_a=torch.randn(4, 15)), ValueError, "lora_a has K"),
    ("N of lora_b", lambda d: d.update(lora_b=torch.randn(11, 4)), ValueError, "lora_b has N"),
    ("scale rows", lambda d: d.update(scale=torch.rand(5, 4)), ValueError, "scale must have shape"),
    ("scale cols", lambda d: d.update(scale=torch.rand(6, 3)), ValueError, "scale must have shape"),
    ("scale 1-D", lambda d: d.update(scale=torch.rand(4)), ValueError, "scale must have shape"),
    ("weight 1-D", lambda d: d.update(weight=torch.randn(12)), ValueError,
     "weight must have shape"),
    ("lora_a 3-D", lambda d: d.update(lora_a=torch.randn(1, 4, 16)), ValueError,
     "lora_a must have"),
    ("x 0-d", lambda d: d.update(x=torch.tensor(1.0)), ValueError, "x must have shape"),
    ("bias shape", lambda d: d.update(bias=torch.randn(11)), ValueError, "bias must have shape"),
    ("weight dtype", lambda d: d.update(weight=d["weight"].double()), TypeError,
     "weight has dtype"),
    ("lora_a dtype", lambda d: d.update(lora_a=d["lora_a"].half()), TypeError, "lora_a has dtype"),
    ("lora_b dtype", lambda d: d.update(lora_b=d["lora_b"].bfloat16()), TypeError,
     "lora_b has dtype"),
    ("bias dtype", lambda d: d.update(bias=d["bias"].double()), TypeError, "bias has dtype"),
    ("scale dtype", lambda d: d.update(scale=d["scale"].half()), TypeError, "scale must be"),
    ("x integer", lambda d: d.update(x=torch.ones(6, 16, dtype=torch.int32)), TypeError,
     "x has dtype"),
    ("device mix", lambda d: d.update(lora_b=d["lora_b"].to("meta")), ValueError,
     "lora_b is on meta"),
    ("bias device", lambda d: d.update(bias=d["bias"].to("meta")), ValueError, "bias is on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("desc,mutate,error,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(backend, desc, mutate, error, fragment):
    inputs = base_inputs()
    mutate(inputs)
    with pytest.raises(error, match=fragment):
        lora_linear(**inputs, backend=backend)


def test_trainable_weight_is_refused():
    inputs = base_inputs()
    inputs["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="weight must be frozen"):
        lora_linear(**inputs)
    with torch.no_grad():  # no gradient can be asked for: fine
        lora_linear(**inputs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        lora_linear(**base_inputs(), backend="cuda-magic")


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FEDDPA_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FEDDPA_FAST_BACKEND"):
        lora_linear(**base_inputs())


def test_native_on_a_non_cpu_device_is_refused():
    meta = {k: (v.to("meta") if v is not None else None) for k, v in base_inputs().items()}
    with pytest.raises(ValueError, match="native"):
        lora_linear(**meta, backend="native")
