"""The model benchmark (bench/model.py) runs end to end on a tiny Llama, on the CPU: one row per
provider and mode, positive finite numbers, and the plot drawn from the CSV."""
import csv
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_bench_model():
    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "bench" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_benchmark_tiny_config(tmp_path, capsys):
    bench_model = _load_bench_model()
    out_csv = tmp_path / "model.csv"
    bench_model.main(["--device", "cpu", "--layers", "1", "--hidden", "64", "--heads", "4",
                      "--kv-heads", "2", "--vocab", "128", "--seq", "16", "--batch", "2",
                      "--repeats", "1", "--csv", str(out_csv)])
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (mode, p) for mode in ("forward", "train_step") for p in bench_model.PROVIDERS}
    for row in rows:
        assert row["device"] and row["date"] and row["torch"] and row["peft"]
        assert (row["layers"], row["hidden"], row["seq"], row["batch"]) == ("1", "64", "16", "2")
        numbers = [float(row[k]) for k in ("median_ms", "p20_ms", "p80_ms", "tokens_per_s")]
        numbers.append(float(row["ratio_to_base"]))
        if row["mode"] == "train_step" and row["provider"] != "base":  # base: nothing to train
            numbers += [float(row["saved_mb"]), float(row["train_state_mb"]),
                        float(row["speedup_vs_peft_two"])]
            # the adapter state (params + grads + AdamW moments) comes on top of the activations
            assert float(row["train_state_mb"]) > float(row["saved_mb"])
        assert all(math.isfinite(v) and v > 0 for v in numbers), row
    assert out_csv.with_suffix(".png").stat().st_size > 1000
    assert "| fused |" in capsys.readouterr().out
