"""The Triton backend on a real GPU, through the default dispatch (torch.ops.feddpa.* -> the
CUDA kernels registered by feddpa_fast.kernels): the interpreter cases plus bf16 without the
upcast path and larger shapes, against the float64 reference. Skipped only when CUDA is absent."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from feddpa_fast.kernels import backend_for, lora_linear  # noqa: E402
from op_cases import assert_close_to_reference, make_inputs  # noqa: E402

SHAPES = [((1,), 48, 40, 8), ((3,), 80, 96, 16), ((67,), 48, 96, 48), ((2, 5), 80, 40, 8),
          ((1,), 4096, 4096, 32), ((16,), 4096, 11008, 32), ((64,), 4096, 4096, 32),
          ((513,), 1000, 1030, 32), ((2, 1024), 4096, 4096, 32)]


def on_gpu(**kw):
    return lora_linear(**kw)


def test_cuda_dispatches_to_triton():
    assert backend_for("cuda") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape,k,n,r", SHAPES)
@pytest.mark.parametrize("row_scale,bias", [(True, True), (False, False)])
def test_outputs_and_gradients_match_reference(dtype, m_shape, k, n, r, row_scale, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 compared at ieee precision
    assert_close_to_reference(on_gpu, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape,k,n,r", [SHAPES[0], SHAPES[3], SHAPES[5], SHAPES[7]])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_input_matches_reference(dtype, m_shape, k, n, r, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=bias, device="cuda",
                         lora_input=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_close_to_reference(on_gpu, inputs)


@pytest.mark.parametrize("wanted", [("lora_input",), ("x",), ("lora_a", "scale")])
def test_lora_input_only_requested_gradients(wanted):
    inputs = make_inputs((2, 33), 256, 320, 16, torch.float16, device="cuda", lora_input=True)
    assert_close_to_reference(on_gpu, inputs, wanted=wanted)


def test_torch_compile_fullgraph_on_gpu():
    inputs = make_inputs((4, 33), 256, 320, 16, torch.bfloat16, device="cuda")
    a = inputs["lora_a"].requires_grad_(True)
    b = inputs["lora_b"].requires_grad_(True)

    def fn(x):
        return lora_linear(x, inputs["weight"], inputs["bias"], a, b, inputs["scale"]).float()

    compiled = torch.compile(fn, fullgraph=True)
    y_eager, y_comp = fn(inputs["x"]), compiled(inputs["x"])
    torch.testing.assert_close(y_comp, y_eager)
    y_comp.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
