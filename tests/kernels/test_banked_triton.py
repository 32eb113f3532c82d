"""The banked op's Triton kernels (kernels/triton_banked*.py) in Triton's CPU interpreter, through
the op's one C++ autograd (``triton_op.serving("cpu")``), against kernels/reference_banked.py in
float64: the output and every gradient (x, bias, bank_a, bank_b, scale). fp32 and fp16 (the
interpreter's bf16 dot is wrong: bf16 runs the documented upcast path once); the interpreter's
fixed 16-row blocks, so that segments span several blocks. In-op dropout against the native
CPU kernels: the same Philox mask, per client."""
import pytest
import torch

pytest.importorskip("triton")

from op_cases import assert_close_scaled  # noqa: E402

from feddpa_fast.kernels import lora_linear_banked, reference_banked, triton_op  # noqa: E402
from feddpa_fast.kernels.triton_config import interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests: CPU only")

GRADS = ("x", "bias", "bank_a", "bank_b", "scale")


def _rows(pairs, seed=0):
    """An (M, B) index from a list of tuples, its rows shuffled (rows arrive unsorted)."""
    index = torch.tensor(pairs, dtype=torch.int64)
    return index[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))]


# Serving: adapter 0 the shared global, 1..4 the clients' locals; 40 rows of client 2 make
# three 16-row blocks of one segment.
SERVING = _rows([[0, 1]] * 5 + [[0, 2]] * 40 + [[0, 3]] * 13 + [[0, 4]] * 9)
# Simulation: each client its own global copy (clients (0, 1), (2, 3), (4, 5)).
SIMULATION = _rows([[0, 1]] * 7 + [[2, 3]] * 20 + [[4, 5]] * 3, seed=1)
# Decode: one or two rows per client.
DECODE = _rows([[0, 1], [0, 2], [0, 2], [0, 3], [0, 4], [0, 5], [0, 5]], seed=2)


def _inputs(index, adapters, k=40, n=48, r=8, dtype=torch.float32, *, row_scale=True,
            bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    m, branches = index.shape
    return dict(x=rand(m, k), weight=rand(n, k, std=k ** -0.5),
                bias=rand(n, std=0.5) if bias else None,
                bank_a=rand(adapters, r, k, std=k ** -0.5),
                bank_b=rand(adapters, n, r, std=r ** -0.5), index=index,
                scale=torch.rand(m if row_scale else 1, branches * r, generator=gen))


def _run(fn, inputs, dy, wanted, **kw):
    call = {k: (v.detach().clone().requires_grad_(True) if k in wanted and v is not None else v)
            for k, v in inputs.items()}
    y = fn(**call, **kw)
    leaves = [call[k] for k in wanted if call[k] is not None]
    return y, torch.autograd.grad(y, leaves, dy)


def _triton(**kw):
    return lora_linear_banked(**kw, backend="triton")


def _run_triton(inputs, dy, wanted, **kw):
    """Forward and backward inside one ``serving`` block: the backward must run there too."""
    with triton_op.serving("cpu"):
        return _run(_triton, inputs, dy, wanted, **kw)


def _check(inputs, wanted=GRADS, dropout_p=0.0, seeds=None, x_shape=None):
    """Output and every gradient in ``wanted`` against the float64 reference."""
    dtype = inputs["x"].dtype
    wanted = tuple(w for w in wanted if inputs[w] is not None)
    if x_shape is not None:
        inputs = dict(inputs, x=inputs["x"].reshape(*x_shape, -1))
    n = inputs["weight"].shape[0]
    dy = torch.randn(*inputs["x"].shape[:-1], n, generator=torch.Generator().manual_seed(9),
                     dtype=torch.float64)
    kw = dict(dropout_p=dropout_p, dropout_seed=seeds)
    y, grads = _run_triton(inputs, dy.to(dtype), wanted, **kw)
    as64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in inputs.items()}
    y_ref, grads_ref = _run(reference_banked.lora_linear_banked, as64, dy, wanted, **kw)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close_scaled(y, y_ref, dtype, "output")
    for name, got, want in zip(wanted, grads, grads_ref):
        assert got.dtype == inputs[name].dtype, name
        assert_close_scaled(got, want, dtype, f"gradient of {name}")
    return grads


def test_interpreter_is_on():
    assert interpreting()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index,adapters", [(SERVING, 5), (SIMULATION, 6), (DECODE, 6)],
                         ids=["serving", "simulation", "decode"])
def test_outputs_and_gradients_match_reference(dtype, index, adapters):
    _check(_inputs(index, adapters, dtype=dtype))


def test_bf16_through_the_upcast_path():
    _check(_inputs(DECODE, 6, dtype=torch.bfloat16))


@pytest.mark.parametrize("r,row_scale,bias", [(16, False, False), (24, True, True)])
def test_ranks_shared_scale_and_no_bias(r, row_scale, bias):
    """J = 2 r stacked columns: 32, and 48 padded to 64; a (1, B r) scale; no bias."""
    _check(_inputs(SIMULATION, 6, k=33, n=29, r=r, row_scale=row_scale, bias=bias))


