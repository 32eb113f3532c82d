"""Model benchmark: a randomly initialised Llama-style causal LM (nothing downloaded), or with
``--model smollm2`` the real pretrained SmolLM2-135M-Instruct (feddpa_fast/fed/smollm2.py: 30
blocks, hidden 576, vocab 49,152, tied embeddings), LoRA r 16, alpha 32 on q/k/v/o/gate/up/down of
every block (``--rank r`` (alpha 2r) and ``--targets`` change that); each provider builds its
own copy from one seed (or of the same pretrained weights):

    base      the model alone, all parameters frozen (the floor); its "train step" is the
              forward plus the backward for the input gradients only (no LoRA, no optimizer)
    fused     feddpa_fast.patch, global + local adapters both trainable, run under
              feddpa_fast.mix with per-sequence weights (backward inside the mix too)
    peft_one  peft.get_peft_model, one adapter
    peft_two  peft, two adapters both active and trainable (static weights: PEFT has no
              per-instance mix; the closest PEFT gets to FedDPA)
    materialised_dropout  (with --dropout p > 0, added by default) fused's model, but each
              layer materialises F.dropout(x) and runs its A branch on that copy with torch ops
              (bench/providers.py): the baseline in-op dropout replaces

    python bench/model.py [--repeats N] [--layers L] [--hidden H] [--seq S] [--batch B]
                          [--providers base fused ...] [--dropout P] [--csv PATH] [--no-plot]
    python bench/model.py --model smollm2 [--seq S] [--batch B] [--repeats N] ...
    python bench/model.py ... --dtype fp32|bf16|fp16   (default: the trainer's, precision.py)

Metrics: forward tokens/s (eval, no_grad); train-step tokens/s (train mode, loss from labels,
backward, AdamW lr 1e-4 over the adapters); ``train_state_mb`` = ``saved_mb`` (tensors saved for
backward in one train step, unique storages, the model's own parameters excluded: they exist
anyway) + trainable parameters, grads and AdamW state; on CUDA also ``peak_mb`` = the
max_memory_allocated of one call minus what was allocated before it (all providers' models stay
resident, so the absolute peak would not be per provider). Callables alternate after warm-up
(bench/common.py). Rows go to bench/results/model_{cpu,gpu}.csv (SmolLM2:
model_smollm2_{cpu,gpu}.csv, its
``bench`` column ``model_smollm2_cpu``), the PNG is drawn from the CSV.
Dropout defaults to 0.0; with ``--dropout p`` the fused layer runs the op's in-op dropout (the
mask generated in the kernel, one for both adapters); PEFT draws one mask per adapter.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import plot  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.precision import BASE_DTYPES, base_dtype, default_base_dtype  # noqa: E402

PROVIDERS = ["base", "fused", "materialised_dropout", "peft_one", "peft_two"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA, SEED = 16, 32, 0
# CPU: vocab 4096, not Llama's 32000. With 4 blocks of hidden 1024 a 32000-word head is 33 M
# of the 84 M linear weights (39 % of the forward FLOPs, plus an fp32 (2048, 32000) logits /
# softmax / grad), none of it touched by LoRA; in a real 1-7 B Llama the head is 2-6 %. 4096
# keeps it at 7.5 %, so the table measures the blocks, not the frozen head.
# 12 repeats: 3.5 minutes on the quiet 2-core VM (forward ~1.3 s, train step 2.8-3.6 s per
# provider), leaving headroom under 6 minutes when the VM is shared.
CPU = dict(layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=16, vocab=4096,
           seq=256, batch=8, repeats=12)
# GPU: TinyLlama's block shape, 16 blocks (~0.84 B parameters), bf16. Batch 4 x 2048 tokens:
# HF Llama saves roughly 0.1 MB per token per block in bf16 (estimate), ~15 GB for 16 blocks,
# plus ~7 GB for the four resident models and ~2 GB of fp32 logits / loss: well inside an
# 80 GB H100 (not yet run on a GPU; --batch 8 should fit too).
GPU = dict(layers=16, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
           seq=2048, batch=4, repeats=10)
# SmolLM2 on the CPU: 4 x 128 tokens, 8 repeats (the sizes come from the model): about 5 minutes
# on the quiet 2-core VM; 4 x 256 took over 10 minutes for 3 repeats while the VM was shared.
SMOLLM2_CPU = dict(seq=128, batch=4, repeats=8)
SMOLLM2_GPU = dict(seq=2048, batch=8, repeats=10)
SHAPE = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch")
MODEL_SIZES = SHAPE[:6]  # fixed by a pretrained model
FIELDS = ["run_id", "date", "device", "threads", "torch", "transformers", "peft", "feddpa_fast",
          "bench", "dtype", *SHAPE, "r", "alpha", "dropout", "mode", "provider", "median_ms",
          "p20_ms", "p80_ms", "tokens_per_s", "ratio_to_base", "speedup_vs_peft_two",
          "saved_mb", "train_state_mb", "peak_mb", "error"]
MB = 2.0 ** 20


def base_model(args, device: torch.device, dtype: torch.dtype):
    """A fresh copy of the benchmarked base model (the same weights for every provider)."""
    if args.model == "smollm2":
        from feddpa_fast.fed.smollm2 import load_smollm2

        return load_smollm2(dtype=dtype, device=device)[0]  # from the cache: ~1 s a copy
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False)
    torch.manual_seed(SEED)  # same base weights for every provider
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def model_sizes(config) -> dict:
    """The SHAPE fields a pretrained model fixes, read from its config."""
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size}


def build(name: str, args, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
    """The model of provider ``name`` with its inputs, optimizer and timed callables."""
    model = _with_adapters(name, base_model(args, device, dtype), args)
    ids = torch.randint(args.vocab, (args.batch, args.seq), device=device,
                        generator=torch.Generator(device).manual_seed(SEED + 3))
    # per-sequence weights, as FedDPA's instance-wise mix
    if name.startswith("fused") or name == "materialised_dropout":
        global_w = torch.linspace(0.2, 0.8, args.batch, device=device)
        ctx = lambda: feddpa_fast.mix(model, global_w=global_w, local_w=1.0 - global_w)  # noqa: E731
    else:
        ctx = contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        model.eval()
        with torch.no_grad(), ctx():
            model(input_ids=ids, use_cache=False)
        sync()

    def loss_backward():  # backward inside the mix: the mix weights are read at forward time
        model.train()
        with ctx():
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def train_step():
        loss_backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()

    return SimpleNamespace(model=model, params=params, opt=opt, forward=forward,
                           loss_backward=loss_backward, train_step=train_step)


def _with_adapters(name: str, model, args):
    """The provider's adapters on ``model`` (seeded; B made nonzero), or none for base."""
    device = next(model.parameters()).device
    torch.manual_seed(SEED + 1)  # the A matrices (Kaiming-uniform in both libraries)
    if name.startswith("fused") or name == "materialised_dropout":
        feddpa_fast.patch(model, feddpa_fast.DualLoRAConfig(
            r=args.rank, alpha=2 * args.rank, dropout=args.dropout,
            target_modules=tuple(args.targets)))
        feddpa_fast.set_trainable(model, "both")
        if name == "materialised_dropout":
            materialise_dropout(model, args.dropout)
    elif name.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                         target_modules=list(args.targets))
        model = get_peft_model(model, cfg)
        if name == "peft_two":
            model.add_adapter("second", cfg)
            model.base_model.set_adapter(["default", "second"])
        # set_adapter may leave an adapter frozen; train exactly the LoRA matrices, as fused.
        for pname, p in model.named_parameters():
            p.requires_grad_("lora_" in pname)
    else:
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the backward runs through every block, as with LoRA
    # B starts at zero in both libraries; make it nonzero so no branch is trivially zero.
    gen = torch.Generator(device).manual_seed(SEED + 2)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, 0.01, generator=gen)
    return model


