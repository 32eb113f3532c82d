"""bench/round.py plays FedIT rounds on the trainer, a PEFT + HF Trainer loop and a plain PEFT
loop in one process and appends a row per side (tiny Llama: a few seconds)."""
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def test_round_benchmark_times_the_three_sides(tmp_path, capsys):
    import round as round_bench
    from fed_fixtures import causal_lm_data_dir, tiny_llama_dir

    model, data = tiny_llama_dir(tmp_path), causal_lm_data_dir(tmp_path)
    out = tmp_path / "round.csv"
    assert round_bench.main(["--model", str(model), "--data", str(data), "--clients", "2",
                             "--steps", "2", "--batch", "2", "--reps", "2",
                             "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["ours", "peft_trainer", "peft_loop"]
    assert all(float(r["median_s"]) > 0 and r["model"] == "custom" for r in rows)
    assert float(rows[0]["x_ours"]) == 1.0
    assert "| peft_trainer |" in capsys.readouterr().out


def test_every_side_trains_the_clients_on_the_same_batches(tmp_path):
    """The PEFT sides get the very tensors the trainer's task builds for each client."""
    import round as round_bench
    from fed_fixtures import causal_lm_data_dir, tiny_llama_dir

    model, data = tiny_llama_dir(tmp_path), causal_lm_data_dir(tmp_path)
    args = round_bench.argparse.Namespace(model=str(model), clients=2, steps=2, batch=3,
                                          dtype="fp32")
    _, run = round_bench.ours(args, data, tmp_path)
    batches = round_bench._client_batches(run, args)
    assert sorted(batches) == ["echo", "plural"]
    for name, client_batches in batches.items():
        assert len(client_batches) == 2 and client_batches[0]["input_ids"].shape[0] == 3
        ids, mask, labels, _ = run.task._training_batch(run.clients[name].fit[:3])
        assert (client_batches[0]["labels"] == labels).all()