def test_three_branches_strided_index_and_leading_dims():
    wide = torch.zeros(30, 6, dtype=torch.int64)
    wide[:, ::2] = _rows([[0, 1, 3]] * 18 + [[0, 2, 4]] * 12, seed=3)
    index = wide[:, ::2]
    assert not index.is_contiguous()
    _check(_inputs(index, 5), x_shape=(5, 6))


def test_one_row():
    _check(_inputs(torch.tensor([[0, 3]]), 4))


@pytest.mark.parametrize("wanted", [("x",), ("bank_a", "bank_b"), ("bank_a",), ("scale",)])
def test_only_requested_gradients(wanted):
    """The backward's modes: dx without bank gradients, bank gradients without dx (no dx
    term in the expand), d bank_a alone, d scale alone."""
    _check(_inputs(DECODE, 6, k=24, n=20), wanted=wanted)


def test_adapters_no_row_uses_get_zero_gradient():
    grads = _check(_inputs(DECODE, 8), wanted=("bank_a", "bank_b"))
    for grad in grads:
        assert grad[6:].abs().max() == 0 and grad[:6].abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_op_dropout_matches_the_reference_with_the_cpu_mask(dtype):
    """Each client's segment (three 16-row blocks for client 2) masked as a call of its own."""
    seeds = torch.tensor([11, 12, 13, 14, 15], dtype=torch.int64)
    _check(_inputs(SERVING, 5, dtype=dtype), dropout_p=0.3, seeds=seeds)


def test_in_op_dropout_equals_the_native_cpu_kernels():
    inputs = _inputs(SERVING, 5)
    seeds = torch.tensor([2 ** 40 + 7, -3, 5, 6, 8], dtype=torch.int64)
    dy = torch.randn(SERVING.shape[0], 48, generator=torch.Generator().manual_seed(4))
    kw = dict(dropout_p=0.3, dropout_seed=seeds)
    y, grads = _run_triton(inputs, dy, GRADS, **kw)
    y_native, grads_native = _run(lora_linear_banked, inputs, dy, GRADS, **kw)
    torch.testing.assert_close(y, y_native, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_native):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = lora_linear_banked(**inputs)
    assert (y - plain).abs().max() > 1e-2  # the mask did something


def test_the_triton_kernels_serve_the_banked_op(monkeypatch):
    """Forward and backward reach the Triton launchers through the C++ autograd kernel."""
    from feddpa_fast.kernels import triton_banked_passes
    calls = []
    for name in ("forward", "backward"):
        real = getattr(triton_banked_passes, name)
        monkeypatch.setattr(triton_banked_passes, name, lambda *a, real=real, name=name, **kw:
                            calls.append(name) or real(*a, **kw))
    _check(_inputs(DECODE, 6, k=24, n=20), wanted=("x",))
    assert calls == ["forward", "backward"]


def test_cuda_kernels_register_without_a_gpu():
    triton_op.register_cuda_kernels()
    for name in ("lora_linear_banked", "lora_linear_banked_fwd", "lora_linear_banked_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"feddpa::{name}", "CUDA")


def test_bad_input_still_raises_naming_the_argument():
    inputs = _inputs(DECODE, 6)
    shared = torch.tensor([[0, 1], [2, 1], [0, 1]])
    with triton_op.serving("cpu"):
        with pytest.raises(ValueError, match="index holds 6 but the bank holds 6"):
            _triton(**dict(inputs, index=DECODE.clone().fill_(6)))
        with pytest.raises(ValueError, match="rank mismatch"):
            _triton(**dict(inputs, bank_b=torch.zeros(6, 48, 7)))
        with pytest.raises(ValueError, match="one client, one dropout stream"):
            _triton(**dict(_inputs(shared, 3), dropout_p=0.1,
                           dropout_seed=torch.tensor([1, 2, 3])))


def test_triton_on_cpu_outside_serving_raises():
    with pytest.raises(ValueError, match="triton_op.serving"):
        lora_linear_banked(**_inputs(DECODE, 6), backend="triton")


def test_block_table_and_row_keys():
    import numpy as np

    from feddpa_fast.kernels.triton_banked_segments import bank_blocks, block_table, row_keys
    table = block_table(np.array([5, 40, 1]), np.array([0, 5, 45]), 16)
    assert table.tolist() == [[0, 5, 0], [5, 16, 0], [21, 16, 16], [37, 8, 32], [45, 1, 0]]
    blocks = bank_blocks(SERVING, 5, 16, dropout=True)
    assert blocks.segments == 4 and blocks.count == 1 + 3 + 1 + 1
    rows = SERVING[blocks.order.long()]
    assert torch.equal(rows[:5], torch.tensor([[0, 1]] * 5))  # grouped, call order kept:
    assert torch.equal(blocks.order[:5].long(), (SERVING[:, 1] == 1).nonzero().flatten())
    # S^B past 2^62: the keys come from torch.unique over the rows, equal for equal tuples.
    keys = row_keys(torch.tensor([[3, 1, 2], [0, 0, 1], [3, 1, 2]]), 2 ** 21)
    assert keys[0] == keys[2] != keys[1]
