"""Test session setup. Without a GPU the Triton kernels run in Triton's CPU interpreter, which
must be switched on before any kernel module is imported (triton.jit reads it at decoration).

The tests live in one folder per area (kernels/, patcher/, fed/, bench/); the helpers they
share (op_cases, tiny_models, fed_fixtures, static_probe) stay here, put on sys.path."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test`: 2 workers) each worker gets its share of the cores, and so do
# the subprocesses it starts (OMP_NUM_THREADS is inherited): 2 workers x 2 threads on 2 cores
# would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


def pytest_collection_modifyitems(items):
    """Longest first: the Flower deployments and the other `slow` tests start before the quick
    ones, so that under xdist no worker is left finishing a long test alone at the end (the
    eight-SuperNode deployment alone takes minutes; docs/testing.md)."""
    def weight(item):
        return -sum(item.get_closest_marker(m) is not None for m in ("flower", "slow"))
    items.sort(key=weight)  # stable: collection order within each weight
