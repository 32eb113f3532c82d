"""The Triton kernels (forward, split-K decode forward, fused backward) run in Triton's CPU
interpreter against the float64 reference: outputs and every gradient. fp32 and fp16 directly;
bf16 through the documented upcast path (the interpreter's bf16 dot is wrong). One fixed tile
config (autotuning and timing need a GPU).

The op runs as on a GPU: the Triton kernels are registered as the CPU kernels of the op family
for this module (``triton_op.serving("cpu")``), under the op's one C++ autograd kernel."""
import itertools
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from op_cases import assert_close_scaled, assert_close_to_reference, make_inputs  # noqa: E402

from feddpa_fast.kernels import backend_for, lora_linear, triton_op  # noqa: E402
from feddpa_fast.kernels.triton_config import interpreting, padded_rank  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests: CPU only")


@pytest.fixture(autouse=True, scope="module")
def triton_serves_the_cpu():
    with triton_op.serving("cpu"):
        yield

MS = [(1,), (3,), (67,)]
KN = [(48, 40), (80, 96)]
RS = [8, 16, 48]  # 8 and 48 are padded to 16 and 64
CASES = [(m, k, n, r, i % 2 == 0, i % 3 != 0)
         for i, (m, (k, n), r) in enumerate(itertools.product(MS, KN, RS))]


def triton_backend(**kw):
    return lora_linear(**kw, backend="triton")


def test_interpreter_is_on():
    assert interpreting()


def test_the_triton_kernels_serve_the_op_under_its_one_autograd(monkeypatch):
    """Forward and backward reach the Triton launchers through the C++ autograd kernel (the
    grad_fn the native op has), and the native kernels come back after the block."""
    from feddpa_fast.kernels import triton_backward, triton_forward
    calls = []
    for module, name in ((triton_forward, "forward"), (triton_backward, "backward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **kw:
                            calls.append(name) or real(*a, **kw))
    inputs = make_inputs((5,), 48, 40, 16, torch.float32)
    x = inputs.pop("x").requires_grad_(True)
    y = lora_linear(x, **inputs)
    y.sum().backward()
    assert calls == ["forward", "backward"] and backend_for("cpu") == "triton"
    with torch.no_grad():
        native = torch.ops.feddpa.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None,
                                              torch.randn(2, 8), torch.randn(4, 2),
                                              torch.ones(1, 2))
    assert native.shape == (2, 4)
    script = ("import torch\nfrom feddpa_fast.kernels import backend_for, triton_op\n"
              "with triton_op.serving('cpu'):\n    assert backend_for('cpu') == 'triton'\n"
              "assert backend_for('cpu') == 'native'\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape,k,n,r,row_scale,bias", CASES)
