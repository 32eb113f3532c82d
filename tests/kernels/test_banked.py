"""lora_linear_banked: rows of one call use different adapters of a bank.

The oracle is the plain op run once per client (a distinct index tuple) on that client's rows
alone, with its adapters stacked as lora_linear expects: a batched call must equal it, forward
and every gradient, with and without in-op dropout."""
import pytest
import torch

from feddpa_fast.kernels import lora_linear, lora_linear_banked

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _bank(s=5, k=24, n=20, r=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(s, r, k, generator=gen) / k ** 0.5).to(dtype)
    b = (torch.randn(s, n, r, generator=gen) / r ** 0.5).to(dtype)
    return a.requires_grad_(), b.requires_grad_()


def _inputs(index, k=24, n=20, r=4, dtype=torch.float32, per_row_scale=True):
    gen = torch.Generator().manual_seed(1)
    m, branches = index.shape
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = m if per_row_scale else 1
    scale = torch.rand(rows, branches * r, generator=gen, dtype=acc).requires_grad_()
    return x, weight, bias, scale


# Serving: adapter 0 is the shared global, 1..4 four clients' locals; rows interleaved.
SERVING = torch.tensor([[0, 1], [0, 3], [0, 1], [0, 2], [0, 4], [0, 3], [0, 2], [0, 1],
                        [0, 4], [0, 2], [0, 3]])
# Simulation: one global copy per client (client A: adapters 0 and 1; client B: 2 and 3).
SIMULATION = torch.tensor([[2, 3], [0, 1], [0, 1], [2, 3], [0, 1], [2, 3]])


def _per_client(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0, seeds=None):
    """y from one plain lora_linear call per client, in the batch's row order."""
    out = [None] * index.shape[0]
    for key in {tuple(t) for t in index.tolist()}:
        rows = [m for m, t in enumerate(index.tolist()) if tuple(t) == key]
        a = torch.cat([bank_a[s] for s in key], 0)
        b = torch.cat([bank_b[s] for s in key], 1)
        s_rows = scale if scale.shape[0] == 1 else scale[rows]
        seed = None if seeds is None else seeds[key[-1]]
        y = lora_linear(x[rows], weight, bias, a, b, s_rows, dropout_p=dropout_p,
                        dropout_seed=seed)
        for i, m in enumerate(rows):
            out[m] = y[i]
    return torch.stack(out)


def _grads(y, tensors, seed=3):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    return torch.autograd.grad(y, tensors, dy)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index", [SERVING, SIMULATION], ids=["serving", "simulation"])
def test_batched_call_equals_each_client_alone(backend, dtype, index):
    _check_against_each_client(_bank(dtype=dtype), index, dtype, backend)


def _check_against_each_client(bank, index, dtype, backend):
    """The op's y and gradients (x, bias, both banks, scale) equal one plain call per client."""
    bank_a, bank_b = bank
    x, weight, bias, scale = _inputs(index, dtype=dtype)
    y = lora_linear_banked(x, weight, bias, bank_a, bank_b, index, scale, backend=backend)
    expected = _per_client(x, weight, bias, bank_a, bank_b, index, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)
    tensors = (x, bias, bank_a, bank_b, scale)
    for got, want in zip(_grads(y, tensors), _grads(expected, tensors)):
        torch.testing.assert_close(got, want, atol=tol * 4, rtol=tol * 4)


# 36 clients of rank 4 with one shared global: 37 adapters x 4 = 148 columns, past the dense
# form's 128 (kernels/cpu/banked_cpu.cpp), so the native kernels run the segment form.
MANY = torch.stack([torch.zeros(72, dtype=torch.int64), torch.arange(72) % 36 + 1], 1)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_clients_segment_form_equals_each_client_alone(backend, dtype):
    # (bf16: the oracle sums the shared global's gradient over 36 calls in bf16; the op sums in
    # fp32 and rounds once, so they differ by the oracle's own rounding.)
    index = MANY[torch.randperm(72, generator=torch.Generator().manual_seed(0))]
    _check_against_each_client(_bank(s=37, dtype=dtype), index, dtype, backend)


def test_adapters_no_row_uses_get_zero_gradient():
    bank_a, bank_b = _bank(s=6)
    index = SERVING  # adapter 5 unused
    x, weight, bias, scale = _inputs(index)
    y = lora_linear_banked(x, weight, bias, bank_a, bank_b, index, scale)
    da, db = _grads(y, (bank_a, bank_b))
    assert da[5].abs().max() == 0 and db[5].abs().max() == 0
    assert da[:5].abs().amax(dim=(1, 2)).min() > 0 and db[:5].abs().amax(dim=(1, 2)).min() > 0


