"""Run by tests/kernels/test_gpu_static.py in a subprocess without TRITON_INTERPRET (the session's
interpreter would turn the kernels into Python): static compiles of one forward launch plan
(8192 x 4096 -> 4096, R = 32, meta tensors) for sm_80.

    python tests/static_probe.py spill | prune
"""
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from gpu_launches import meta  # noqa: E402

from feddpa_fast.kernels import triton_autotune, triton_forward, triton_static  # noqa: E402
from feddpa_fast.kernels.triton_config import FwdConfig  # noqa: E402


def launch(tiles, warps):
    bf16 = torch.bfloat16
    return triton_forward.forward_plan(
        meta(8192, 4096, dtype=bf16), meta(4096, 4096, dtype=bf16), meta(4096, dtype=bf16),
        meta(32, 4096, dtype=bf16), meta(4096, 32, dtype=bf16),
        meta(8192, 32, dtype=torch.float32), meta(8192, 4096, dtype=bf16),
        meta(8192, 32, dtype=torch.float32), use_tma=False, cfg=FwdConfig(*tiles, 32, warps, 3),
        sms=108)


def spill():
    # 128 x 256 fp32 accumulators over 4 warps: 256 registers a thread for them alone.
    rep = triton_static.compile_report(launch((128, 256, 32), warps=4), "sm_80")
    print("SPILLS", rep.spills, rep.regs, rep.spill_bytes, rep.stl, rep.mma)


def prune():
    plan = launch((128, 128, 64), warps=8)
    args = {k: v for k, v in plan.args.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    spilling = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8,
                             num_stages=3)
    clean = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8,
                          num_stages=3)

    def widths(configs):
        return [c.kwargs["BLOCK_N"] for c in configs]

    kept = triton_autotune.prune([spilling, clean], {}, plan.kernel, "sm_80", 166912, **args)
    print("KEPT", widths(kept))
    kept = triton_autotune.prune([spilling, clean], {}, plan.kernel, "sm_80", 1024, **args)
    print("TIGHT", widths(kept))
    # Through Triton's own Autotuner, which passes launch options (grid, warmup) along.
    tuner = triton.autotune(configs=[spilling, clean], key=["m_bucket"], prune_configs_by={
        "early_config_prune": lambda cs, nargs, **kw: triton_autotune.prune(
            cs, nargs, plan.kernel, "sm_80", 166912, **kw)})(plan.kernel)
    tuner.nargs = {}
    print("TRITON", widths(tuner.prune_configs({**args, "grid": (1,), "warmup": False})))


if __name__ == "__main__":
    {"spill": spill, "prune": prune}[sys.argv[1]]()