def materialise_dropout(model, p: float) -> None:
    """materialised_dropout: each DualLoRALinear runs providers.materialised_dropout (the
    dropped copy of x materialised, the A branch on it in torch ops) over the layer's stacked
    adapters and mix scale, as its own forward reads them."""
    import types

    from providers import materialised_dropout

    from feddpa_fast.layers import dual_lora_layers

    def forward(layer, x):
        lora_a, lora_b = layer._stacked_adapters()
        return materialised_dropout(x, layer.base_weight(), layer.base_layer.bias, lora_a,
                                    lora_b, layer._scale(x), p if layer.training else 0.0)
    for _, layer in dual_lora_layers(model):
        layer.forward = types.MethodType(forward, layer)


def train_state(prov) -> tuple[float, float]:
    """One train step (also a warm-up) -> (saved-for-backward bytes, adapter state bytes)."""
    owned = {t.untyped_storage().data_ptr()
             for t in [*prov.model.parameters(), *prov.model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prov.loss_backward()
    grads = sum(p.grad.nbytes for p in prov.params if p.grad is not None)
    prov.opt.step()
    state = sum(t.nbytes for st in prov.opt.state.values() for t in st.values()
                if torch.is_tensor(t))
    prov.opt.zero_grad(set_to_none=True)
    return sum(saved.values()), sum(p.nbytes for p in prov.params) + grads + state


def cuda_peak(fn) -> float:
    """Bytes one call allocates on top of what is resident before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - before


def stats(samples: list[float]) -> tuple[float, float, float]:  # one sample: smoke runs
    return common.quantiles(samples) if len(samples) > 1 else (samples[0],) * 3


def markdown(rows: list[dict]) -> str:
    """One line per provider: forward and train step side by side, ratios, memory."""
    mem = ["saved_mb", "train_state_mb"] + ["peak_mb"] * any(r.get("peak_mb") for r in rows)
    lines = ["| provider | forward ms [p20, p80] | fwd tok/s | fwd x base | train step ms "
             "[p20, p80] | train tok/s | train x base | train speedup vs peft_two | "
             + " | ".join(mem) + " |", "|---" * (8 + len(mem)) + "|"]
    for name in dict.fromkeys(r["provider"] for r in rows):
        cells = [name]
        for mode, ratios in (("forward", ("ratio_to_base",)),
                             ("train_step", ("ratio_to_base", "speedup_vs_peft_two"))):
            row = next((r for r in rows if r["provider"] == name and r["mode"] == mode), None)
            if row is None or row.get("error"):
                cells += ["failed" if row else "n/a"] + [""] * (1 + len(ratios))
                continue
            cells += [f"{float(row['median_ms']):.1f} [{float(row['p20_ms']):.1f}, "
                      f"{float(row['p80_ms']):.1f}]", f"{float(row['tokens_per_s']):.0f}"]
            cells += [f"{float(row[k]):.3f}" if row[k] else "-" for k in ratios]
        train = next((r for r in rows if r["provider"] == name and r["mode"] == "train_step"), {})
        cells += [train.get(k) or "-" for k in mem]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(csv_path: Path, out_path: Path, run_id: str | None = None) -> Path:
    """From the CSV alone (run ``run_id``, default the newest): tokens/s per provider for
    forward and train step (p20-p80 as error bars) and the train-step memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plot.read_rows(csv_path)
    run_id = run_id or max(r["run_id"] for r in rows)
    rows = [r for r in rows if r["run_id"] == run_id]
    mem = "peak_mb" if any(r["peak_mb"] for r in rows) else "train_state_mb"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, mode in zip(axes, ("forward", "train_step")):
        sel = [r for r in rows if r["mode"] == mode]
        tokens = int(sel[0]["batch"]) * int(sel[0]["seq"]) if sel else 0
        tps = [float(r["tokens_per_s"]) for r in sel]
        # max(0, .): the CSV rounds tokens_per_s and the ms columns separately
        err = [[max(0.0, t - tokens / float(r["p80_ms"]) * 1e3) for t, r in zip(tps, sel)],
               [max(0.0, tokens / float(r["p20_ms"]) * 1e3 - t) for t, r in zip(tps, sel)]]
        bars = ax.bar([r["provider"] for r in sel], tps, yerr=err, capsize=3, color="tab:blue")
        key, what = ("ratio_to_base", "x base") if mode == "forward" else \
            ("speedup_vs_peft_two", "x faster than peft_two")
        ax.bar_label(bars, [f"{float(r[key]):.2f}" if r[key] else "" for r in sel], fontsize=8)
        ax.set_title(f"{mode}: tokens/s (median, p20-p80); labels: {what}", fontsize=10)
    sel = [r for r in rows if r["mode"] == "train_step" and r[mem]]
    axes[2].bar([r["provider"] for r in sel], [float(r[mem]) for r in sel], color="tab:orange")
    axes[2].set_title(f"train step: {mem}", fontsize=10)
    r0 = rows[0]
    fig.suptitle(f"{r0['bench']} {r0['dtype']} - {r0['device']} - {r0['date']}\n"
                 + ", ".join(f"{k} {r0[k]}" for k in (*SHAPE, "r", "dropout")), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["auto", *BASE_DTYPES], default="auto",
                    help="the base model's dtype (adapters stay fp32); auto: the trainer's "
                    "default (bf16 on CUDA and on CPUs with native bf16, else fp32)")
    ap.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic",
                    help="synthetic: the Llama config above; smollm2: SmolLM2-135M-Instruct")
    for opt in (*SHAPE, "repeats"):
        ap.add_argument("--" + opt.replace("_", "-"), type=int, default=None,
                        help="default: the CPU / GPU config above")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                    help="default: all (materialised_dropout only with --dropout > 0)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=R, help="LoRA r of each adapter (alpha = 2r)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS),
                    help="target module suffixes (default: all seven block projections)")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--no-plot", action="store_true")
    return ap


