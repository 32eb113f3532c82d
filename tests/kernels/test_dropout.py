"""In-op LoRA dropout: the Philox keep mask (its definition, statistics and determinism), the
op against the reference with the same mask, what autograd saves, the layer's seeds
(manual_seed, gradient checkpointing), PEFT in expectation, and bad arguments.

The Triton side runs under the interpreter in a subprocess (TRITON_INTERPRET must be set
before triton is imported): its kernels must generate the very same mask as the CPU."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from op_cases import assert_close_to_reference, make_inputs, run_with_grads
from tiny_models import build, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.kernels import lora_linear, reference
from feddpa_fast.layers import dual_lora_layers

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # op_cases lives there


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


# ---- the mask --------------------------------------------------------------------------


def numpy_philox(c0, c1, k0: int, k1: int):
    """Philox4x32-10 (Salmon et al.) of counters (c0, c1, 0, 0), written from the paper."""
    c0, c1 = c0.astype(np.uint64), c1.astype(np.uint64)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    low = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        shift = np.uint64(32)
        c0, c2 = (p1 >> shift) ^ c1 ^ np.uint64(k0), (p0 >> shift) ^ c3 ^ np.uint64(k1)
        c1, c3 = p1 & low, p0 & low
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


@pytest.mark.parametrize("rows,cols,p,seed", [(7, 70, 0.3, 123456789012345), (9, 33, 0.05, -5),
                                              (1, 1, 0.5, 0), (13, 129, 0.9, 2**62 + 17)])
def test_the_mask_is_the_documented_philox_stream(rows, cols, p, seed):
    keep = reference.dropout_keep(rows, cols, p, seed_of(seed))
    key = seed % 2**64
    m, k = np.meshgrid(np.arange(rows, dtype=np.uint32), np.arange(cols, dtype=np.uint32),
                       indexing="ij")
    words = numpy_philox(k, m >> np.uint32(2), key & 0xFFFFFFFF, key >> 32)
    word = np.choose(m & 3, words)
    expected = (word >> np.uint32(1)) >= np.uint32(int(p * 2**31))
    assert keep.dtype == torch.bool and keep.shape == (rows, cols)
    assert np.array_equal(keep.numpy(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["scalar", "avx2"])
def test_every_cpu_philox_path_gives_the_same_mask(path):
    code = ("import torch, feddpa_fast.kernels as k\n"
            "m = k.reference.dropout_keep(37, 301, 0.2, torch.tensor(99))\n"
            "print(''.join('1' if v else '0' for v in m.flatten().tolist()))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "FEDDPA_PHILOX_PATH": forced}, check=True).stdout
            for forced in (path, "")]
    assert outs[0] == outs[1] and len(outs[0].strip()) == 37 * 301


def test_the_mask_is_deterministic_and_depends_on_the_seed():
    a = reference.dropout_keep(64, 96, 0.5, seed_of(1))
    assert torch.equal(a, reference.dropout_keep(64, 96, 0.5, seed_of(1)))
    assert not torch.equal(a, reference.dropout_keep(64, 96, 0.5, seed_of(2)))
    # The mask of an (M, K) input is a prefix of the mask of a taller one: rows are counters.
    assert torch.equal(a[:10], reference.dropout_keep(10, 96, 0.5, seed_of(1)))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_rate_is_within_a_binomial_bound(p):
    keep = reference.dropout_keep(512, 1024, p, seed_of(7))
    n = keep.numel()
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, 1 - p, sigma)


def test_no_correlation_between_rows_or_columns():
    keep = reference.dropout_keep(512, 512, 0.5, seed_of(11)).double()
    z = keep - keep.mean()
    bound = 5 / math.sqrt(keep.numel())  # |corr| of independent bits, 5 sigma

    def corr(a, b):
        return ((a * b).mean() / (a.std() * b.std())).item()
    # Neighbours in a row, in a column, rows that share a Philox counter (m, m + 1 within a
    # group of four) and rows in different groups.
    assert abs(corr(z[:, :-1], z[:, 1:])) < bound
    assert abs(corr(z[:-1], z[1:])) < bound
    assert abs(corr(z[0::4], z[1::4])) < 2 * bound
    assert abs(corr(z[:-4], z[4:])) < bound
    # Row and column means do not drift: the spread of row keep rates is binomial.
    row_rates = keep.mean(1)
    assert row_rates.std().item() < 1.5 * math.sqrt(0.25 / 512)


# ---- the op ------------------------------------------------------------------------------

CASES = [((67,), 80, 96, 16, True, True), ((2, 9), 48, 40, 8, False, True),
         ((3,), 70, 29, 6, True, False), ((1,), 33, 17, 4, False, False)]


@pytest.mark.parametrize("m_shape,k,n,r,row_scale,bias", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_native_matches_the_reference_with_the_same_mask(m_shape, k, n, r, row_scale, bias,
                                                         dtype):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale, dropout=0.3)
    assert_close_to_reference(lora_linear, inputs)


def test_the_mask_reaches_the_output_and_both_input_gradient_terms():
    inputs = make_inputs((40,), 64, 48, 8, torch.float64, dropout=0.5)
    plain = {k: v for k, v in inputs.items() if not k.startswith("dropout")}
    dy = torch.randn(40, 48, dtype=torch.float64)
    y, grads = run_with_grads(lora_linear, inputs, dy)
    y0, grads0 = run_with_grads(lora_linear, plain, dy)
    assert not torch.allclose(y, y0)
    assert not torch.allclose(grads["x"], grads0["x"])
    assert not torch.allclose(grads["lora_a"], grads0["lora_a"])
    # Dropped columns of a row get no gradient through the A branch: dx there is dy W alone.
    keep = reference.dropout_keep(40, 64, 0.5, inputs["dropout_seed"])
    base_dx = dy @ inputs["weight"]
    torch.testing.assert_close(grads["x"][~keep], base_dx[~keep])


def test_gradcheck_with_a_fixed_seed():
    inputs = make_inputs((6,), 12, 10, 4, torch.float64, dropout=0.25)
    names = ("x", "lora_a", "lora_b", "scale", "bias")

    def fn(*tensors):
        return lora_linear(**{**inputs, **dict(zip(names, tensors))})
    leaves = [inputs[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, leaves)


def test_only_x_and_a_one_element_seed_are_saved():
    """Autograd's saved tensors with in-op dropout equal those without it, plus 8 bytes."""
    def saved_bytes(inputs):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run_with_grads(lora_linear, inputs, torch.ones(256, 128))
        return sum(sizes)
    inputs = make_inputs((256,), 192, 128, 16, torch.float32, dropout=0.05)
    plain = {k: v for k, v in inputs.items() if not k.startswith("dropout")}
    assert saved_bytes(inputs) == saved_bytes(plain) + 8


