"""bench/router_step.py times FedALT's routed step against FedDPA-T's local-phase step on the
same client and batch and appends a row per side (tiny Llama: a few seconds)."""
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def test_router_step_benchmark_times_both_phases(tmp_path, capsys):
    import router_step
    from fed_fixtures import causal_lm_data_dir, tiny_llama_dir

    model, data = tiny_llama_dir(tmp_path), causal_lm_data_dir(tmp_path)
    out = tmp_path / "router.csv"
    assert router_step.main(["--model", str(model), "--data", str(data), "--batch", "2",
                             "--reps", "3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["feddpa-t-local", "fedalt"]
    assert all(float(r["median_ms"]) > 0 and int(r["tokens"]) > 0 for r in rows)
    assert float(rows[0]["x_feddpa"]) == 1.0 and float(rows[1]["x_feddpa"]) > 0
    assert "| fedalt |" in capsys.readouterr().out


def test_the_fedalt_side_trains_the_routers(tmp_path):
    """The timed FedALT step is a real step: its routers move."""
    import router_step
    import torch
    from fed_fixtures import causal_lm_data_dir, tiny_llama_dir

    from feddpa_fast.fed.algorithms.base import Phase
    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.runner import build_run

    cfg = RunConfig(algo="fedalt", model=str(tiny_llama_dir(tmp_path)), task="causal-lm",
                    data=str(causal_lm_data_dir(tmp_path)), clients=1, batch_size=2,
                    out=str(tmp_path / "out"))
    run = build_run(cfg)
    client = next(iter(run.clients.values()))
    client.load_local(None)
    before = [p.detach().clone() for p in run.algorithm.routers.parameters()]
    step = router_step._step(client, run.algorithm.train_target(client, Phase("i", "local",
                                                                               (1, 1))),
                             client.fit[:2])
    step()  # B is zero at init: the routers' gradient is too, until B has moved
    step()
    after = list(run.algorithm.routers.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
