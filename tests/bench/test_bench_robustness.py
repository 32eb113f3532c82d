"""The robustness benchmark (bench/robustness.py) on a tiny BERT: a row per (attack, rule) with
scores in [0, 1], and the property it measures, checked on the aggregation rules directly:
one x1000-scaled update moves FedAvg far from the clean aggregate, not median / trimmed mean."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import torch
from fed_fixtures import tiny_bert_dir

from feddpa_fast.fed.aggregate import aggregate

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_robustness",
                                                  ROOT / "bench" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_robustness_benchmark_tiny_grid(tmp_path, capsys):
    bench = _load_bench()
    model = tiny_bert_dir(tmp_path)
    out_csv = tmp_path / "robustness.csv"
    bench.main(["--model", str(model), "--clients", "2", "--rounds", "1", "--max-steps", "1",
                "--test-limit", "4", "--attacks", "none,scale", "--rules", "clip,uniform,median",
                "--out", str(tmp_path / "runs"), "--csv", str(out_csv)])
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["attack"], r["rule"]) for r in rows] == [
        (a, r) for a in ("none", "scale") for r in ("uniform", "median", "clip")]  # clip last
    for row in rows:
        assert row["device"] and row["date"] and row["torch"] and "clients=2" in row["config"]
        for key in ("P_honest", "TTP_honest", "P_all", "TTP_all"):
            assert 0.0 <= float(row[key]) <= 1.0, row
        assert float(row["wall_s"]) >= 0
        assert (float(row["clip_norm"]) > 0) if row["rule"] == "clip" else not row["clip_norm"]
        assert (tmp_path / "runs" / f"{row['attack']}-{row['rule']}" / "results.json").is_file()
    # the recorded round-0 norms: the hostile client's update is 1000x its clean one
    norms = json.loads((tmp_path / "runs" / "update_norms.json").read_text())
    clean, scaled = norms["none-uniform"][0], norms["scale-uniform"][0]
    assert math.isclose(scaled[0], 1000 * clean[0], rel_tol=1e-3)
    assert math.isclose(scaled[1], clean[1], rel_tol=1e-6)
    out = capsys.readouterr().out
    assert "| rule | clean P / TTP (%) | scale x1000 P / TTP (%) |" in out
    assert "| median |" in out and "| clip (L2 <= " in out


def test_scaled_update_moves_fedavg_not_median_or_trimmed_mean():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.lora_A.weight": (4, 6), "a.lora_B.weight": (6, 4)}
    global_adapter = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    # 8 honest updates: a shared direction plus client noise
    direction = {k: 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    honest = [{k: global_adapter[k] + direction[k] + 0.02 * torch.randn(s, generator=gen)
               for k, s in shapes.items()} for _ in range(8)]
    hostile = [{k: global_adapter[k] + 1000 * (u[k] - global_adapter[k]) for k in u}
               if i == 0 else u for i, u in enumerate(honest)]
    counts = [100] * 8
    step = math.sqrt(sum(float(d.square().sum()) for d in direction.values()))

    def dist(rule, updates, **kw):
        clean = aggregate("uniform", global_adapter, honest, counts)
        got = aggregate(rule, global_adapter, updates, counts, **kw)
        return math.sqrt(sum(float((got[k] - clean[k]).square().sum()) for k in clean))

    # FedAvg: global + (1000 d_0 + sum of the others) / 8, about 125 honest steps away
    assert dist("uniform", hostile) > 50 * step
    assert dist("fedavg", hostile) > 50 * step
    # median and trimmed mean (trim 0.125: one value dropped at each end) ignore the outlier
    assert dist("median", hostile) < 0.25 * step
    assert dist("trimmed-mean", hostile, trim=0.125) < 0.25 * step
    # clipping to an honest-sized bound caps the damage at about one honest step / 8
    assert dist("uniform", hostile, clip_norm=step) < 0.5 * step
    # trim below 1/8 drops nothing with 8 clients: the mean again
    assert dist("trimmed-mean", hostile, trim=0.1) > 50 * step
