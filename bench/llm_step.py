"""The causal-LM step's speed on SmolLM2-135M-Instruct, before and after, in one process.

Three variants, timed side by side on the same model:

* ``before``: the paths the project used before issue 16. Alpaca prompts; a training batch
  right-padded and Hugging Face's own loss (``labels=``), so the LM head (49,152 x 576) runs at
  every position; the representation forward of FedDPA's weighting with the LM head over every
  position too; evaluation in one ``generate`` per test set (``--set-size`` sequences).
* ``same-prompt``: Alpaca prompts, but ``CausalLMTask`` as it is now: the LM head on the
  response columns only (training) and ``logits_to_keep=1`` (representation), and the test
  sets pooled into full batches of ``--eval-size``.
* ``after``: that, with the model's own chat template (``--prompt-format auto``).

Measures: **train step** (ms; forward, backward and AdamW step of the global adapter on one
batch) and **evaluation** (generated tokens / s of FedDPA's dynamic evaluation of
``--eval-size`` test instances: instance weights from the representation forward, then
``generate`` with a different mix per sequence and the KV cache).

    python bench/llm_step.py [--data DIR] [--batch 8] [--reps 5] [--eval-size 32]

``--data`` is a lexical suite directory (``feddpa-fast data build-lexical``); without it the
suite is built from the Debian packages into a temporary directory. Rows go to
bench/results/llm_step_cpu.csv (or _gpu) and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
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

FIELDS = ["run_id", "date", "device", "threads", "torch", "transformers", "feddpa_fast",
          "bench", "measure", "variant", "batch", "median", "p20", "p80", "unit",
          "ratio_to_before"]


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
    if path is None:
        from feddpa_fast.fed.lexical import write_lexical

        path = Path(tempfile.mkdtemp(prefix="lexical-"))
        write_lexical(path)
    return load_data_dir(path, "causal-lm")


def _model():
    model, tokenizer = load_smollm2()
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
    args = parser.parse_args(argv)

    train, test = _suite(args.data)
    model, tokenizer = _model()
    kw = {"max_new_tokens": args.max_new_tokens}
    tasks = {"before": BeforeTask(model, tokenizer, prompt_format="alpaca", **kw),
             "same-prompt": CausalLMTask(model, tokenizer, prompt_format="alpaca", **kw),
             "after": CausalLMTask(model, tokenizer, prompt_format="auto", **kw)}
    set_trainable(model, "global")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    names = list(train)
    # A client's batch is one task; its examples, the first of each task in turn, vary the
    # prompt and answer lengths as the eight clients' batches do.
    batch = [train[names[i % len(names)]][i // len(names)] for i in range(args.batch)]
    train_ms = common.time_alternating(
        {name: _train_step(t, batch, optimizer) for name, t in tasks.items()}, args.reps, 1)
    model.eval()
    set_trainable(model, "none")
    weighting = WeightingConfig()
    per_set = max(1, args.eval_size // len(names))
    examples = [e for n in names for e in test[n][:per_set]][: args.eval_size]
    anchors = train[names[0]][: weighting.k]
    eval_tps = {name: _timed_eval(t, examples, anchors, weighting,
                                  args.set_size if name == "before" else args.eval_size,
                                  max(2, args.reps // 2))
                for name, t in tasks.items()}
    return _report(args, train_ms, eval_tps)


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
        before = common.quantiles(samples["before"])[0]
        for variant in ("before", "same-prompt", "after"):
            median, p20, p80 = common.quantiles(samples[variant])
            rows.append({**base, "measure": measure, "variant": variant, "batch": batch,
                         "median": f"{median:.1f}", "p20": f"{p20:.1f}", "p80": f"{p80:.1f}",
                         "unit": unit, "ratio_to_before": f"{median / before:.3f}"})
    out = args.out or common.RESULTS_DIR / f"llm_step_{device.type}.csv"
    common.append_rows(out, rows, FIELDS)
    print("| measure | batch | before | same prompt, new paths (x before) | after (x before) |"
          "\n|---|---|---|---|---|")
    for measure in ("train_step", "eval_throughput"):
        b, s, a = [r for r in rows if r["measure"] == measure]
        print(f"| {measure} ({a['unit']}) | {a['batch']} | {b['median']} | {s['median']} "
              f"({s['ratio_to_before']}) | {a['median']} ({a['ratio_to_before']}) |")
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