def test_fake_kernels_and_torch_compile_fullgraph():
    torch._dynamo.reset()
    inputs = make_inputs((2, 5), 24, 16, 8, torch.float32, dropout=0.2, row_scale=False)

    def fn(x, lora_a):
        return lora_linear(x, inputs["weight"], inputs["bias"], lora_a, inputs["lora_b"],
                           inputs["scale"], dropout_p=0.2, dropout_seed=inputs["dropout_seed"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (fn, compiled):
        x = inputs["x"].clone().requires_grad_()
        a = inputs["lora_a"].clone().requires_grad_()
        y = f(x, a)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, a.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dropout_p": -0.1, "dropout_seed": 1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"dropout_p": 1.0, "dropout_seed": 1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"dropout_p": float("nan"), "dropout_seed": 1}, ValueError, "dropout_p must be in"),
    ({"dropout_p": 0.1}, ValueError, "needs dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": torch.tensor([1.0])}, TypeError, "must be int64"),
    ({"dropout_p": 0.1, "dropout_seed": torch.tensor([1, 2])}, ValueError, "one element"),
    ({"dropout_p": 0.1, "dropout_seed": "7"}, TypeError, "int or an int64 tensor"),
])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_dropout_arguments_raise_typed_errors(kwargs, error, match, backend):
    inputs = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(error, match=match):
        lora_linear(**inputs, **kwargs, backend=backend)


# ---- the layer ---------------------------------------------------------------------------


def _patched(dropout=0.5, kind="llama"):
    model, targets = build(kind, 0)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
    randomize_lora_b(model)
    return model


