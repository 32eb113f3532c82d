"""FedALT (fed/algorithms/fedalt.py): the server's leave-one-out Rest-of-World mean, one
message per client, what travels, the routers trained and kept on the client, the individual
LoRA never reset, the options it refuses, and resume after a kill (FedSA-LoRA's too)."""
import pytest
import torch
from fed_fixtures import interrupted_then_resumed, tiny_cfg
from safetensors.torch import load_file

from feddpa_fast.adapters import adapter_state_dict
from feddpa_fast.fed import wire
from feddpa_fast.fed.algorithms.fedalt import FedALT, rest_of_world
from feddpa_fast.fed.checkpoint import load_checkpoint
from feddpa_fast.fed.run_config import ConfigError, RunConfig
from feddpa_fast.fed.runner import build_run
from feddpa_fast.fed.server import Server, ServerSettings
from feddpa_fast.layers import dual_lora_layers

KEYS = ("m.lora_A.weight", "m.lora_B.weight")


def _state(**clients):
    """A server state: the init (A ones, B zero) and each named client's (A, B) values."""
    state = {"init/" + KEYS[0]: torch.ones(2, 3), "init/" + KEYS[1]: torch.zeros(3, 2)}
    for name, (a, b) in clients.items():
        state[f"client/{name}/{KEYS[0]}"] = torch.full((2, 3), a)
        state[f"client/{name}/{KEYS[1]}"] = torch.full((3, 2), b)
    return state


def test_the_rest_of_world_is_the_leave_one_out_mean_of_a_and_b_separately():
    state = _state(x=(2.0, 1.0), y=(4.0, 3.0), z=(9.0, -4.0))
    clients = ["x", "y", "z"]
    rest = rest_of_world(state, "x", clients)
    assert set(rest) == set(KEYS)
    assert torch.equal(rest[KEYS[0]], torch.full((2, 3), 6.5))   # (4 + 9) / 2
    assert torch.equal(rest[KEYS[1]], torch.full((3, 2), -0.5))  # (3 - 4) / 2
    assert torch.equal(rest_of_world(state, "z", clients)[KEYS[0]], torch.full((2, 3), 3.0))
    # a client that has not uploaded yet counts as the init
    late = rest_of_world(state, "x", ["x", "y", "new"])
    assert torch.equal(late[KEYS[0]], torch.full((2, 3), 2.5))  # (4 + 1) / 2
    assert torch.equal(late[KEYS[1]], torch.full((3, 2), 1.5))  # (3 + 0) / 2
    alone = rest_of_world(state, "x", ["x"])  # nobody else: the init, whose B is zero
    assert torch.equal(alone[KEYS[0]], torch.ones(2, 3))
    assert torch.equal(alone[KEYS[1]], torch.zeros(3, 2))


def test_the_server_sends_each_client_its_own_rest_of_world_and_keeps_the_uploads():
    cfg = RunConfig(algo="fedalt", wire_dtype="bf16")
    server = Server(_state(), ["x", "y", "z"], ServerSettings.from_config(cfg), 0, FedALT(cfg))
    assert set(server.expected()) == set(KEYS)  # one adapter's keys, both ways
    replies = {n: wire.encode(wire.cast({KEYS[0]: torch.full((2, 3), v),
                                         KEYS[1]: torch.full((3, 2), -v)}, "bf16"),
                              {"round": 0, "client": n, "num_examples": 5})
               for n, v in (("x", 1.0), ("y", 2.0), ("z", 3.0))}
    _, accepted = server.aggregate_round(0, replies)
    assert accepted == ["x", "y", "z"]
    stored = server.global_adapter[f"client/y/{KEYS[0]}"]
    assert stored.dtype == torch.float32 and torch.equal(stored, torch.full((2, 3), 2.0))
    blobs = server.broadcasts(1, ["x", "z"])
    got = {n: wire.decode(b, server.expected(), round=1, sender="server")[0]
           for n, b in blobs.items()}
    assert torch.equal(got["x"][KEYS[0]].float(), torch.full((2, 3), 2.5))  # (2 + 3) / 2
    assert torch.equal(got["z"][KEYS[1]].float(), torch.full((3, 2), -1.5))  # -(1 + 2) / 2


def test_fedalt_refuses_aggregation_rules_and_dp_it_cannot_honour():
    with pytest.raises(ConfigError, match="leave-one-out"):
        RunConfig(algo="fedalt", aggregation="median")
    with pytest.raises(ConfigError, match="clip-norm"):
        RunConfig(algo="fedalt", clip_norm=1.0)
    with pytest.raises(ConfigError, match="dp-clip"):
        RunConfig(algo="fedalt", dp_clip=1.0)