def test_shared_scale_row_and_one_client_match_the_plain_op():
    bank_a, bank_b = _bank()
    index = torch.tensor([[0, 2]] * 7)
    x, weight, bias, scale = _inputs(index, per_row_scale=False)
    y = lora_linear_banked(x, weight, bias, bank_a, bank_b, index, scale)
    expected = lora_linear(x, weight, bias, torch.cat([bank_a[0], bank_a[2]]),
                           torch.cat([bank_b[0], bank_b[2]], 1), scale)
    torch.testing.assert_close(y, expected)
    tensors = (x, bank_a, bank_b, scale)
    for got, want in zip(_grads(y, tensors), _grads(expected, tensors)):
        torch.testing.assert_close(got, want)


def test_leading_dims_and_three_branches():
    bank_a, bank_b = _bank(s=4)
    index = torch.tensor([[0, 1, 3], [0, 2, 3], [0, 1, 3], [0, 2, 3], [0, 2, 3], [0, 1, 3]])
    x, weight, bias, scale = _inputs(index)
    y = lora_linear_banked(x.reshape(2, 3, -1), weight, bias, bank_a, bank_b, index, scale)
    expected = _per_client(x, weight, bias, bank_a, bank_b, index, scale)
    torch.testing.assert_close(y.reshape(6, -1), expected)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_dropout_gives_each_client_its_own_stream(backend):
    """A batched step under in-op dropout equals each client's step alone with its seed."""
    bank_a, bank_b = _bank()
    x, weight, bias, scale = _inputs(SERVING)
    seeds = [11, 12, 13, 14, 15]
    y = lora_linear_banked(x, weight, bias, bank_a, bank_b, SERVING, scale, dropout_p=0.3,
                           dropout_seed=seeds, backend=backend)
    expected = _per_client(x, weight, bias, bank_a, bank_b, SERVING, scale, 0.3, seeds)
    torch.testing.assert_close(y, expected)
    plain = lora_linear_banked(x, weight, bias, bank_a, bank_b, SERVING, scale)
    assert (y - plain).abs().max() > 1e-3  # the mask did something
    tensors = (x, bank_a, bank_b, scale)
    for got, want in zip(_grads(y, tensors), _grads(expected, tensors)):
        torch.testing.assert_close(got, want)


def test_compiles_without_graph_breaks():
    bank_a, bank_b = _bank()
    x, weight, bias, scale = _inputs(SERVING)

    def f(x, bank_a, bank_b, scale):
        return lora_linear_banked(x, weight, bias, bank_a, bank_b, SERVING, scale).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, bank_a, bank_b, scale), (x, bank_a, scale))
    want = torch.autograd.grad(f(x, bank_a, bank_b, scale), (x, bank_a, scale))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _call(**overrides):
    bank_a, bank_b = _bank()
    x, weight, bias, scale = _inputs(SERVING)
    args = dict(x=x, weight=weight, bias=bias, bank_a=bank_a, bank_b=bank_b, index=SERVING,
                scale=scale)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in ("dropout_p", "dropout_seed", "backend") if k in args}
    return lora_linear_banked(*args.values(), **kwargs)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("overrides, error, words", [
    (dict(index=SERVING.clone().index_fill_(0, torch.tensor([3]), 5)), ValueError,
     "index holds 5 but the bank holds 5"),
    (dict(index=SERVING.clone().index_fill_(0, torch.tensor([0]), -1)), ValueError,
     "every row needs an adapter"),
    (dict(index=SERVING.int()), TypeError, "index must be int64"),
    (dict(index=SERVING[:4]), ValueError, "index has 4 rows but x has M = 11"),
    (dict(bank_b=torch.zeros(4, 20, 4)), ValueError, "bank_a holds 5 adapters but bank_b holds 4"),
    (dict(bank_b=torch.zeros(5, 20, 3)), ValueError, "rank mismatch"),
    (dict(bank_a=torch.zeros(5, 4, 23)), ValueError, "bank_a has K = 23"),
    (dict(bank_a=torch.zeros(5, 4, 24, dtype=torch.float64)), TypeError, "bank_a / bank_b"),
    (dict(scale=torch.zeros(11, 4)), ValueError, "scale must have shape (M, branches * r)"),
    (dict(dropout_p=0.1), ValueError, "needs dropout_seed"),
    (dict(dropout_p=0.1, dropout_seed=[1, 2]), ValueError, "dropout_seed must have shape (S,)"),
])
def test_bad_input_raises_naming_the_argument(backend, overrides, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        _call(backend=backend, **overrides)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_dropout_refuses_two_clients_sharing_a_stream(backend):
    index = torch.tensor([[0, 1], [2, 1], [0, 1]])
    bank_a, bank_b = _bank()
    x, weight, bias, scale = _inputs(index)
    with pytest.raises(ValueError, match="one client, one dropout stream"):
        lora_linear_banked(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.1,
                           dropout_seed=[1, 2, 3, 4, 5], backend=backend)


def test_triton_backend_on_cpu_tensors_needs_the_interpreter_serving_them():
    # (Its kernels: tests/kernels/test_banked_triton.py, under triton_op.serving("cpu").)
    with pytest.raises(ValueError, match="triton.*cpu"):
        _call(backend="triton")
