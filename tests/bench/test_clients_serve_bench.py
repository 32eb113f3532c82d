"""bench/clients_serve.py on a finished tiny 3-client run: both providers give the same answers,
and the script writes its CSV rows (and the generate plot)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from fed_fixtures import causal_lm_data_dir, tiny_cfg, tiny_llama_dir

from feddpa_fast.fed.runner import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bench")
    model_dir, data_dir = tiny_llama_dir(root), causal_lm_data_dir(root, clients=3)
    run(tiny_cfg(model_dir, root / "run", algo="feddpa-t", task="causal-lm", data=str(data_dir),
                 clients=3, max_new_tokens=4, test_limit=4), progress=False)
    return root / "run"


@pytest.mark.parametrize("what", ["generate", "eval"])
def test_script_writes_rows(lm_run, tmp_path, what):
    out_csv = tmp_path / "clients_serve.csv"
    cmd = [sys.executable, str(ROOT / "bench" / "clients_serve.py"), what, "--run", str(lm_run),
           "--prompts", "2", "--reps", "2", "--csv", str(out_csv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["provider"] for r in rows] == ["batched", "per_client"]
    assert all(r["clients"] == "3" and float(r["median_s"]) > 0 for r in rows)
    count = 6 if what == "generate" else 36  # 3 x 2 prompts; 3 clients x 6 tests x 2 weightings
    assert all(r["same_answers"] == f"{count}/{count}" for r in rows)
    if what == "generate":
        assert all(float(r["tokens_per_s"]) > 0 for r in rows)
        assert out_csv.with_suffix(".png").stat().st_size > 1000
    else:
        assert not out_csv.with_suffix(".png").exists()