def test_a_run_trains_the_individual_lora_and_routers_and_uploads_the_individual_lora(
        finished_run):
    results, out, uploads = finished_run("fedalt")
    assert 0 <= results["P"] <= 1 and 0 <= results["TTP"] <= 1
    names = sorted(results["per_client"])
    state, _ = load_checkpoint(out / "checkpoint.safetensors")
    for name in names:
        r0, r1 = (load_file(out / "clients" / name / f"local_r000{r}.safetensors")
                  for r in (0, 1))
        routers = [k for k in r0 if k.endswith(".router.weight")]
        assert routers and all(r0[k].shape[0] == 2 for k in routers)
        assert any(not torch.equal(r0[k], r1[k]) for k in routers)  # the routers learn
        sent = [t for meta, t in uploads if meta["client"] == name]
        assert len(sent) == 2 and not any(k.endswith(".router.weight") for k in sent[0])
        for r, tensors in enumerate(sent):  # the upload is the round's individual LoRA
            saved = (r0, r1)[r]
            assert all(torch.equal(v, saved[k]) for k, v in tensors.items())
            assert set(tensors) == {k for k in saved if k not in routers}
        for k, v in sent[1].items():  # the server keeps each client's latest upload
            assert torch.equal(state[f"client/{name}/{k}"], v)
        exported = out / "adapters" / name
        assert (exported / "local" / "adapter_model.safetensors").is_file()
        assert load_file(exported / "router.safetensors").keys() == set(routers)
    assert not (out / "adapters" / "global").exists()  # no global adapter in FedALT
    size = results["global_adapter_bytes"]  # one adapter travels each way
    assert size < results["bytes_per_client_round"] < size + 16384


def test_the_individual_lora_continues_and_the_rest_of_world_is_the_others(
        bert_dir, tmp_path, monkeypatch):
    from feddpa_fast.fed import client as client_mod

    started = []  # (client, its local adapter and routers as each phase starts)
    real_phase = client_mod.train_phase

    def recording(client, phase, seed):
        started.append((client.name, {**adapter_state_dict(client.task.model, "local"),
                                      **client.algorithm.routers.tensors()}))
        return real_phase(client, phase, seed)

    monkeypatch.setattr(client_mod, "train_phase", recording)
    # The spy is on the one-client loop's phases (tests/fed/test_cohort.py: a cohort is it).
    run = build_run(tiny_cfg(bert_dir, tmp_path / "run", algo="fedalt", clients=3, rounds=2,
                             cohort_size=1))
    run.run(progress=False)
    names = run.server.client_names
    for name in names:  # round 1 starts exactly where round 0 ended: never reset
        round0 = load_file(tmp_path / "run" / "clients" / name / "local_r0000.safetensors")
        second = [state for who, state in started if who == name][1]
        assert second.keys() == round0.keys()
        assert all(torch.equal(second[k], round0[k]) for k in round0)
        assert any(float(v.abs().sum()) > 0 for k, v in round0.items() if ".lora_B." in k)
    x = run.clients[names[0]]
    run.algorithm.receive(x, run.server.message(x.name), None)  # its final state, loaded
    rest = adapter_state_dict(x.task.model, "global")
    others = [load_file(tmp_path / "run" / "clients" / n / "local_r0001.safetensors")
              for n in names[1:]]
    for k, v in rest.items():  # the RoW is the mean of the two others' individual LoRAs
        torch.testing.assert_close(v, (others[0][k].double() + others[1][k].double()).div(2)
                                   .float(), rtol=0, atol=1e-7)
    # The evaluation routes: inside its context every layer holds this client's router.
    with run.algorithm.final_evaluation(x).context():
        assert all(layer._router is not None for _, layer in dual_lora_layers(x.task.model))
    assert all(layer._router is None for _, layer in dual_lora_layers(x.task.model))


def test_a_hostile_fedalt_client_scales_its_own_update(bert_dir, tmp_path, uploads_seen):
    """--hostile scale: the upload is (start of round) + 1000 x (its update), not taken from
    the Rest-of-World adapter it received."""
    sent = uploads_seen
    cfg = tiny_cfg(bert_dir, tmp_path / "run", algo="fedalt", rounds=1, hostile="scale",
                   hostile_clients=1, final_eval="none")
    run = build_run(cfg)
    run.run(progress=False)
    hostile = run.server.client_names[0]
    upload = next(t for meta, t in sent if meta["client"] == hostile)
    trained = load_file(tmp_path / "run" / "clients" / hostile / "local_r0000.safetensors")
    key = next(k for k in upload if ".lora_B." in k)  # B starts at 0: the update is B itself
    torch.testing.assert_close(upload[key], 1000 * trained[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ["fedalt", "fedsa"])
def test_fedalt_and_fedsa_resume_bit_identically(bert_dir, tmp_path, monkeypatch, algo):
    straight = build_run(tiny_cfg(bert_dir, tmp_path / "straight", algo=algo)).run(
        progress=False)
    resumed = interrupted_then_resumed(tiny_cfg(bert_dir, tmp_path / "resumed", algo=algo),
                                       monkeypatch)
    a, _ = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    b, _ = load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = ["local/adapter_model.safetensors"] + (["router.safetensors"] if algo == "fedalt"
                                                  else [])
    for name in straight["per_client"]:
        for file in kept:
            ta = load_file(tmp_path / "straight" / "adapters" / name / file)
            tb = load_file(tmp_path / "resumed" / "adapters" / name / file)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert straight["per_client"] == resumed["per_client"]
