"""The causal-LM train step on SmolLM2, eager against ``torch.compile`` (inductor, dynamic
shapes), in one process: the first step (which compiles) and the steady step, alternated.

    python bench/compile_step.py [--data DIR] [--reps 5]

What ``--compile`` costs and saves (docs/precision.md). Prints the figures; no CSV.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from llm_step import _suite  # noqa: E402

from feddpa_fast import DualLoRAConfig, patch  # noqa: E402
from feddpa_fast.fed.smollm2 import load_smollm2  # noqa: E402
from feddpa_fast.fed.tasks import CausalLMTask  # noqa: E402
from feddpa_fast.mixing import mix, set_trainable  # noqa: E402


def _build(compiled: bool):
    model, tokenizer = load_smollm2()
    patch(model, DualLoRAConfig(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj")))
    if compiled:
        model.compile(dynamic=True)
    set_trainable(model, "global")
    model.train()
    task = CausalLMTask(model, tokenizer, max_new_tokens=16, prompt_format="auto",
                        gather_answers=not compiled)  # as the trainer builds it (loading.py)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return task, opt


def _step(task, opt, batch):
    opt.zero_grad(set_to_none=True)
    with mix(task.model, 1.0, 0.0):
        task.loss(batch).backward()
    opt.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    train, _ = _suite(args.data)
    names = list(train)
    batch = [train[names[i % len(names)]][i // len(names)] for i in range(8)]
    sides = {}
    for compiled in (False, True):
        task, opt = _build(compiled)
        start = time.perf_counter()
        _step(task, opt, batch)
        label = "compiled" if compiled else "eager"
        print(f"{label}: first step {time.perf_counter() - start:.1f} s", flush=True)
        sides[label] = (lambda t=task, o=opt: _step(t, o, batch))
    samples = common.time_alternating(sides, args.reps, warmup=1)
    for label, ms in samples.items():
        median, p20, p80 = common.quantiles(ms)
        print(f"{label}: steady step {median:.0f} ms [{p20:.0f}, {p80:.0f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
