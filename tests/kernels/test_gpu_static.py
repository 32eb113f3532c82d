"""The static GPU gate (bench/gpu_static.py --gate): the project's Triton kernels compiled
ahead of time, without a GPU, at every config the dispatcher, the tests and the benchmarks
launch: sm_90a in bf16, fp16, fp32 (ieee) and tf32, sm_80 in bf16. None may spill or overflow
shared memory, and every sm_90a prefill kernel on the tensor cores must use HGMMA. Plus the
schedule arithmetic the report's extra_mma_frac column comes from (kernels/triton_schedule.py)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
# ~830 cold compiles: 1708 s on 2 cores beside another compile job; the banked op's ~400 more
# took 347 s alone (bench/gpu_static.py --gate --banked)
pytestmark = pytest.mark.slow

from feddpa_fast.kernels import triton_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from op_gpu import PREFILL  # noqa: E402


def _compiler_env():
    """The interpreter is on for the test session (conftest); compiling needs it off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_static_gate_passes(tmp_path):
    out = tmp_path / "gate.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_static.py"), "--gate",
                           "--csv", str(out)], capture_output=True, text=True,
                          env=_compiler_env(), timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader(open(out)))
    assert {(r["target"], r["dtype"]) for r in rows} == {
        ("sm_90a", d) for d in ("bf16", "fp16", "fp32", "tf32")} | {("sm_80", "bf16")}
    kernels = {r["kernel"] for r in rows}
    assert {"fwd", "fwd_pointer_loads", "dx", "dx_dy_only", "dy_pass", "dA",
            "dA_dropout", "decode", "gemm", "dropout_shrink",
            "dropout_expand", "fwd_pertile", "split_shrink"} <= kernels
    # The banked op's launches (bench/gpu_launches_banked.py), every mode of its backward.
    assert {"banked_gemm", "banked_dx_gemm", "banked_shrink", "banked_shrink_dropout",
            "banked_expand", "banked_g_db", "banked_g", "banked_dx_da", "banked_dx",
            "banked_da", "banked_dx_da_dropout", "banked_dx_dropout",
            "banked_da_dropout"} <= kernels
    # Every shape the GPU tests run is among the compiled cases, in every dtype.
    from gpu_launches import GPU_TEST_PROBLEMS
    cases = {(r["dtype"], r["case"]) for r in rows if r["target"] == "sm_90a"}
    for m, k, n, r in GPU_TEST_PROBLEMS:
        for dtype in ("bf16", "fp16", "fp32"):
            assert (dtype, f"test M={m} K={k} N={n} R={r}") in cases
    from gpu_launches_banked import BANKED_GPU_TEST_PROBLEMS
    for m, k, n, r, b, c in BANKED_GPU_TEST_PROBLEMS:
        for dtype in ("bf16", "fp16", "fp32"):
            assert (dtype, f"banked test M={m} K={k} N={n} r={r} B={b} clients={c}") in cases
    for r in rows:
        assert r["ok"] == "ok", r
        assert int(r["spill_bytes"]) == 0 and int(r["stl"]) == 0 and int(r["ldl"]) == 0, r
        assert int(r["smem_bytes"]) <= int(r["smem_limit"]), r
    # The fp32 decode at M = 64 (its old 64 x 64 x 128 s4 tile needed 245,760 B) fits now.
    decode64 = [r for r in rows if r["kernel"] == "decode" and r["dtype"] == "fp32"
                and r["source"] == "dispatched" and " M=64 " in f" {r['case']} "]
    assert decode64 and all(int(r["smem_bytes"]) <= 232448 for r in decode64)
    # The dispatched sm_90a prefill forward loads through TMA with HGMMA within the budget.
    fwd = [r for r in rows if r["target"] == "sm_90a" and r["kernel"] == "fwd"
           and r["source"] == "dispatched" and r["case"].startswith("prefill")
           and r["dtype"] in ("bf16", "fp16")]
    assert fwd and all(r["tma"] == "yes" and r["mma"] == "HGMMA" for r in fwd)
    # The banked prefill kernels on the tensor cores use wgmma too (judge() requires it).
    banked = [r for r in rows if r["target"] == "sm_90a" and r["kernel"].startswith("banked")
              and r["case"].startswith("banked prefill") and r["dtype"] != "fp32"]
    assert banked and all(r["mma"] == "HGMMA" for r in banked)
    assert all(float(r["extra_mma_frac"]) <= triton_schedule.EXTRA_MMA_BUDGET for r in fwd)
    # tf32 runs on the tensor cores (HGMMA); ieee fp32 on FMA units.
    tf32 = [r for r in rows if r["dtype"] == "tf32" and r["kernel"] == "fwd"
            and r["target"] == "sm_90a" and r["case"].startswith("prefill")]
    assert tf32 and all(r["mma"] == "HGMMA" for r in tf32)


