"""Many clients in one batch, the op: ``lora_linear_banked`` over C clients x rows each, against
one ``lora_linear`` call per client, PEFT's mixed-adapter batch (``adapter_names``: one adapter
per row, which is all it can express; inference only) and the frozen layer alone.

    python bench/clients.py [--clients 8] [--rows 32 128] [--shapes K,N ...] [--r 8] [--reps N]
                            [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                            [--modes forward fwd+bwd]

Each client has its own local adapter and every row the shared global (FedDPA serving: 2
branches of rank r), with per-row weights. Rows are interleaved across clients (a client's rows
are not contiguous), as requests arrive. Providers run in the same process, in alternation,
after warm-up; rows go to bench/results/clients_op.csv (device, date, versions), and
bench/results/clients_op.png is drawn from the newest run (time / base per provider).

    base        F.linear over all rows (the floor)
    batched     one lora_linear_banked call (frozen GEMM once, rank-r work per client)
    per_client  one lora_linear call per client on its rows (gathered), outputs scattered back
    peft        peft's LoRA layer with C adapters, forward(x, adapter_names=...) (forward only)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import plot  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.kernels import lora_linear, lora_linear_banked  # noqa: E402

SMOLLM2_SHAPES = [(576, 576), (576, 1536)]
BIG_SHAPES = [(2048, 2048)]
CSV_PATH = common.RESULTS_DIR / "clients_op.csv"
FIELDS = common.CSV_FIELDS[:12] + ["clients", "rows_per_client"] + common.CSV_FIELDS[12:]


def make_problem(clients: int, rows: int, k: int, n: int, r: int, seed: int = 0,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Tensors of one call: x (C * rows, K), the frozen layer, a bank (slot 0 the shared global,
    1..C the locals), the interleaved index and per-row scales (float32), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    m = clients * rows
    client_of_row = torch.arange(m) % clients  # interleaved: row i belongs to client i % C
    index = torch.stack([torch.zeros(m, dtype=torch.int64), client_of_row + 1], 1)
    mix = torch.rand(m, 1, generator=g)
    scale = torch.cat([(mix * 2.0).expand(m, r), ((1 - mix) * 2.0).expand(m, r)], 1)
    tensors = {
        "x": torch.randn(m, k, generator=g), "weight": torch.randn(n, k, generator=g) / k ** 0.5,
        "bias": torch.randn(n, generator=g),
        "bank_a": torch.randn(clients + 1, r, k, generator=g) / k ** 0.5,
        "bank_b": torch.randn(clients + 1, n, r, generator=g) / r ** 0.5,
    }
    tensors = {name: t.to(device, dtype) for name, t in tensors.items()}
    return {**tensors, "index": index.to(device), "scale": scale.contiguous().to(device),
            "clients": clients,
            "rows_of": [torch.nonzero(client_of_row == c).flatten().to(device)
                        for c in range(clients)]}


def batched(p):
    return lora_linear_banked(p["x"], p["weight"], p["bias"], p["bank_a"], p["bank_b"],
                              p["index"], p["scale"])


def per_client(p):
    """One plain call per client: its rows gathered, its (global, local) pair stacked (once,
    outside the timing: ``p["stacks"]``), its output scattered back."""
    y = p["x"].new_empty(p["x"].shape[0], p["weight"].shape[0])
    for c, rows in enumerate(p["rows_of"]):
        a, b = p["stacks"][c]
        y[rows] = lora_linear(p["x"][rows], p["weight"], p["bias"], a, b, p["scale"][rows])
    return y


def base(p):
    return F.linear(p["x"], p["weight"], p["bias"])


def peft_layer(p):
    """peft's LoRA Linear with one adapter per client (each the client's local); the mixed
    batch names one adapter per row. PEFT cannot add the shared global per row."""
    from peft import LoraConfig, get_peft_model

    n, k = p["weight"].shape
    r = p["bank_a"].shape[1]

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(k, n, device=p["x"].device, dtype=p["x"].dtype)

        def forward(self, inp, **kwargs):
            return self.proj(inp)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(p["weight"])
        holder.proj.bias.copy_(p["bias"])
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])
    model = get_peft_model(holder, cfg, adapter_name="c0")
    for c in range(1, p["clients"]):
        model.add_adapter(f"c{c}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for c in range(p["clients"]):
            layer.lora_A[f"c{c}"].weight.copy_(p["bank_a"][c + 1])
            layer.lora_B[f"c{c}"].weight.copy_(p["bank_b"][c + 1])
    names = [f"c{int(s) - 1}" for s in p["index"][:, 1]]
    return lambda: layer(p["x"], adapter_names=names)


def providers(p, mode: str) -> dict:
    """name -> a callable running one timed call (fwd: no grad; fwd+bwd: with dx and the
    adapters' gradients)."""
    bank_a, bank_b = p["bank_a"], p["bank_b"]
    p["stacks"] = [(torch.cat([bank_a[0], bank_a[c + 1]]), torch.cat([bank_b[0], bank_b[c + 1]], 1))
                   for c in range(p["clients"])]
    fns = {"base": base, "batched": batched, "per_client": per_client}
    if mode == "forward":
        out = {name: (lambda f=f: _no_grad(f, p)) for name, f in fns.items()}
        peft_forward = peft_layer(p)
        out["peft"] = lambda: _no_grad(lambda _: peft_forward(), p)
        return out
    leaves = [p["x"], p["bank_a"], p["bank_b"]] + [t for pair in p["stacks"] for t in pair]
    for t in leaves:
        t.requires_grad_(True)
    dy = torch.randn_like(p["x"][:, :1].expand(-1, p["weight"].shape[0]))
    return {name: (lambda f=f: _step(f, p, leaves, dy)) for name, f in fns.items()}


def _synchronized(fns: dict, device: str) -> dict:
    """On CUDA each timed call ends with a synchronize (wall time of the work, not the launch)."""
    if torch.device(device).type != "cuda":
        return fns

    def timed(f):
        def call():
            f()
            torch.cuda.synchronize()
        return call

    return {name: timed(f) for name, f in fns.items()}


def _no_grad(f, p):
    with torch.no_grad():
        return f(p)


def _step(f, p, leaves, dy):
    for t in leaves:
        t.grad = None
    f(p).backward(dy)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rows", type=int, nargs="*", default=[32, 128],
                    help="rows per client (SmolLM2's shapes); 2048^2 runs at the largest")
    ap.add_argument("--shapes", nargs="*", default=None,
                    help="K,N pairs (default: SmolLM2's 576,576 and 576,1536, then 2048,2048)")
    ap.add_argument("--r", type=int, default=8, help="rank per branch")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: timed to a synchronize)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--modes", nargs="*", default=["forward", "fwd+bwd"],
                    choices=("forward", "fwd+bwd"))
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cases = ([(rows, *map(int, s.split(","))) for s in args.shapes for rows in args.rows]
             if args.shapes else
             [(rows, k, n) for k, n in SMOLLM2_SHAPES for rows in args.rows]
             + [(max(args.rows), k, n) for k, n in BIG_SHAPES])
    meta = {"run_id": common.new_run_id(), "date": common.today(),
            "device": common.device_name(torch.device(args.device)),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "feddpa_fast": feddpa_fast.__version__, "bench": "clients_op", "dtype": args.dtype}
    rows = []
    for rows_per_client, k, n in cases:
        for mode in args.modes:
            p = make_problem(args.clients, rows_per_client, k, n, args.r, device=args.device,
                             dtype=dtype)
            samples = common.time_alternating(_synchronized(providers(p, mode), args.device),
                                              args.reps)
            base_ms = common.quantiles(samples["base"])[0]
            for name, s in samples.items():
                med, p20, p80 = common.quantiles(s)
                rows.append({**meta, "M": args.clients * rows_per_client, "K": k, "N": n,
                             "r": args.r, "clients": args.clients,
                             "rows_per_client": rows_per_client, "mode": mode, "provider": name,
                             "median_ms": f"{med:.4f}", "p20_ms": f"{p20:.4f}",
                             "p80_ms": f"{p80:.4f}", "ratio_to_base": f"{med / base_ms:.4f}"})
            print(f"done {args.clients}x{rows_per_client} {k}->{n} {mode}", file=sys.stderr,
                  flush=True)
    common.append_rows(args.csv, rows, FIELDS)
    print(f"# {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"{meta['date']}: {args.clients} clients, rank {args.r} per branch (global + local)")
    print(table(rows))
    if not args.no_plot:
        print(f"plot: {plot.plot_latest_run(args.csv, args.csv.with_suffix('.png'))}")
    return rows


def table(rows: list[dict]) -> str:
    """Median ms per provider, and per_client / batched (the speedup of one batched call)."""
    lines = ["| clients x rows | K -> N | mode | base ms | batched ms (x base) | per-client ms "
             "| peft ms | per-client / batched |", "|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        key = (r["clients"], r["rows_per_client"], r["K"], r["N"], r["mode"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        got = {r["provider"]: r for r in rows
               if (r["clients"], r["rows_per_client"], r["K"], r["N"], r["mode"]) == key}
        ms = {name: float(r["median_ms"]) for name, r in got.items()}
        peft = f"{ms['peft']:.3f}" if "peft" in ms else "—"
        lines.append(f"| {key[0]} x {key[1]} | {key[2]} -> {key[3]} | {key[4]} | "
                     f"{ms['base']:.3f} | {ms['batched']:.3f} ({ms['batched'] / ms['base']:.2f}) | "
                     f"{ms['per_client']:.3f} | {peft} | {ms['per_client'] / ms['batched']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
