"""One FedIT round end to end: feddpa_fast's trainer against an OpenFedLLM-style loop, in one
process, on the same model, data, clients, steps and batches.

* ``ours``: a FedIT ``Run`` of the trainer (fed/runner.py), one ``Run._round``: every client
  receives the global adapter as a validated blob, trains ``--steps`` AdamW steps of
  ``--batch`` examples through the fused op, uploads; the server validates, aggregates and
  checkpoints.
* ``peft_trainer``: what OpenFedLLM does: the base model wrapped by ``peft.get_peft_model``
  (q/v, the same r, alpha, dropout); per client ``set_peft_model_state_dict(global)``, a fresh
  ``transformers.Trainer`` (``max_steps=--steps``, the same batch size, learning rate, AdamW,
  constant schedule, no saving, no logging), ``trainer.train()``,
  ``get_peft_model_state_dict``; then the mean of the clients' adapters.
* ``peft_loop``: the same PEFT model under a plain loop (AdamW, ``loss.backward()``): what the
  Trainer adds on top of PEFT.

Every side trains each client on the same batches (the client's first ``steps x batch``
examples, in order, tokenized by ``CausalLMTask._training_batch``: chat prompt, answer + EOS,
loss on the answer only) from the same base weights and the same initial adapter. The sides
alternate round by round (bench/common.py), after one warm-up round each.

    python bench/round.py [--data DIR] [--model smollm2|DIR] [--clients 8] [--steps 4]
                          [--batch 8] [--reps 3] [--dtype fp32|bf16|fp16] [--out CSV]

Rows go to bench/results/round_cpu.csv (``round_s`` median, p20, p80; ``x_ours``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.precision import BASE_DTYPES, base_dtype  # noqa: E402

FIELDS = ["run_id", "date", "device", "threads", "torch", "transformers", "peft",
          "feddpa_fast", "bench", "model", "dtype", "clients", "steps", "batch", "provider",
          "median_s", "p20_s", "p80_s", "x_ours"]
R, ALPHA, DROPOUT, LR = 8, 16, 0.05, 1e-3
TARGETS = ("q_proj", "v_proj")


def ours(args, data: Path, workdir: Path):
    """A callable playing one FedIT round of the trainer (the next round each call)."""
    from feddpa_fast.fed.in_process import InProcess
    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.runner import build_run

    cfg = RunConfig(algo="fedit", model=args.model, task="causal-lm", data=str(data),
                    clients=args.clients, rounds=1000, max_steps=args.steps,
                    batch_size=args.batch, lr=LR, r=R, alpha=ALPHA, dropout=DROPOUT,
                    target_modules=TARGETS, eval_every=0, final_eval="none",
                    dtype=args.dtype, out=str(workdir / "ours"))
    run = build_run(cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    transport = InProcess(run, progress=False)
    state = {"round": 0}

    def one_round():
        run._round(state["round"], transport)
        state["round"] += 1
    return one_round, run


def _client_batches(run, args) -> dict[str, list]:
    """Each client's batches as the trainer's task builds them (the same tensors for PEFT)."""
    task = run.task
    out = {}
    for name, client in run.clients.items():
        examples = client.fit[: args.steps * args.batch]
        out[name] = []
        for i in range(0, len(examples), args.batch):
            ids, mask, labels, _ = task._training_batch(examples[i:i + args.batch])
            out[name].append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _peft_model(args):
    import peft
    from transformers import AutoModelForCausalLM

    from feddpa_fast.fed.smollm2 import model_dir

    path = model_dir() if args.model == "smollm2" else args.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype(args.dtype))
    return peft.get_peft_model(model, peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS)))


def peft_side(args, batches: dict, use_trainer: bool, workdir: Path):
    """A callable playing one OpenFedLLM-style FedIT round on a PEFT model."""
    import peft

    model = _peft_model(args)
    global_state = {k: v.detach().clone() for k, v in
                    peft.get_peft_model_state_dict(model).items()}

    def train_client(client_batches):
        if use_trainer:
            _trainer(model, client_batches, args, workdir).train()
            return
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                weight_decay=0.0)
        model.train()
        for batch in client_batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def one_round():
        uploads = []
        for client_batches in batches.values():
            peft.set_peft_model_state_dict(model, global_state)
            train_client(client_batches)
            uploads.append({k: v.detach().clone() for k, v in
                            peft.get_peft_model_state_dict(model).items()})
        for key in global_state:  # FedAvg, uniform (FedIT's)
            global_state[key] = torch.stack([u[key] for u in uploads]).mean(0)
    return one_round


class _Batches(torch.utils.data.Dataset):
    """The client's prepared batches, one item per batch (the collator unwraps it)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _trainer(model, client_batches, args, workdir: Path):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(workdir / "trainer"), max_steps=len(client_batches),
        per_device_train_batch_size=1, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=_Batches(client_batches),
                      data_collator=lambda items: items[0])
    trainer.remove_callback(PrinterCallback)  # its end-of-train line per client is noise here
    return trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 or a causal-LM directory (the tests' tiny Llama)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=list(BASE_DTYPES), default="fp32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    data = common.lexical_suite(args.data)
    with tempfile.TemporaryDirectory(prefix="round-") as tmp:
        workdir = Path(tmp)
        ours_round, run = ours(args, data, workdir)
        batches = _client_batches(run, args)
        sides = {"ours": ours_round,
                 "peft_trainer": peft_side(args, batches, True, workdir),
                 "peft_loop": peft_side(args, batches, False, workdir)}
        samples = common.time_alternating(sides, args.reps, warmup=1)
    return _report(args, samples)


def _report(args, samples) -> int:
    import peft
    import transformers

    device = torch.device("cpu")
    base = {"run_id": common.new_run_id(), "date": common.today(),
            "device": common.device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "feddpa_fast": feddpa_fast.__version__,
            "bench": "round", "model": args.model if args.model == "smollm2" else "custom",
            "dtype": args.dtype, "clients": args.clients,
            "steps": args.steps, "batch": args.batch}
    ours_median = common.quantiles(samples["ours"])[0]
    rows = []
    for provider, ms in samples.items():
        median, p20, p80 = (v / 1e3 for v in common.quantiles(ms))
        rows.append({**base, "provider": provider, "median_s": f"{median:.2f}",
                     "p20_s": f"{p20:.2f}", "p80_s": f"{p80:.2f}",
                     "x_ours": f"{median * 1e3 / ours_median:.3f}"})
    out = args.out or common.RESULTS_DIR / "round_cpu.csv"
    common.append_rows(out, rows, FIELDS)
    print("| provider | round (s) median [p20, p80] | x ours |\n|---|---|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['median_s']} [{r['p20_s']}, {r['p80_s']}] | "
              f"{r['x_ours']} |")
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