def _probe(what: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "static_probe.py"), what],
                          capture_output=True, text=True, env=_compiler_env(), timeout=300,
                          cwd=ROOT)
    return proc.stdout + proc.stderr[-3000:]


def test_static_report_sees_a_spill():
    """The reader is not blind: a 128 x 256 x 32 tile at 4 warps on sm_80 (pointer loads)
    spills."""
    out = _probe("spill")
    spills, regs, spill_bytes, stl = out.split("SPILLS")[1].split()[:4]
    assert spills == "True" and int(spill_bytes) > 1000 and int(stl) > 0, out
    assert out.split("SPILLS")[1].splitlines()[0].strip().endswith("HMMA"), out


def _simulated_extra(m, n, block_m, block_n, block_r, programs):
    """Recompute of u counted program by program, as the kernel partitions the tiles."""
    row_blocks = -(-m // block_m)
    col_tiles = -(-n // block_n)
    chunks = programs // row_blocks
    shrinks = 0
    for pid in range(programs):
        chunk = pid % chunks
        first, end = chunk * col_tiles // chunks, (chunk + 1) * col_tiles // chunks
        assert end > first, "a program without tiles"
        shrinks += 1  # one u per program, whatever the run length
    base = row_blocks * col_tiles * block_m * block_n  # per unit of K
    return (shrinks - row_blocks) * block_m * block_r / base


@pytest.mark.parametrize("m,k,n,r", PREFILL)
@pytest.mark.parametrize("tiles", [(128, 256), (128, 128), (64, 256), (64, 128)])
def test_forward_recompute_within_budget_at_benchmark_shapes(m, k, n, r, tiles):
    block_m, block_n = tiles
    block_r = 32  # two branches of rank 16
    for sms in (108, 132):
        s = triton_schedule.forward_schedule(m, n, block_m, block_n, block_r, sms, True)
        assert s.extra_mma_frac <= triton_schedule.EXTRA_MMA_BUDGET
        assert s.extra_mma_frac == pytest.approx(
            _simulated_extra(m, n, block_m, block_n, block_r, s.programs))


def test_schedule_figures():
    s = triton_schedule.forward_schedule(8192, 4096, 128, 256, 32, 132, True)
    assert (s.programs, s.chunks, s.extra_mma_frac) == (128, 2, 1 / 128)
    s = triton_schedule.forward_schedule(2048, 4096, 128, 256, 32, 132, True)
    assert (s.programs, s.chunks, s.extra_mma_frac) == (48, 3, 0.015625)
    # The per-tile schedule it replaces: (16 - 1) * 32 / 4096 = 11.7 % at N = 4096.
    old = triton_schedule.pertile_schedule(8192, 4096, 128, 256, 32)
    assert old.extra_mma_frac == pytest.approx(15 * 32 / 4096)
    # dx has no u: no budget, and no recompute.
    dx = triton_schedule.forward_schedule(8192, 4096, 128, 256, 32, 132, False)
    assert dx.extra_mma_frac == 0
    # Backward grids fill the SMs at M = 2048 (were 32 programs for dy and dA at K = 4096).
    assert triton_schedule.dy_schedule(2048, 4096, 64, 128, 132).programs >= 0.9 * 132
    assert triton_schedule.da_schedule(2048, 4096, 64, 128, 132).programs >= 0.9 * 132


def test_schedule_never_exceeds_budget_on_random_shapes():
    import random
    rng = random.Random(0)
    for _ in range(500):
        m, n = rng.randint(65, 40000), rng.randint(16, 30000)
        bm, bn = rng.choice([64, 128]), rng.choice([64, 128, 256])
        br = rng.choice([16, 32, 64])
        s = triton_schedule.forward_schedule(m, n, bm, bn, br, rng.choice([108, 132]), True)
        assert 1 <= s.chunks <= s.col_tiles
        assert s.extra_mma_frac <= triton_schedule.EXTRA_MMA_BUDGET + 1e-12


def test_autotune_prune_drops_what_the_static_compile_rejects():
    """The CUDA autotuner's prune, run here for sm_80 on a real launch's arguments (meta
    tensors): the spilling 128 x 256 x 32 tile is dropped, the clean one stays; with nothing
    clean (a 1 KB shared-memory limit) the smallest-memory config survives; and the same
    through Triton's own Autotuner, which passes grid / warmup along."""
    out = _probe("prune")
    assert "KEPT [128]" in out, out
    assert "TIGHT [" in out and "TIGHT []" not in out
    assert "TRITON [128]" in out