def _fill_defaults(ap, args, cuda: bool) -> None:
    """The providers, and every shape option not given, from the device's config."""
    if args.providers is None:
        args.providers = [p for p in PROVIDERS
                          if p != "materialised_dropout" or args.dropout > 0]
    if args.intermediate is None and args.hidden is not None:
        args.intermediate = args.hidden * 11 // 4  # Llama's ratio (2816 = 2.75 x 1024)
    if args.model == "smollm2":
        given = [k for k in MODEL_SIZES if getattr(args, k) is not None]
        if given:
            ap.error(f"--model smollm2 fixes {', '.join(given)}; give only --seq / --batch")
        from transformers import AutoConfig

        from feddpa_fast.fed.smollm2 import model_dir

        defaults = {**model_sizes(AutoConfig.from_pretrained(model_dir())),
                    **(SMOLLM2_GPU if cuda else SMOLLM2_CPU)}
    else:
        defaults = GPU if cuda else CPU
    if args.kv_heads is None and args.heads is not None:  # keep kv_heads a divisor of heads
        args.kv_heads = math.gcd(args.heads, defaults["kv_heads"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _meta(args, stem: str, device, dtype) -> dict:
    """The columns every row of this run shares."""
    import peft
    import transformers

    return {"run_id": common.new_run_id(), "date": common.today(),
            "device": common.device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "feddpa_fast": feddpa_fast.__version__,
            "bench": f"{stem}_{device.type}", "dtype": str(dtype).removeprefix("torch."),
            **{k: getattr(args, k) for k in SHAPE}, "r": args.rank, "alpha": 2 * args.rank,
            "dropout": args.dropout, "targets": ",".join(args.targets)}


def _rows(meta, samples, memory, peaks, tokens: int) -> list[dict]:
    """One CSV row per (mode, provider), ratios to base and to PEFT in the same run."""
    med = {key: stats(s)[0] for key, s in samples.items()}
    rows = []
    for (mode, name), s in samples.items():
        m, p20, p80 = stats(s)
        base, ref = med.get((mode, "base")), med.get((mode, "peft_two"))
        saved, state = memory.get(name, (None, None))
        train = mode == "train_step"
        rows.append({**meta, "mode": mode, "provider": name, "median_ms": f"{m:.3f}",
                     "p20_ms": f"{p20:.3f}", "p80_ms": f"{p80:.3f}",
                     "tokens_per_s": f"{tokens / m * 1e3:.1f}",
                     "ratio_to_base": f"{m / base:.4f}" if base else "",
                     "speedup_vs_peft_two": f"{ref / m:.4f}" if ref else "",
                     "saved_mb": f"{saved / MB:.1f}" if train and saved is not None else "",
                     "train_state_mb": f"{(saved + state) / MB:.1f}"
                     if train and saved is not None else "",
                     "peak_mb": f"{peaks[(mode, name)] / MB:.1f}" if peaks else ""})
    rows.sort(key=lambda r: (PROVIDERS.index(r["provider"]), r["mode"]))
    return rows


def _build_all(args, device, dtype) -> tuple[dict, dict]:
    """(providers that built and ran once, {name: error} of those that did not): a provider
    that fails (a peft incompatibility, say) is a row with its error, not a lost run."""
    provs, failed = {}, {}
    for name in args.providers:
        try:
            prov = build(name, args, device, dtype)
            prov.forward()
            prov.loss_backward()
            if prov.opt is not None:
                prov.opt.zero_grad(set_to_none=True)
            provs[name] = prov
        except Exception as err:  # noqa: BLE001 - reported as the provider's row
            failed[name] = f"{type(err).__name__}: {' '.join(str(err).split())}"[:240]
            print(f"{name} failed: {failed[name]}", file=sys.stderr, flush=True)
    return provs, failed


def main(argv=None) -> list[dict]:
    ap = _parser()
    args = ap.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    name = args.dtype if args.dtype != "auto" else default_base_dtype(device)[0]
    dtype = base_dtype(name)
    _fill_defaults(ap, args, cuda)
    stem = "model_smollm2" if args.model == "smollm2" else "model"
    csv_path = args.csv or common.RESULTS_DIR / f"{stem}_{'gpu' if cuda else 'cpu'}.csv"
    meta = _meta(args, stem, device, dtype)
    provs, failed = _build_all(args, device, dtype)
    memory = {name: train_state(p) for name, p in provs.items() if p.opt}
    fns = {}
    for name, p in provs.items():
        fns[("forward", name)] = p.forward
        fns[("train_step", name)] = p.train_step  # base: forward + input-grad backward
    print(f"timing {len(fns)} callables x {args.repeats} repeats", file=sys.stderr, flush=True)
    samples = common.time_alternating(fns, args.repeats, warmup=1)
    peaks = {key: cuda_peak(fn) for key, fn in fns.items()} if cuda else {}
    rows = _rows(meta, samples, memory, peaks, args.batch * args.seq)
    rows += [{**meta, "mode": mode, "provider": name, "error": error}
             for name, error in failed.items() for mode in ("forward", "train_step")]
    # The SmolLM2 CSV (new with it) also records the targets; the synthetic CSV keeps its
    # original header (its rows all use the default seven targets).
    fields = FIELDS + ["targets"] if args.model == "smollm2" else FIELDS
    common.append_rows(csv_path, rows, fields)
    print("# " + ", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("run_id", "bench"))
          + f", repeats {args.repeats}")
    print(markdown(rows))
    if not args.no_plot:
        print(f"plot: {draw(csv_path, csv_path.with_suffix('.png'))}")
    return rows


if __name__ == "__main__":
    main()
