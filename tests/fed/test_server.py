"""The server: sampling, validation of replies, redo on too few updates."""
import pytest
import torch

from feddpa_fast.fed import wire
from feddpa_fast.fed.run_config import ConfigError, RunConfig
from feddpa_fast.fed.server import Server, ServerSettings, TooFewUpdates

KEY = "base_model.model.layer.lora_A.weight"


def _server(**options):
    """A server with the settings of RunConfig(**options): declared and checked once, there."""
    return Server({KEY: torch.zeros(2, 3)}, [f"c{i}" for i in range(8)],
                  ServerSettings.from_config(RunConfig(**options)), seed=0)


def _reply(name, value, round_index=0, n=10, **meta):
    return wire.encode({KEY: torch.full((2, 3), float(value))},
                       {"round": round_index, "client": name, "num_examples": n, **meta})


def test_sampling_is_seeded_and_sized():
    s = _server(fraction=0.5)
    assert s.sample(3) == s.sample(3) and len(s.sample(3)) == 4
    assert s.sample(3) != s.sample(3, attempt=1) or s.sample(4) != s.sample(3)
    assert len(_server(clients_per_round=3).sample(0)) == 3
    assert len(_server(fraction=0.01).sample(0)) == 1
    with pytest.raises(ConfigError, match="aggregation"):
        _server(aggregation="mean")


def test_bad_replies_are_dropped_and_the_rest_aggregated():
    s = _server(aggregation="fedavg")
    good = {"c0": _reply("c0", 1.0, n=1), "c1": _reply("c1", 4.0, n=3)}
    nan_blob = bytearray(_reply("c4", 1.0))
    nan_blob[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    bad = {"c2": _reply("c2", 9.0, round_index=1),       # stale round
           "c3": _reply("c5", 9.0),                      # claims another sender
           "c4": bytes(nan_blob),                        # NaN
           "c5": b"garbage",                             # not a blob
           "c6": RuntimeError("client crashed")}         # failed client
    new, accepted = s.aggregate_round(0, {**good, **bad})
    assert accepted == ["c0", "c1"]
    assert torch.equal(new[KEY], torch.full((2, 3), 3.25))  # (1 * 1 + 4 * 3) / 4
    assert s.server_seconds > 0


def test_too_few_valid_updates_leave_the_global_adapter_unchanged():
    s = _server(min_clients=2)
    with pytest.raises(TooFewUpdates):
        s.aggregate_round(0, {"c0": _reply("c0", 1.0), "c1": b"junk"})
    assert torch.equal(s.global_adapter[KEY], torch.zeros(2, 3))
    blob = s.broadcasts(5, ["c0"])["c0"]
    tensors, meta = wire.decode(blob, s.global_adapter, round=5, sender="server")
    assert meta["num_examples"] == 0 and torch.equal(tensors[KEY], torch.zeros(2, 3))


def test_run_round_completes_without_a_hung_client_and_redoes_short_rounds():
    s = _server(clients_per_round=3, min_clients=2)
    calls = []

    def exchange(r, sampled, broadcast):
        # The Flower transport turns a node that did not answer within round-timeout (a hung
        # or dropped client) into a TimeoutError entry, exactly like this.
        calls.append(sampled)
        replies = {n: _reply(n, 2.0, round_index=r) for n in sampled[1:]}
        replies[sampled[0]] = TimeoutError("no reply within round-timeout")
        return replies, [{"loss_global": 0.5}] * 2

    sampled, _, replies, stats, accepted = s.run_round(0, exchange)
    assert accepted == sampled[1:] and len(calls) == 1
    assert torch.equal(s.global_adapter[KEY], torch.full((2, 3), 2.0))

    def mostly_silent(r, sampled, broadcast):
        calls.append(sampled)
        ok = len(calls) >= 3  # the first attempt of this round: everyone times out
        return ({n: _reply(n, 1.0, round_index=r) if ok else TimeoutError("hung")
                 for n in sampled}, [])

    s.run_round(1, mostly_silent)
    assert len(calls) == 3  # the round was redone once (attempt 1 draws a new sample)
    assert torch.equal(s.global_adapter[KEY], torch.full((2, 3), 1.0))
    with pytest.raises(RuntimeError, match="too few valid updates"):
        s.run_round(2, lambda r, sampled, b: ({n: TimeoutError("hung") for n in sampled}, []))
