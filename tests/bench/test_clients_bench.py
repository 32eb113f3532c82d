"""bench/clients.py: its providers compute the same thing, and the script writes its CSV rows and
plot on a tiny case."""
import csv
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import clients  # noqa: E402


def test_providers_agree():
    p = clients.make_problem(clients=3, rows=4, k=32, n=24, r=4)
    fns = clients.providers(p, "forward")
    with torch.no_grad():
        batched = clients.batched(p)
        torch.testing.assert_close(clients.per_client(p), batched)
        # PEFT cannot add the shared global: its rows equal the batched op's local branch alone.
        local_only = dict(p, scale=torch.cat([torch.zeros_like(p["scale"][:, :4]),
                                               torch.full_like(p["scale"][:, 4:], 2.0)], 1))
        torch.testing.assert_close(clients.peft_layer(p)(), clients.batched(local_only))
    assert set(fns) == {"base", "batched", "per_client", "peft"}


def test_script_writes_rows_and_plot(tmp_path):
    out_csv = tmp_path / "clients_op.csv"
    cmd = [sys.executable, str(ROOT / "bench" / "clients.py"), "--clients", "3", "--rows", "4",
           "--shapes", "32,24", "--reps", "3", "--csv", str(out_csv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["mode"], r["provider"]) for r in rows} == {
        ("forward", p) for p in ("base", "batched", "per_client", "peft")} | {
        ("fwd+bwd", p) for p in ("base", "batched", "per_client")}
    assert all(r["clients"] == "3" and r["rows_per_client"] == "4" for r in rows)
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert out_csv.with_suffix(".png").stat().st_size > 1000
    assert "| 3 x 4 | 32 -> 24 | forward |" in done.stdout