def test_outputs_and_gradients_match_reference(dtype, m_shape, k, n, r, row_scale, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale)
    assert_close_to_reference(triton_backend, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_three_d_and_row_strided_input(dtype):
    inputs = make_inputs((2, 9), 48, 40, 8, dtype)
    wide = torch.randn(2, 9, 80, dtype=dtype)
    wide[..., :48] = inputs["x"]
    inputs["x"] = wide[..., :48]  # rows strided by 80: read in place
    assert inputs["x"].stride(-1) == 1 and not inputs["x"].is_contiguous()
    assert_close_to_reference(triton_backend, inputs)


# The C++ autograd kernel's needs-input-grad mask, with and without bias (its slots shift).
@pytest.mark.parametrize("wanted", [("lora_a", "lora_b"), ("x",), ("scale",), ("x", "bias")])
@pytest.mark.parametrize("bias", [True, False])
def test_only_requested_gradients(wanted, bias):
    inputs = make_inputs((5,), 48, 40, 16, torch.float32, bias=bias)
    if not bias:
        wanted = tuple(w for w in wanted if w != "bias")
    assert_close_to_reference(triton_backend, inputs, wanted=wanted)


def _reference(inputs):
    from feddpa_fast.kernels import reference
    return reference.lora_linear_forward(
        **{k: (v.double() if v is not None else None) for k, v in inputs.items()})


@pytest.mark.parametrize("split", [2, 3, 4, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_scale,bias", [(False, True), (True, False)])
def test_split_k_decode_forward_one_launch(split, dtype, row_scale, bias):
    """The decode kernel reduces its K slices inside the launch (last program to arrive); 5 K
    blocks over the slices, so slices differ in length (one is empty at split 4)."""
    from feddpa_fast.kernels import triton_decode
    from feddpa_fast.kernels.triton_config import FwdConfig
    inputs = make_inputs((3,), 80, 96, 16, dtype, row_scale=row_scale, bias=bias)
    cfg = FwdConfig(16, 32, 16, 16, num_warps=4, num_stages=1)
    y, u = triton_decode.forward(inputs["x"], inputs["weight"], inputs["bias"],
                                 inputs["lora_a"], inputs["lora_b"], inputs["scale"], cfg=cfg,
                                 split=split)
    y_ref, u_ref = _reference(inputs)
    assert y.dtype == dtype and u.dtype == torch.float32
    assert_close_scaled(y, y_ref, dtype, "split-K output")
    assert_close_scaled(u, u_ref, dtype, "split-K u")
    # The arrival counters are left zeroed for the next launch.
    assert int(triton_decode._counters(y.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_runs_of_column_tiles(chunks, dtype):
    """Each program computes u once for a run of column tiles: 5 column tiles split into
    1, 2, 3 or 5 runs give the same y and u as the reference."""
    from feddpa_fast.kernels import triton_forward
    from feddpa_fast.kernels.triton_config import FwdConfig
    inputs = make_inputs((67,), 48, 80, 16, dtype)
    x2, w, a, b = inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    y = torch.full((67, 80), float("nan"), dtype=dtype)  # poisoned: every element must be written
    u = torch.full((67, 16), float("nan"))
    cfg = FwdConfig(32, 16, 16, 16, num_warps=4, num_stages=1)
    launch = triton_forward.forward_plan(x2, w, inputs["bias"], a, b, inputs["scale"], y, u,
                                         use_tma=False, cfg=cfg, sms=4, chunks=chunks)
    assert launch.grid == (3 * chunks,)
    launch.run()
    y_ref, u_ref = _reference(inputs)
    assert_close_scaled(y, y_ref, dtype, "chunked output")
    assert_close_scaled(u, u_ref, dtype, "chunked u")


def test_forward_tensor_descriptor_path():
    """USE_TMA (tensor descriptors; on GPU: sm_90+, 16-bit) in the interpreter, fp16, with
    M, N, K and R not multiples of the tiles: the descriptors zero-fill out of bounds."""
    import triton

    from feddpa_fast.kernels import triton_forward
    from feddpa_fast.kernels.triton_config import FwdConfig
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    inputs = make_inputs((37,), 72, 50, 8, torch.float16)
    x2, w, a, b = inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    y = torch.full((37, 50), float("nan"), dtype=torch.float16)
    u = torch.full((37, 8), float("nan"))
    cfg = FwdConfig(32, 16, 16, 16, num_warps=4, num_stages=1)
    triton_forward.forward_plan(x2, w, inputs["bias"], a, b, inputs["scale"], y, u,
                                use_tma=True, cfg=cfg, sms=4, chunks=2).run()
    y_ref, u_ref = _reference(inputs)
    assert_close_scaled(y, y_ref, torch.float16, "TMA output")
    assert_close_scaled(u, u_ref, torch.float16, "TMA u")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_measured_alternatives_match_reference(dtype):
    """The per-tile schedule and the two-launch split (bench/op_gpu.py) compute the op too."""
    from feddpa_fast.kernels import triton_forward_pertile, triton_split
    inputs = make_inputs((67,), 80, 96, 16, dtype)
    y_ref, u_ref = _reference(inputs)
    y, u = triton_forward_pertile.forward(**inputs)
    assert_close_scaled(y, y_ref, dtype, "per-tile y")
    assert_close_scaled(u, u_ref, dtype, "per-tile u")
    y, u = triton_split.forward(**inputs)
    assert_close_scaled(y, y_ref, dtype, "split y")
    assert_close_scaled(u, u_ref, dtype, "split u")


def test_rank_padding():
    assert [padded_rank(r) for r in (1, 8, 16, 17, 48, 64)] == [16, 16, 16, 32, 64, 64]


def test_cuda_kernels_register_without_a_gpu():
    from feddpa_fast.kernels import triton_op
    triton_op.register_cuda_kernels()
    for name in ("lora_linear", "lora_linear_fwd", "lora_linear_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"feddpa::{name}", "CUDA")


def test_bad_input_is_checked_before_any_launch():
    inputs = make_inputs((4,), 48, 40, 8, torch.float32)
    inputs["lora_b"] = torch.randn(40, 7)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_linear(**inputs, backend="triton")
    inputs = make_inputs((4,), 48, 40, 8, torch.float32)
    inputs["lora_a"] = inputs["lora_a"].half()
    with pytest.raises(TypeError, match="lora_a has dtype"):
        lora_linear(**inputs, backend="triton")


def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch, pytest\n"
        "from feddpa_fast.kernels import lora_linear\n"
        "x = torch.randn(2, 16); w = torch.randn(8, 16); a = torch.randn(4, 16)\n"
        "b = torch.randn(8, 4); s = torch.ones(1, 4)\n"
        "try:\n"
        "    lora_linear(x, w, None, a, b, s, backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "ValueError: backend 'triton' cannot run on cpu" in out.stdout, out.stderr


@pytest.mark.parametrize("name", ["pertile", "split"])
def test_measured_alternatives_gradients(name):
    """The alternatives run under the op's autograd with the regular Triton backward (the
    benchmark's fwd+bwd rows): ``serving(..., forward=)`` swaps the forward alone."""
    inputs = make_inputs((67,), 48, 40, 16, torch.float32)
    with triton_op.serving("cpu", forward=triton_op.alternative_forward(name)):
        assert_close_to_reference(triton_backend, inputs)
