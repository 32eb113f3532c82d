"""CausalLMTask with FedDPA's per-instance dynamic weights and beam search; the CLI's decoding
flags (--num-beams, --max-new-tokens) and --model smollm2's task check."""
from types import SimpleNamespace

import pytest
import torch
import transformers
from fed_fixtures import causal_lm_data_dir, tiny_llama_dir
from tiny_models import randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.fed.algorithms.feddpa_weighting import WeightingConfig, instance_weights
from feddpa_fast.fed.cli import build_parser, config_from_args
from feddpa_fast.fed.cli import main as cli_main
from feddpa_fast.fed.data import LMExample
from feddpa_fast.fed.run_config import RunConfig
from feddpa_fast.fed.runner import run
from feddpa_fast.fed.tasks import CausalLMTask


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("llama"))


def _task(path, num_beams, gather_answers=True):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0,
                                      target_modules=("q_proj", "v_proj")))
    randomize_lora_b(model, std=0.5)
    return CausalLMTask(model, tok, max_new_tokens=5, num_beams=num_beams,
                        gather_answers=gather_answers)


def _examples():
    words = ["cat", "river", "lamp", "stone"]
    return [LMExample(instruction=f"repeat the word {w}", input="" if i % 2 else "twice",
                    output=w, task="echo") for i, w in enumerate(words)]


def test_dynamic_weights_with_beam_search_equal_each_example_alone(llama_dir):
    task = _task(llama_dir, num_beams=2)
    examples = _examples()
    anchors = _examples()[:2]
    g, lw = instance_weights(task, examples, anchors, WeightingConfig(k=2))
    assert g.shape == (4,) and not torch.allclose(g, g[0].expand(4))  # really per instance
    batched = task.predict(examples, g, lw)  # left-padded prompts of different lengths
    for i, e in enumerate(examples):
        assert task.predict([e], float(g[i]), float(lw[i])) == [batched[i]], i
    # The mix reaches the generations: both adapters off decodes something else.
    assert task.predict(examples, 0.0, 0.0) != batched


def test_causal_lm_task_rejects_bad_decoding_options(llama_dir):
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    for bad in ({"num_beams": 0}, {"max_new_tokens": -1}, {"num_beams": True}):
        with pytest.raises(ValueError, match="must be a positive int"):
            CausalLMTask(torch.nn.Linear(1, 1), tok, **bad)


def test_cli_decoding_flags_reach_the_run_config():
    args = build_parser().parse_args(["train", "--task", "causal-lm", "--num-beams", "3",
                                      "--max-new-tokens", "12", "--model", "smollm2",
                                      "--data", "some/dir"])
    cfg = config_from_args(args)
    assert (cfg.num_beams, cfg.max_new_tokens, cfg.model) == (3, 12, "smollm2")
    assert cfg.identity()["num_beams"] == 3
    assert RunConfig().identity()["num_beams"] == 1  # recorded (checkpoint schema 2)


def test_cli_smollm2_needs_the_causal_lm_task(tmp_path, capsys):
    assert cli_main(["train", "--model", "smollm2", "--task", "classify", "--out",
                     str(tmp_path / "x"), "--quiet"]) == 2
    assert "--model smollm2 is a causal LM" in capsys.readouterr().err


def test_a_causal_lm_run_evaluates_with_beams(llama_dir, tmp_path):
    data = causal_lm_data_dir(tmp_path)
    cfg = RunConfig(algo="feddpa-t", model=str(llama_dir), task="causal-lm", data=str(data),
                    clients=2, rounds=1, max_steps=1, r=4, batch_size=4, test_limit=2,
                    num_beams=2, max_new_tokens=4, out=str(tmp_path / "run"),
                    target_modules=("q_proj", "v_proj"))
    results = run(cfg, progress=False)
    assert sorted(results["per_client"]) == ["echo", "plural"]
    assert 0 <= results["P"] <= 1 and 0 <= results["TTP"] <= 1


def _full_vocabulary_loss(task, examples):
    """Hugging Face's own loss over the logits of every position, on the same batch."""
    ids, mask, labels, _ = task._training_batch(examples)
    return task.model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mixed_lengths():
    return _examples() + [LMExample("a much longer instruction " * 3, "", "a b c d", "x")]


