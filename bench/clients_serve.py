"""Many clients in one batch, end to end, on a finished causal-LM run (e.g. the FedDPA-T run of
``make demo-llm``): personalised generation and the TTP evaluation, batched across clients
against one client at a time.

    python bench/clients_serve.py generate --run DIR [--prompts 4 32] [--reps 3]
    python bench/clients_serve.py eval --run DIR [--reps 2]

``generate``: each client asks ``--prompts`` of its own task's test prompts, interleaved across
clients as requests arrive. ``batched`` is ``ClientGenerator.generate`` over all of them (rows of
every client in batches of 32); ``per_client`` is the loop that exists without the bank: per
client, its adapters loaded as the model's own (the method's ``receive``), its prompts
represented, weighted and answered in batches of up to 32. Both use the client's anchor
representations computed once before the timing. tokens/s counts prompts x new tokens (the
same numerator for both). ``eval``: ``feddpa-fast eval`` (``evaluate_run``) pooled and
``--per-client``, on a copy of the run, alternated. Rows go to
bench/results/clients_serve.csv; the plot (bench/results/clients_serve.png) is tokens/s of the
newest generate run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import plot  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.fed.algorithms.feddpa_weighting import (  # noqa: E402
    represent_local,
    similarity_scores,
    weights_from_scores,
)
from feddpa_fast.fed.data import LMExample  # noqa: E402
from feddpa_fast.fed.evaluate import fixed_weights  # noqa: E402
from feddpa_fast.fed.runner import evaluate_run  # noqa: E402
from feddpa_fast.fed.serve import ClientGenerator, Request  # noqa: E402

CSV_PATH = common.RESULTS_DIR / "clients_serve.csv"
FIELDS = ["run_id", "date", "device", "threads", "torch", "feddpa_fast", "bench", "method",
          "clients", "prompts_per_client", "new_tokens", "provider", "median_s", "p20_s",
          "p80_s", "tokens_per_s", "speedup", "same_answers"]
BATCH = 32


def requests_for(generator, prompts: int) -> list[Request]:
    """``prompts`` test prompts of each client's own task, interleaved across clients."""
    run = generator.run
    own = {name: run.test[name][:prompts] for name in run.clients}
    return [Request(name, own[name][i].instruction, own[name][i].input)
            for i in range(prompts) for name in run.clients if i < len(own[name])]


def per_client_anchors(generator) -> dict[str, torch.Tensor]:
    """Each client's anchor representations under its own adapters (loaded as the model's)."""
    pool, run = generator.pool, generator.run
    out = {}
    for name in run.clients:
        run.algorithm.receive(run.clients[name], run.server.message(name), None)
        out[name] = pool.anchor_representations([name])[name]
    return out


def per_client_loop(generator, requests: list[Request], anchors: dict) -> list[str]:
    """Client by client, as without the bank (module docstring)."""
    run, task, cfg = generator.run, generator.run.task, generator.run.cfg.weighting
    answers = [None] * len(requests)
    for name in dict.fromkeys(r.client for r in requests):
        client = run.clients[name]
        run.algorithm.receive(client, run.server.message(name), None)
        rows = [i for i, r in enumerate(requests) if r.client == name]
        examples = [LMExample(requests[i].instruction, requests[i].input, "", name)
                    for i in rows]
        mode = run.algorithm.final_evaluation(client).mode
        if mode == "dynamic":
            reps = represent_local(task, examples, cfg.representation, BATCH)
            global_w, local_w = weights_from_scores(
                similarity_scores(reps, anchors[name], cfg), cfg)
        else:
            global_w, local_w = (torch.full((len(rows),), float(w)) for w in fixed_weights(mode))
        for start in range(0, len(rows), BATCH):
            stop = start + BATCH
            outputs = task.predict(examples[start:stop], global_w[start:stop],
                                   local_w[start:stop])
            for i, output in zip(rows[start:stop], outputs):
                answers[i] = output
    return answers


def bench_generate(args, meta) -> list[dict]:
    generator = ClientGenerator.from_run(args.run, batch_size=BATCH)
    anchors = per_client_anchors(generator)
    new_tokens = generator.run.cfg.max_new_tokens
    rows = []
    for prompts in args.prompts:
        requests = requests_for(generator, prompts)
        answers = {}
        samples = common.time_alternating(_generate_fns(generator, requests, anchors, answers),
                                          args.reps, warmup=1)
        same = sum(a == b for a, b in zip(answers["batched"], answers["per_client"]))
        rows += _rows(meta, "clients_generate", generator, prompts, new_tokens, samples,
                      len(requests), f"{same}/{len(requests)}")
        print(f"done generate {len(generator.clients)} x {prompts}", file=sys.stderr)
    generator.close()
    return rows


def _generate_fns(generator, requests, anchors, answers: dict) -> dict:
    """The two timed providers; each keeps its last answers in ``answers``."""
    def batched():
        answers["batched"] = [a.output for a in generator.generate(requests)]

    def per_client():
        answers["per_client"] = per_client_loop(generator, requests, anchors)

    return {"batched": batched, "per_client": per_client}


