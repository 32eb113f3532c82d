"""The native CPU backend of lora_linear against the float64 reference: outputs and every
gradient, over dtypes, odd shapes, both scale layouts, bias or none, 3-D and strided input."""
import pytest
import torch
from op_cases import assert_close_to_reference, make_inputs

from feddpa_fast.kernels import backend_for, lora_linear

SHAPES = [  # (leading shape of x, K, N, R)
    ((1,), 97, 130, 1),
    ((67,), 97, 130, 12),
    ((5,), 64, 48, 64),
    ((130,), 33, 17, 16),
    ((2, 5), 40, 24, 8),
    ((3, 1, 7), 16, 9, 3),
    ((300,), 300, 70, 32),  # more rows than one upcast chunk of the fp16/bf16 path
]


def native(**kw):
    return lora_linear(**kw, backend="native")


def test_cpu_dispatches_to_native():
    assert backend_for("cpu") == "native"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m_shape,k,n,r", SHAPES)
@pytest.mark.parametrize("row_scale", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_gradients_match_reference(dtype, m_shape, k, n, r, row_scale, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale)
    assert_close_to_reference(native, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_input(dtype):
    inputs = make_inputs((4, 9), 48, 40, 8, dtype, noncontig=True)
    assert_close_to_reference(native, inputs)


def test_transposed_weight_view_is_read_in_place():
    # GPT-2's Conv1D stores (K, N): the layer passes weight.T, a non-contiguous view.
    inputs = make_inputs((6,), 24, 40, 4, torch.float32)
    inputs["weight"] = inputs["weight"].T.contiguous().T
    assert not inputs["weight"].is_contiguous()
    assert_close_to_reference(native, inputs)


def test_gradcheck_float64():
    for row_scale in (True, False):
        for bias in (True, False):
            inp = make_inputs((2, 3), 7, 5, 3, torch.float64, bias=bias, row_scale=row_scale)
            args = [inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scale")]
            for i in (0, 2, 3, 4, 5):
                if args[i] is not None:
                    args[i] = args[i].detach().requires_grad_(True)
            assert torch.autograd.gradcheck(lambda *a: native(**dict(zip(
                ("x", "weight", "bias", "lora_a", "lora_b", "scale"), a))), tuple(args))


def test_zero_scale_switches_a_branch_off():
    inputs = make_inputs((9,), 16, 12, 8, torch.float32)
    inputs["scale"][:, 4:] = 0  # local branch off
    local_off = native(**inputs)
    only_global = dict(inputs, lora_a=inputs["lora_a"][:4], lora_b=inputs["lora_b"][:, :4],
                       scale=inputs["scale"][:, :4])
    torch.testing.assert_close(local_off, native(**only_global), atol=1e-6, rtol=1e-6)


def test_empty_batch():
    inputs = make_inputs((0,), 16, 12, 4, torch.float32)
    y = native(**inputs)
    assert y.shape == (0, 12)


def test_inference_mode_runs_the_cpu_kernel_directly():
    inputs = make_inputs((5,), 16, 12, 4, torch.float32)
    with torch.inference_mode():
        y = native(**inputs)
    torch.testing.assert_close(y, native(**inputs))


def test_non_finite_values_propagate_unchecked():
    # Documented: finiteness is not checked on the hot path; NaN flows through like F.linear.
    inputs = make_inputs((3,), 8, 6, 2, torch.float32)
    inputs["x"][1, 0] = float("nan")
    y = native(**inputs)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# --- the autograd kernel's needs-input-grad mask and what it saves ---

@pytest.mark.parametrize("wanted", [("x",), ("lora_a", "lora_b"), ("x", "bias", "scale"),
                                    ("scale",), ("bias",)])
@pytest.mark.parametrize("bias", [True, False])  # needs_input_grad slots shift without bias
def test_only_requested_gradients(wanted, bias):
    inputs = make_inputs((3, 4), 20, 30, 6, torch.float32, bias=bias)
    if not bias and wanted == ("bias",):
        wanted = ("x",)
    assert_close_to_reference(native, inputs, wanted=wanted)


def test_backward_saves_x_itself():
    inputs = make_inputs((5,), 16, 12, 4, torch.float32)
    for name in ("x", "lora_a"):
        inputs[name].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        native(**inputs)
    # x (no copy), W, A, B, scale and u (M x R): one (M, K) activation in all.
    assert inputs["x"].data_ptr() in {t.data_ptr() for t in saved}
    assert sum(t.numel() >= inputs["x"].numel() and t.shape == inputs["x"].shape
               for t in saved) == 1
