"""A patched model inside the usual training machinery: Trainer, gradient checkpointing,
torch.compile and autocast (LoRA dropout: tests/kernels/test_dropout.py)."""
import pytest
import torch
from tiny_models import batch, build, output_of, randomize_lora_b

import feddpa_fast as fd


def _patched(kind="llama", dropout=0.0, seed=0, targets=None):
    model, default_targets = build(kind, seed)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=dropout,
                                      target_modules=targets or default_targets))
    randomize_lora_b(model)
    return model


def test_trainer_lowers_the_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _patched(targets="all-linear")
    # A learnable task: 4 distinct sequences, each repeated, so adapters can fit them.
    ids = batch("llama", size=4, seq=12)["input_ids"].repeat(4, 1)
    rows = [{"input_ids": i, "labels": i} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=16,
        learning_rate=3e-2, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    trainer.train()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    # The tiny random model learns slowly (PEFT shows the same curve), but steadily.
    assert after < before - 0.2, (before, after)
    # Only adapter parameters were handed to the optimizer.
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    inputs = batch("llama", size=2)
    weights = (torch.tensor([0.2, 0.9]), torch.tensor([0.8, 0.1]))
    grads = []
    for checkpointing in (False, True):
        model = _patched().train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if use_reentrant:  # frozen embeddings: reentrant checkpointing needs an input grad
                model.enable_input_require_grads()
        with fd.mix(model, *weights):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_torch_compile_fullgraph_on_a_patched_llama():
    model = _patched()
    inputs = batch("llama", size=2)
    weights = (torch.tensor([0.3, 1.0]), torch.tensor([0.7, 0.0]))
    with fd.mix(model, *weights):
        eager = output_of(model, inputs)
        eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with fd.mix(model, *weights):
        out = compiled(**inputs).logits
        out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_autocast_bf16_runs_the_op_in_bf16_with_fp32_adapters():
    model = _patched()
    inputs = batch("llama", size=2)
    with torch.no_grad(), fd.mix(model, 0.5, 0.5):
        ref = output_of(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16), fd.mix(model, 0.5, 0.5):
        out = output_of(model, inputs)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    # bf16 carries ~3 significant digits; the logits here are O(1).
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)