def bench_eval(args, meta) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(args.run, copy)
        results = {}

        def evaluate(pooled: bool):
            out = evaluate_run(copy, progress=False, pooled=pooled)
            results[pooled] = (out["P"], out["TTP"], out["by_assignment"],
                               (copy / "predictions.jsonl").read_text())

        samples = common.time_alternating({"batched": lambda: evaluate(True),
                                           "per_client": lambda: evaluate(False)},
                                          args.reps, warmup=0)
        same = _same_predictions(results[True][3], results[False][3])
        scores_equal = results[True][:3] == results[False][:3]
        cfg = json.loads((copy / "results.json").read_text())
        print(f"scores equal: {scores_equal}; P {results[True][0]:.4f} vs "
              f"{results[False][0]:.4f}", file=sys.stderr)
    clients = len(cfg["per_client"])
    return _rows(meta, "clients_eval", None, None, None, samples, None, same,
                 method=cfg["method"], clients=clients)


def _same_predictions(a: str, b: str) -> str:
    rows_a, rows_b = a.splitlines(), b.splitlines()
    same = sum(json.loads(x)["answer"] == json.loads(y)["answer"] for x, y in zip(rows_a, rows_b))
    return f"{same}/{len(rows_a)}"


def _rows(meta, bench, generator, prompts, new_tokens, samples, count, same, *, method=None,
          clients=None) -> list[dict]:
    secs = {name: [ms / 1000 for ms in s] for name, s in samples.items()}
    med = {name: common.quantiles(s)[0] if len(s) > 1 else s[0] for name, s in secs.items()}
    out = []
    for name, s in secs.items():
        p20, p80 = (common.quantiles(s)[1:] if len(s) > 1 else (s[0], s[0]))
        tokens = (count * new_tokens / med[name]) if count else None
        out.append({**meta, "bench": bench,
                    "method": method or generator.run.cfg.algo,
                    "clients": clients or len(generator.clients),
                    "prompts_per_client": prompts or "", "new_tokens": new_tokens or "",
                    "provider": name, "median_s": f"{med[name]:.3f}", "p20_s": f"{p20:.3f}",
                    "p80_s": f"{p80:.3f}", "tokens_per_s": f"{tokens:.1f}" if tokens else "",
                    "speedup": f"{med['per_client'] / med[name]:.3f}", "same_answers": same})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("generate", "eval"))
    ap.add_argument("--run", type=Path, required=True, help="a finished causal-LM run")
    ap.add_argument("--prompts", type=int, nargs="*", default=[4, 32],
                    help="prompts per client (generate)")
    ap.add_argument("--reps", type=int, default=None, help="default: 3 (generate), 2 (eval)")
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.reps = args.reps or (3 if args.what == "generate" else 2)
    meta = {"run_id": common.new_run_id(), "date": common.today(),
            "device": common.device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "feddpa_fast": feddpa_fast.__version__}
    started = time.perf_counter()
    rows = bench_generate(args, meta) if args.what == "generate" else bench_eval(args, meta)
    common.append_rows(args.csv, rows, FIELDS)
    print(f"# {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"{meta['date']}, {time.perf_counter() - started:.0f} s")
    print(table(rows))
    if args.what == "generate" and not args.no_plot:
        print(f"plot: {plot_generate(args.csv, args.csv.with_suffix('.png'))}")
    return rows


def table(rows: list[dict]) -> str:
    """One line per row: what, provider, median s, tokens/s, speedup vs per-client."""
    lines = ["| bench | method | clients x prompts | provider | median s | tokens/s | "
             "x per-client | same answers |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['clients']} x {r['prompts_per_client'] or 'test sets'}"
        lines.append(f"| {r['bench']} | {r['method']} | {shape} | {r['provider']} | "
                     f"{r['median_s']} | {r['tokens_per_s'] or '—'} | {r['speedup']} | "
                     f"{r['same_answers']} |")
    return "\n".join(lines)


def plot_generate(csv_path: Path, out_path: Path) -> Path:
    """Tokens/s per provider and prompts per client, from the newest generate run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in plot.read_rows(csv_path) if r["bench"] == "clients_generate"]
    newest = max(r["run_id"] for r in rows)
    rows = [r for r in rows if r["run_id"] == newest]
    sizes = list(dict.fromkeys(r["prompts_per_client"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, provider in enumerate(("per_client", "batched")):
        values = [float(next(r["tokens_per_s"] for r in rows if r["provider"] == provider
                             and r["prompts_per_client"] == s)) for s in sizes]
        ax.bar([x + 0.4 * i for x in range(len(sizes))], values, width=0.4, label=provider)
    ax.set_xticks([x + 0.2 for x in range(len(sizes))],
                  [f"{rows[0]['clients']} clients x {s}" for s in sizes])
    ax.set_ylabel("tokens / s"), ax.legend()
    ax.set_title(f"{rows[0]['method']}, {rows[0]['new_tokens']} new tokens, {rows[0]['device']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


if __name__ == "__main__":
    main()
