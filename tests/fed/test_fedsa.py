"""FedSA-LoRA (fed/algorithms/fedsa.py): only the A factors travel and are aggregated, each
client's B stays its own and untouched by the server, evaluation with the shared A and the
own B (resume after a kill: test_fedalt.py, for both methods)."""
import torch
from fed_fixtures import tiny_cfg
from safetensors.torch import load_file

from feddpa_fast.adapters import adapter_state_dict
from feddpa_fast.fed.checkpoint import load_checkpoint
from feddpa_fast.fed.runner import build_run


def test_only_a_travels_and_the_server_averages_it(finished_run):
    results, out, uploads = finished_run("fedsa")
    assert 0 <= results["P"] <= 1 and 0 <= results["TTP"] <= 1
    state, _ = load_checkpoint(out / "checkpoint.safetensors")
    assert state and all(".lora_A." in k for k in state)
    assert uploads and all(all(".lora_A." in k for k in t) for _, t in uploads)
    last = [t for meta, t in uploads if meta["round"] == 1]
    assert len(last) == 2  # uniform aggregation (the run's default): the plain mean of A
    for k, v in state.items():
        torch.testing.assert_close(v, (last[0][k].double() + last[1][k].double()).div(2).float(),
                                   rtol=0, atol=1e-7)
    shared = load_file(out / "adapters" / "shared_lora_A.safetensors")
    assert shared.keys() == state.keys()
    # the A factors are what travels: half the adapter on the tiny BERT's 32 x 32 q / v
    adapter = load_file(out / "adapters" / "sentiment" / "local" / "adapter_model.safetensors")
    full = sum(v.numel() * 4 for v in adapter.values())
    assert results["global_adapter_bytes"] == full // 2
    assert full // 2 < results["bytes_per_client_round"] < full // 2 + 16384


def test_a_client_gets_the_shared_a_and_keeps_its_own_b(bert_dir, tmp_path):
    run = build_run(tiny_cfg(bert_dir, tmp_path / "run", algo="fedsa"))
    run.run(progress=False)
    files = {n: load_file(tmp_path / "run" / "clients" / n / "local_r0001.safetensors")
             for n in run.clients}
    b_keys = [k for k in next(iter(files.values())) if ".lora_B." in k]
    assert b_keys and any(not torch.equal(files["sentiment"][k], files["product"][k])
                          for k in b_keys)  # two different B, each trained on its own data
    for name, client in run.clients.items():
        run.algorithm.receive(client, run.server.message(name), None)
        local = adapter_state_dict(client.task.model, "local")
        for k, v in local.items():
            want = run.server.global_adapter[k] if ".lora_A." in k else files[name][k]
            assert torch.equal(v, want), k
        exported = load_file(tmp_path / "run" / "adapters" / name / "local" /
                             "adapter_model.safetensors")
        assert all(torch.equal(exported[k], local[k]) for k in local)  # what was evaluated
