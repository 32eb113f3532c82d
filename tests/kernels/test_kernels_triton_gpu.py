"""The Triton backend on a real GPU, through the default dispatch (torch.ops.feddpa.* -> the
CUDA kernels registered by feddpa_fast.kernels), against the float64 reference. Skipped only
when CUDA is absent.

Order matters on a lent GPU (docs/gpu.md, make gpu-check): the checks only a GPU can make
(the one-launch decode's cross-program reduction, CUDA graph replay, TMA, the autotuner) come
first, the big parametrised reference matrix (bf16 / fp16 / fp32 x every shape, most of the
~200 compiles) last, so a time limit cuts the matrix, not them."""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from op_cases import assert_close_to_reference, make_inputs  # noqa: E402

from feddpa_fast.kernels import backend_for, lora_linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_launches import GPU_TEST_SHAPES as SHAPES  # noqa: E402


def on_gpu(**kw):
    return lora_linear(**kw)


def test_cuda_dispatches_to_triton():
    assert backend_for("cuda") == "triton"


# The paths the schedule and the autotuner open, each against the float64 reference in bf16
# (the GPU check runs these; on CPU the interpreter tests cover the same code in fp32/fp16).
def _ref(inputs):
    from feddpa_fast.kernels import reference
    return reference.lora_linear_forward(
        **{k: (v.double() if v is not None else None) for k, v in inputs.items()})


@pytest.mark.parametrize("split", [2, 4, 7])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_decode_one_launch_reduction_on_gpu(split, m):
    """The last-arriving program reduces the K slices: right, identical on every run (the
    slices are summed in order, whoever arrives last), and the counters are left zeroed."""
    from op_cases import assert_close_scaled

    from feddpa_fast.kernels import triton_decode
    from feddpa_fast.kernels.triton_config import decode_default
    inputs = make_inputs((m,), 4096, 4096, 32, torch.bfloat16, device="cuda")
    cfg = decode_default("sm_90a", m, 32, True, torch.bfloat16)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"],
            inputs["scale"])
    y, u = triton_decode.forward(*args, cfg=cfg, split=split)
    y_ref, u_ref = _ref(inputs)
    assert_close_scaled(y, y_ref, torch.bfloat16, "decode y")
    assert_close_scaled(u, u_ref, torch.bfloat16, "decode u")
    for _ in range(5):
        y2, u2 = triton_decode.forward(*args, cfg=cfg, split=split)
        assert torch.equal(y, y2) and torch.equal(u, u2)
    torch.cuda.synchronize()
    assert int(triton_decode._counters(y.device, 1).abs().sum()) == 0