def test_the_layer_draws_its_seed_from_torchs_generator_and_matches_the_reference():
    model = _patched().train()
    _, layer = dual_lora_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(123)
    with fd.mix(model, 0.6, 0.4):
        y = layer(x)
    torch.manual_seed(123)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)  # what the layer drew
    keep = reference.dropout_keep(10, layer.in_features, 0.5, seed).reshape(x.shape)
    x_drop = x * keep / 0.5
    expected = layer.base_layer(x)
    for adapter, w in (("global", 0.6), ("local", 0.4)):  # one mask for both adapters
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        expected = expected + w * layer.scaling[adapter] * (x_drop @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.lora_A["global"].weight], g)
    refs = torch.autograd.grad(expected, [x, layer.lora_A["global"].weight], g)
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # Reseeding reproduces the forward; a fresh draw differs; eval mode has no dropout.
    torch.manual_seed(123)
    with fd.mix(model, 0.6, 0.4):
        assert torch.equal(layer(x), y)
        assert not torch.equal(layer(x), y)
    model.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_mask(use_reentrant):
    from torch.utils.checkpoint import checkpoint
    model = _patched().train()
    _, layer = dual_lora_layers(model)[0]
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    params = [x, layer.lora_A["global"].weight, layer.lora_B["local"].weight]
    results = []
    for checkpointed in (False, True):
        for t in params:
            t.grad = None
        torch.manual_seed(5)
        y = (checkpoint(layer, x, use_reentrant=use_reentrant) if checkpointed else layer(x))
        torch.manual_seed(6)  # the recomputation must not read the generator's current state
        y.square().sum().backward()
        results.append((y.detach(), *[t.grad.clone() for t in params]))
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def test_a_patched_model_in_training_compiles_fullgraph_with_in_op_dropout():
    from tiny_models import batch, output_of
    model = _patched(dropout=0.2).train()
    inputs = batch("llama", size=2)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        model.zero_grad(set_to_none=True)
        torch.manual_seed(9)  # the seeds are drawn inside the graph, from the same generator
        with fd.mix(model, 0.4, 0.6):
            out = output_of(run, inputs)
            out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_fused_mean_over_seeds_approaches_peft_with_dropout():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 24))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"],
                          init_lora_weights=False)
    peft_model = peft.get_peft_model(base, cfg).train()
    ours = torch.nn.Sequential(torch.nn.Linear(32, 24))
    ours[0].load_state_dict(base[0].base_layer.state_dict())
    fd.patch(ours, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=["0"]))
    layer = ours[0]
    with torch.no_grad():  # our global adapter = PEFT's adapter, our local adapter off
        layer.lora_A["global"].weight.copy_(base[0].lora_A["default"].weight)
        layer.lora_B["global"].weight.copy_(base[0].lora_B["default"].weight)
    layer.train()
    x = torch.randn(6, 32)
    draws = 2000
    with torch.no_grad(), fd.mix(ours, 1.0, 0.0):
        fused = torch.stack([layer(x) for _ in range(draws)])
    with torch.no_grad():
        theirs = torch.stack([peft_model(x) for _ in range(draws)])
    stderr = (fused.var(0) / draws + theirs.var(0) / draws).sqrt()
    z = (fused.mean(0) - theirs.mean(0)).abs() / stderr
    assert z.max().item() < 5.0  # 144 outputs: 5 sigma is a bound no unbiased pair breaks
    assert fused.std(0).mean() > 0.01  # the draws did differ


# ---- Triton under the interpreter ----------------------------------------------------------

INTERPRETER_SCRIPT = r"""
import torch, triton, triton.language as tl
from feddpa_fast.kernels import lora_linear, reference, triton_op
from feddpa_fast.kernels.triton_dropout import keep_mask

@triton.jit
def store_mask(seed_ptr, out_ptr, M, K, threshold, BM: tl.constexpr, BK: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = keep_mask(tl.load(seed_ptr), offs_m, offs_k, threshold)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))

for seed in (3, -8, 2**61 + 5):
    s = torch.tensor([seed], dtype=torch.int64)
    out = torch.zeros(45, 70, dtype=torch.int8)
    store_mask[(3, 5)](s, out, 45, 70, int(0.3 * 2**31), BM=16, BK=16)
    assert torch.equal(out.bool(), reference.dropout_keep(45, 70, 0.3, s)), seed

import sys
sys.path.insert(0, sys.argv[1])
from op_cases import assert_close_to_reference, make_inputs
with triton_op.serving("cpu"):  # the op's CPU kernels are Triton's, under its one autograd
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m_shape, k, n, r in (((67,), 80, 96, 16), ((2, 9), 48, 40, 8), ((3,), 70, 29, 6)):
            inputs = make_inputs(m_shape, k, n, r, dtype, dropout=0.3)
            assert_close_to_reference(lambda **kw: lora_linear(**kw, backend="triton"), inputs)
print("ok")
"""


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter_generate_the_cpu_mask():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, TESTS], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

