"""The model benchmark (bench/model.py) runs end to end on a tiny Llama, on the CPU: one row per
provider and mode, positive finite numbers, and the plot drawn from the CSV; and on the real
SmolLM2 (slow)."""
import csv
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
                      "--repeats", "1", "--dropout", "0.1", "--dtype", "fp32",
                      "--csv", str(out_csv)])
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (mode, p) for mode in ("forward", "train_step") for p in bench_model.PROVIDERS}
    saved = {r["provider"]: float(r["saved_mb"]) for r in rows
             if r["mode"] == "train_step" and r["provider"] != "base"}
    # In-op dropout saves no dropped copy of x: less than the materialised path.
    assert saved["fused"] < saved["materialised_dropout"]
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


@pytest.mark.slow
def test_model_benchmark_on_smollm2(tmp_path, capsys):
    """--model smollm2: the real pretrained model (sizes from its config), every provider."""
    bench_model = _load_bench_model()
    out_csv = tmp_path / "smollm2.csv"
    bench_model.main(["--device", "cpu", "--model", "smollm2", "--seq", "8", "--batch", "2",
                      "--repeats", "1", "--providers", "base", "fused", "peft_two",
                      "--csv", str(out_csv), "--no-plot"])
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (mode, p) for mode in ("forward", "train_step") for p in ("base", "fused", "peft_two")}
    for row in rows:
        assert row["bench"] == "model_smollm2_cpu"
        assert (row["layers"], row["hidden"], row["vocab"], row["seq"]) == ("30", "576",
                                                                          "49152", "8")
        assert math.isfinite(float(row["median_ms"])) and float(row["median_ms"]) > 0
    assert "| fused |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the sizes come from the model
        bench_model.main(["--model", "smollm2", "--layers", "2", "--csv", str(out_csv)])
