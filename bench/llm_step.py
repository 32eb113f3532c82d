"""The causal-LM step's speed on SmolLM2-135M-Instruct, before and after, in one process.

Four variants, timed side by side on the same model:

* ``before``: the paths the project used before issue 16. Alpaca prompts; a training batch
  right-padded and Hugging Face's own loss (``labels=``), so the LM head (49,152 x 576) runs at
  every position; the representation forward of FedDPA's weighting with the LM head over every
  position too; evaluation in one ``generate`` per test set (``--set-size`` sequences).
* ``same-prompt``: Alpaca prompts, but ``CausalLMTask`` as it is now: the LM head on the
  response positions only (training) and ``logits_to_keep=1`` (representation), and the test
  sets pooled into full batches of ``--eval-size``.
* ``columns``: the chat template, with the LM head on every row's columns from the shortest
  prompt's end (``gather_answers=False``: how training ran before the head was gathered to the
  response positions, and how a compiled model still runs).
* ``after``: ``CausalLMTask`` as it is now, with the model's own chat template
  (``--prompt-format auto``).

A dtype axis (``--dtypes fp32,bf16``): each dtype loads its own copy of the base model in that
dtype (fp32 adapters, feddpa_fast/precision.py) and every (dtype, variant) pair is timed in
alternation in the same loop; ``ratio_to_fp32`` compares a variant with itself on the fp32 base.

Measures: **train step** (ms; forward, backward and AdamW step of the global adapter on one
batch) and **evaluation** (generated tokens / s of FedDPA's dynamic evaluation of
``--eval-size`` test instances: instance weights from the representation forward, then
``generate`` with a different mix per sequence and the KV cache).

    python bench/llm_step.py [--data DIR] [--batch 8] [--reps 5] [--eval-size 32]
                             [--dtypes fp32,bf16] [--variants after]

``--data`` is a lexical suite directory (``feddpa-fast data build-lexical``); without it the
suite is built from the Debian packages into a temporary directory. Rows go to
bench/results/llm_step_cpu.csv (or _gpu) and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.config import DualLoRAConfig  # noqa: E402
from feddpa_fast.fed.algorithms.feddpa_weighting import WeightingConfig  # noqa: E402
from feddpa_fast.fed.data import load_data_dir  # noqa: E402
from feddpa_fast.fed.smollm2 import load_smollm2  # noqa: E402
from feddpa_fast.fed.tasks import CausalLMTask  # noqa: E402
from feddpa_fast.mixing import mix, set_trainable  # noqa: E402
from feddpa_fast.patch import patch  # noqa: E402
from feddpa_fast.precision import BASE_DTYPES, base_dtype  # noqa: E402

FIELDS = ["run_id", "date", "device", "threads", "torch", "transformers", "feddpa_fast",
          "bench", "measure", "variant", "batch", "median", "p20", "p80", "unit",
          "ratio_to_before", "dtype", "ratio_to_fp32"]
VARIANTS = ("before", "same-prompt", "columns", "after")


class BeforeTask(CausalLMTask):
    """The paths the project used before: right padding with HF's full-vocabulary loss, and a
    representation forward whose LM head runs at every position."""

    def loss(self, examples):
        ids, mask, labels, _ = self._training_batch(examples)  # the same right-padded batch
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def represent(self, examples, how="last"):
        ids, mask = self._left_padded_prompts(examples)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         output_hidden_states=True)
        return out.hidden_states[-1][:, -1]


def _suite(path: Path | None):
    return load_data_dir(common.lexical_suite(path), "causal-lm")


def _model(dtype: str):
    model, tokenizer = load_smollm2(dtype=base_dtype(dtype))
    patch(model, DualLoRAConfig(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj")))
    set_trainable(model, "none")
    return model, tokenizer


def _train_step(task, batch, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with mix(task.model, 1.0, 0.0):
            task.loss(batch).backward()
        optimizer.step()
    return step


def _timed_eval(task, examples, anchors, weighting, set_size: int, reps: int) -> list[float]:
    """Tokens/s samples of a dynamic evaluation of ``examples``, ``set_size`` per batch."""
    from feddpa_fast.fed.evaluate import predictions_for

    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        predictions = predictions_for(task, examples, "dynamic", anchors=anchors,
                                      weighting=weighting, batch_size=set_size)["authors"]
        elapsed = time.perf_counter() - start
        tokens = sum(len(task.tokenizer(p, add_special_tokens=False)["input_ids"]) + 1
                     for p in predictions)  # + EOS (or the last token of a capped one)
        samples.append(tokens / elapsed)
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--set-size", type=int, default=8,
                        help="test instances per set: the before variant's generate batch")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dtypes", default="fp32",
                        help=f"comma-separated base dtypes out of {list(BASE_DTYPES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated variants out of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    args.dtypes = _choices(args.dtypes, BASE_DTYPES, "--dtypes")
    args.variants = _choices(args.variants, VARIANTS, "--variants")

    train, test = _suite(args.data)
    names = list(train)
    # A client's batch is one task; its examples, the first of each task in turn, vary the
    # prompt and answer lengths as the eight clients' batches do.
    batch = [train[names[i % len(names)]][i // len(names)] for i in range(args.batch)]
    tasks, steps = {}, {}
    for dtype in args.dtypes:
        model, tokenizer = _model(dtype)
        kw = {"max_new_tokens": args.max_new_tokens}
        made = {"before": (BeforeTask, {"prompt_format": "alpaca"}),
                "same-prompt": (CausalLMTask, {"prompt_format": "alpaca"}),
                "columns": (CausalLMTask, {"prompt_format": "auto", "gather_answers": False}),
                "after": (CausalLMTask, {"prompt_format": "auto"})}
        set_trainable(model, "global")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-4)
        for variant in args.variants:
            kind, options = made[variant]
            tasks[dtype, variant] = kind(model, tokenizer, **options, **kw)
            steps[dtype, variant] = _train_step(tasks[dtype, variant], batch, optimizer)
    train_ms = common.time_alternating(steps, args.reps, 1)
    weighting = WeightingConfig()
    per_set = max(1, args.eval_size // len(names))
    examples = [e for n in names for e in test[n][:per_set]][: args.eval_size]
    anchors = train[names[0]][: weighting.k]
    eval_tps = {}
    for (dtype, variant), task in tasks.items():
        task.model.eval()
        set_trainable(task.model, "none")
        eval_tps[dtype, variant] = _timed_eval(
            task, examples, anchors, weighting,
            args.set_size if variant == "before" else args.eval_size, max(2, args.reps // 2))
    return _report(args, train_ms, eval_tps)


def _choices(text: str, known, flag: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise SystemExit(f"{flag}: {unknown or 'nothing'} not in {list(known)}")
    return chosen


def _report(args, train_ms, eval_tps) -> int:
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = {"run_id": common.new_run_id(), "date": common.today(),
            "device": common.device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "feddpa_fast": feddpa_fast.__version__, "bench": "llm_step"}
    rows = []
    for measure, samples, unit, batch in (("train_step", train_ms, "ms", args.batch),
                                          ("eval_throughput", eval_tps, "tokens/s",
                                           args.eval_size)):
        for dtype, variant in samples:
            median, p20, p80 = common.quantiles(samples[dtype, variant])
            before = samples.get((dtype, "before"))
            fp32 = samples.get(("fp32", variant))
            rows.append({**base, "measure": measure, "variant": variant, "batch": batch,
                         "dtype": dtype, "median": f"{median:.1f}", "p20": f"{p20:.1f}",
                         "p80": f"{p80:.1f}", "unit": unit,
                         "ratio_to_before": _ratio(median, before),
                         "ratio_to_fp32": _ratio(median, fp32)})
    out = args.out or common.RESULTS_DIR / f"llm_step_{device.type}.csv"
    common.append_rows(out, rows, FIELDS)
    print("| measure | dtype | variant | median [p20, p80] | x before | x fp32 |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} ({r['unit']}, batch {r['batch']}) | {r['dtype']} | "
              f"{r['variant']} | {r['median']} [{r['p20']}, {r['p80']}] | "
              f"{r['ratio_to_before'] or '-'} | {r['ratio_to_fp32'] or '-'} |")
    print(f"rows appended to {out}")
    return 0


def _ratio(median: float, reference: list[float] | None) -> str:
    return f"{median / common.quantiles(reference)[0]:.3f}" if reference else ""


if __name__ == "__main__":
    sys.exit(main())
