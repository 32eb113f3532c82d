"""bench/cohort_round.py times whole trainer rounds, cohort against one client at a time, and
appends a row per method and side (tiny Llama: a few seconds)."""
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def test_cohort_benchmark_times_both_sides(tmp_path, capsys):
    import cohort_round
    from fed_fixtures import causal_lm_data_dir, tiny_llama_dir

    model, data = tiny_llama_dir(tmp_path), causal_lm_data_dir(tmp_path)
    out = tmp_path / "cohort.csv"
    assert cohort_round.main(["--model", str(model), "--data", str(data), "--clients", "3",
                              "--steps", "2", "--batch", "2", "--reps", "2", "--memory",
                              "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["algo"], r["provider"]) for r in rows] == [
        ("fedit", "sequential"), ("fedit", "cohort"), ("feddpa-t", "sequential"),
        ("feddpa-t", "cohort")]
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["tokens_per_s"]) > 0
        assert 0 <= float(r["padding"]) < 1 and float(r["peak_rss_mb"]) >= 0
    by_side = {(r["algo"], r["provider"]): r for r in rows}
    for algo in ("fedit", "feddpa-t"):
        assert float(by_side[(algo, "cohort")]["x_cohort"]) == 1.0
        # the cohort pads each pass to its longest row: never less padding than alone
        assert (float(by_side[(algo, "cohort")]["padding"])
                >= float(by_side[(algo, "sequential")]["padding"]))
    assert "| feddpa-t | cohort |" in capsys.readouterr().out