@pytest.mark.parametrize("gather_answers", [True, False])
def test_response_only_loss_and_grads_equal_the_full_vocabulary_loss(llama_dir, gather_answers):
    task = _task(llama_dir, num_beams=1, gather_answers=gather_answers)
    examples = _mixed_lengths()
    fd.set_trainable(task.model, "global")
    values, grads = [], []
    for loss_fn in (task.loss, lambda ex: _full_vocabulary_loss(task, ex)):
        task.model.zero_grad(set_to_none=True)
        with fd.mix(task.model, 1.0, 0.5):
            loss = loss_fn(examples)
        loss.backward()
        values.append(loss.detach())
        grads.append(_lora_grads(task.model))
    assert torch.allclose(values[0], values[1], rtol=1e-5, atol=1e-6), values
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("gather_answers", [True, False])
def test_each_groups_loss_equals_its_full_vocabulary_loss_alone(llama_dir, gather_answers):
    task = _task(llama_dir, num_beams=1, gather_answers=gather_answers)
    rows = _mixed_lengths()
    groups = [rows[:1], rows[1:3], rows[3:]]  # the long row pads the others' columns
    with fd.mix(task.model, 1.0, 0.5):
        losses, padding = task.group_losses(groups)
        alone = [_full_vocabulary_loss(task, g) for g in groups]
    assert padding > 0
    for got, want in zip(losses, alone, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)


def test_the_answer_gather_leaves_no_hook_behind_even_when_the_forward_fails(llama_dir):
    task = _task(llama_dir, num_beams=1)
    head = task.model.get_output_embeddings()
    task.loss(_examples())
    assert not head._forward_pre_hooks

    def broken(*_args, **_kwargs):
        raise RuntimeError("the forward failed")

    task.model.forward = broken
    with pytest.raises(RuntimeError, match="the forward failed"):
        task.loss(_examples())
    assert not head._forward_pre_hooks


def test_a_model_whose_head_the_gather_cannot_reach_gets_a_clear_error(llama_dir):
    task = _task(llama_dir, num_beams=1)

    def head_elsewhere(input_ids, **_kwargs):  # logits from somewhere else than the head
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 7))

    task.model.forward = head_elsewhere
    with pytest.raises(RuntimeError, match="gather_answers=False"):
        task.loss(_examples())


def test_represent_equals_the_full_forward_without_its_lm_head(llama_dir):
    task = _task(llama_dir, num_beams=1)
    examples = _examples()
    ids, mask = task._left_padded_prompts(examples)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = task.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          output_hidden_states=True).hidden_states[-1][:, -1]
    assert torch.allclose(task.represent(examples), full, atol=1e-6)


def test_greedy_batched_generation_with_dynamic_weights_equals_each_alone(llama_dir):
    task = _task(llama_dir, num_beams=1)
    examples = _examples()
    g, lw = instance_weights(task, examples, _examples()[:2], WeightingConfig(k=2))
    batched = task.predict(examples, g, lw)
    assert [task.predict([e], float(g[i]), float(lw[i]))[0]
            for i, e in enumerate(examples)] == batched


def test_prompt_format_auto_follows_the_tokenizer(llama_dir):
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = torch.nn.Linear(1, 1)
    assert CausalLMTask(model, tok).prompt_format == "alpaca"
    assert CausalLMTask(model, tok, prompt_format="auto").prompt_format == "alpaca"
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        CausalLMTask(model, tok, prompt_format="chat")
    with pytest.raises(ValueError, match="prompt_format must be"):
        CausalLMTask(model, tok, prompt_format="llama")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    task = CausalLMTask(model, tok, prompt_format="auto")
    assert task.prompt_format == "chat"
    text = task._prompt_text(LMExample("Translate.", "cat", "chat", "french"))
    assert text == "<system><user>Translate.\n\ncat<assistant>"


def test_a_chat_template_without_a_system_turn_gets_the_user_turn_alone(llama_dir):
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<model>")
    task = CausalLMTask(torch.nn.Linear(1, 1), tok, prompt_format="chat")
    assert task._prompt_text(LMExample("Say it.", "", "x", "t")) == "<user>Say it.<model>"
    with pytest.raises(ValueError, match="no examples"):
        task.loss([])