def test_decode_under_cuda_graph_replay():
    """Self-resetting counters: a captured decode call replays correctly, again and again."""
    inputs = make_inputs((1,), 4096, 11008, 32, torch.bfloat16, device="cuda")
    args = [inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scale")]
    eager = lora_linear(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lora_linear(*args)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("use_tma", [False, True])
def test_forward_runs_and_tma_on_gpu(chunks, use_tma):
    from op_cases import assert_close_scaled

    from feddpa_fast.kernels import triton_forward, triton_launch
    from feddpa_fast.kernels.triton_config import arch_of, fwd_default
    if use_tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90+")
    inputs = make_inputs((1000,), 4096, 4096, 32, torch.bfloat16, device="cuda")
    x2, w, a, b = inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    y = torch.full((1000, 4096), float("nan"), dtype=torch.bfloat16, device="cuda")
    u = torch.full((1000, 32), float("nan"), device="cuda")
    cfg = fwd_default(arch_of(x2.device), 4096, 32, True, torch.bfloat16, use_tma)
    if use_tma:
        triton_launch.set_tma_allocator()
    triton_forward.forward_plan(x2, w, inputs["bias"], a, b, inputs["scale"], y, u,
                                use_tma=use_tma, cfg=cfg, sms=132, chunks=chunks).run()
    y_ref, u_ref = _ref(inputs)
    assert_close_scaled(y, y_ref, torch.bfloat16, "chunked y")
    assert_close_scaled(u, u_ref, torch.bfloat16, "chunked u")


@pytest.mark.parametrize("m", [2048, 16])
def test_autotuned_and_fixed_configs_agree(monkeypatch, m):
    """Prefill and decode through the autotuner (pruned by the static compile) agree with the
    fixed configs."""
    inputs = make_inputs((m,), 4096, 4096, 32, torch.bfloat16, device="cuda")
    args = [inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scale")]
    monkeypatch.setenv("FEDDPA_FAST_AUTOTUNE", "1")
    tuned = lora_linear(*args)
    monkeypatch.setenv("FEDDPA_FAST_AUTOTUNE", "0")
    fixed = lora_linear(*args)
    torch.testing.assert_close(tuned.float(), fixed.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["pertile", "split"])
def test_measured_alternatives_on_gpu(name):
    from feddpa_fast.kernels import triton_op
    inputs = make_inputs((512,), 1024, 2048, 32, torch.bfloat16, device="cuda")
    with triton_op.serving("cuda", forward=triton_op.alternative_forward(name)):
        assert_close_to_reference(on_gpu, inputs, wanted=("x", "lora_a", "lora_b"))


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


# The banked op (many clients' adapters in one call): its Triton kernels against the float64
# reference_banked, at the shapes the static gate compiles (bench/gpu_launches_banked.py).
from gpu_launches_banked import BANKED_GPU_TEST_PROBLEMS  # noqa: E402

_BANK_GRADS = ("x", "bias", "bank_a", "bank_b", "scale")


def _banked_check(m, k, n, r, branches, clients, dtype, dropout_p=0.0):
    from op_cases import assert_close_scaled

    from feddpa_fast.kernels import lora_linear_banked, reference_banked
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=gen,  # noqa: E731
                                                dtype=torch.float64) * std).cuda()
    local = 1 + torch.randint(clients, (m, 1), generator=gen)
    index = torch.cat([torch.zeros(m, branches - 1, dtype=torch.int64), local], 1).cuda()
    s = clients + 1
    inputs = dict(x=rand(m, k), weight=rand(n, k, std=k ** -0.5), bias=rand(n, std=0.5),
                  bank_a=rand(s, r, k, std=k ** -0.5), bank_b=rand(s, n, r, std=r ** -0.5),
                  scale=rand(m, branches * r).abs().float(), index=index,
                  dropout_p=dropout_p,
                  dropout_seed=torch.arange(s, dtype=torch.int64).cuda() * 7919 + 3)
    dy = rand(m, n)

    def run(fn, cast):
        call = {name: (cast(v).detach().requires_grad_(True) if name in _BANK_GRADS else
                       cast(v) if torch.is_tensor(v) and v.is_floating_point() else v)
                for name, v in inputs.items()}
        y = fn(**call)
        return y, torch.autograd.grad(y, [call[g] for g in _BANK_GRADS], cast(dy))

    torch.backends.cuda.matmul.allow_tf32 = False
    y, grads = run(lora_linear_banked,
                   lambda v: v.float() if v.dtype == torch.float32 else v.to(dtype))
    y_ref, grads_ref = run(reference_banked.lora_linear_banked, lambda v: v.double())
    assert_close_scaled(y, y_ref, dtype, "banked output")
    for name, got, want in zip(_BANK_GRADS, grads, grads_ref):
        assert_close_scaled(got, want, dtype, f"banked gradient of {name}")


def test_banked_op_runs_the_triton_kernels_on_cuda(monkeypatch):
    from feddpa_fast.kernels import triton_banked_passes
    calls = []
    for name in ("forward", "backward"):
        real = getattr(triton_banked_passes, name)
        monkeypatch.setattr(triton_banked_passes, name, lambda *a, real=real, name=name, **kw:
                            calls.append(name) or real(*a, **kw))
    _banked_check(*BANKED_GPU_TEST_PROBLEMS[0], torch.bfloat16)
    assert calls == ["forward", "backward"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("problem", BANKED_GPU_TEST_PROBLEMS)
def test_banked_outputs_and_gradients_match_reference(problem, dtype):
    _banked_check(*problem, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("problem", BANKED_GPU_TEST_PROBLEMS[1:3])
def test_banked_in_op_dropout_matches_the_reference_with_the_cpu_mask(problem, dtype):
    _banked_check(*problem, dtype, dropout_p=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape,k,n,r", SHAPES)
@pytest.mark.parametrize("row_scale,bias", [(True, True), (False, False)])
def test_outputs_and_gradients_match_reference(dtype, m_shape, k, n, r, row_scale, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 compared at ieee precision
    assert_close_to_reference(on_gpu, inputs)


@pytest.mark.parametrize("wanted", [("x",), ("lora_a", "scale"), ("bias",)])
def test_only_requested_gradients(wanted):
    inputs = make_inputs((2, 33), 256, 320, 16, torch.float16, device="cuda")
    assert_close_to_reference(on_gpu, inputs, wanted=wanted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_shape,k,n,r", [SHAPES[0], SHAPES[2], SHAPES[6], SHAPES[7], SHAPES[8]])
def test_in_op_dropout_matches_the_reference_with_the_cpu_mask(dtype, m_shape, k, n, r):
    # The reference materialises the mask on the CPU: agreement means the GPU kernels
    # generated the same Philox mask (docs/ARCHITECTURE.md, LoRA dropout).
    inputs = make_inputs(m_shape, k, n, r, dtype, device="cuda", dropout=0.05)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_close_to_reference(on_gpu, inputs)
