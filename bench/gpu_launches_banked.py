"""Every Triton launch of one banked call (lora_linear_banked: rows of one call use different
adapters of a bank), as the dispatcher plans it (kernels/triton_banked_passes.py), on the meta
device: what the static report (bench/gpu_static.py) compiles beside the plain op's launches
(bench/gpu_launches.py, whose Problem carries ``branches`` and ``clients`` for these).

A banked problem is (M, K, N, r) with B branches of rank r each (J = B r stacked columns) over
``clients`` equal segments. Its launches: the frozen GEMM forward (``banked_gemm``, with every
autotune candidate at prefill) and dx (``banked_dx_gemm``), the forward shrink
(``banked_shrink``, ``banked_shrink_dropout``) and expand (``banked_expand``), the backward's
shrink (``banked_g_db``: g and d bank_b; ``banked_g``: g alone) and expand in every mode the
backward can ask for (dx and d bank_a, dx alone, d bank_a alone; each plain and under the
dropout mask).
"""
from __future__ import annotations

import torch

from feddpa_fast.kernels import triton_banked, triton_banked_passes, triton_launch
from feddpa_fast.kernels.triton_banked_segments import even_blocks
from feddpa_fast.kernels.triton_config import (
    DECODE_MAX_M,
    aligned,
    decode_default,
    fwd_default,
)

# The shapes tests/kernels/test_kernels_triton_gpu.py runs the banked op at ((M, K, N, r, B,
# clients)): the gate compiles every launch they make, in every dtype.
BANKED_GPU_TEST_PROBLEMS = [(11, 48, 40, 8, 2, 4), (67, 80, 96, 16, 2, 5),
                            (300, 1000, 1030, 24, 2, 9), (1024, 4096, 4096, 16, 2, 8)]

_DROPOUT = triton_banked_passes.InOpDropout(0.05, torch.empty(0))
# (kernel name, NEED_OUT, NEED_DBANK, masked) of the backward's expand.
_DX_MODES = [("banked_dx_da", True, True, False), ("banked_dx", True, False, False),
             ("banked_da", False, True, False), ("banked_dx_da_dropout", True, True, True),
             ("banked_dx_dropout", True, False, True), ("banked_da_dropout", False, True, True)]


def banked_cases(p, dtype: torch.dtype, target: str, sms: int, add, candidates) -> None:
    """Calls ``add(kernel, config, source, launch, prefill=...)`` for every launch of the banked
    problem ``p``; ``candidates(dispatched, tma)`` lists (config, source) of the GEMM."""
    from gpu_launches import meta
    m, k, n, r, branches = p.m, p.k, p.n, p.r, p.branches
    j, adapters = branches * r, p.clients + 1
    prefill = m > DECODE_MAX_M
    x, w, bias = meta(m, k, dtype=dtype), meta(n, k, dtype=dtype), meta(n, dtype=dtype)
    dy = meta(m, n, dtype=dtype)
    bank_a, bank_b = meta(adapters, r, k, dtype=dtype), meta(adapters, n, r, dtype=dtype)
    index = meta(m, branches, dtype=torch.int64)
    scale, u = meta(m, j, dtype=torch.float32), meta(m, j, dtype=torch.float32)
    seeds = meta(adapters, dtype=torch.int64)
    tma_ok = target != "sm_80" and dtype != torch.float32
    for kernel, a2, cols, red, w_t, b in (("banked_gemm", x, n, k, False, bias),
                                          ("banked_dx_gemm", dy, k, n, True, None)):
        tma = tma_ok and triton_launch.tma_rows_aligned(dtype.itemsize, k, n if w_t else k)
        is_aligned = aligned(red, cols)
        if prefill:
            dispatched = fwd_default(target, cols, 16, is_aligned, dtype, tma, gemm=True)
            configs = candidates(dispatched, tma) if kernel == "banked_gemm" else [
                (dispatched, "dispatched")]
        else:
            configs = [(decode_default(target, m, 16, is_aligned, dtype), "dispatched")]
        for cfg, source in configs:
            launch = triton_banked_passes.gemm_plan(a2, w, b, meta(m, cols, dtype=dtype),
                                                    w_t=w_t, cfg=cfg, sms=sms, use_tma=tma)
            add(kernel, cfg.label(), source, launch, prefill=prefill)
    a_view, b_view = triton_banked.a_view(bank_a), triton_banked.b_view(bank_b)
    for dropout in (None, _DROPOUT):
        tiles = triton_banked.banked_tiles(m, dtype, dropout is not None, j,
                                           aligned(k, n))
        blocks = even_blocks(m, p.clients, tiles.block_m)
        common = dict(order=blocks.order, table=blocks.table, index=index, tiles=tiles)
        shrink = triton_banked.shrink_plan(x, a_view, out=u, dropout=dropout,
                                           dropout_seed=seeds, **common)
        add("banked_shrink" + ("_dropout" if dropout else ""), tiles.label("shrink"),
            "dispatched", shrink, prefill=prefill)
        if dropout is None:
            expand = triton_banked.expand_plan(u, scale, b_view, out=meta(m, n, dtype=dtype),
                                               columns=n, **common)
            add("banked_expand", tiles.label("expand"), "dispatched", expand, prefill=prefill)
            for kernel, need_db in (("banked_g_db", True), ("banked_g", False)):
                db = triton_banked.b_view(meta(adapters, n, r, dtype=torch.float32))
                g_pass = triton_banked.shrink_plan(dy, b_view, out=meta(m, j, dtype=torch.float32),
                                                   v=u, scale=scale,
                                                   dbank=db if need_db else None, **common)
                add(kernel, tiles.label("shrink"), "dispatched", g_pass, prefill=prefill)
        for kernel, need_out, need_da, masked in _DX_MODES:
            if masked != (dropout is not None):
                continue
            da = triton_banked.a_view(meta(adapters, r, k, dtype=torch.float32))
            launch = triton_banked.expand_plan(
                u, scale, a_view, out=meta(m, k, dtype=dtype) if need_out else None, columns=k,
                factor=1.0 / 0.95 if masked else 1.0, x=x if need_da else None,
                dbank=da if need_da else None, dropout=dropout, dropout_seed=seeds, **common)
            add(kernel, tiles.label("expand"), "dispatched", launch, prefill=prefill)
