"""The real ServerApp and ClientApp code over an in-process Grid (tests/fake_grid.py): equal to
the built-in loop bit for bit, evaluation included, for FedDPA-T, C2A and a compressed, private
wire; and hostile or broken SuperNodes, each met exactly as in process."""
import json
from functools import partial

import pytest
import torch

pytest.importorskip("flwr")

from fake_grid import FakeGrid, node_configs, one_thread  # noqa: E402
from fed_fixtures import tiny_cfg  # noqa: E402
from flwr.app import Message  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from feddpa_fast.fed import in_process, wire  # noqa: E402
from feddpa_fast.fed.checkpoint import load_checkpoint  # noqa: E402
from feddpa_fast.fed.flower.codec import decode_reply, encode_reply  # noqa: E402
from feddpa_fast.fed.flower.flower_config import app_config  # noqa: E402
from feddpa_fast.fed.flower.server_app import run_server  # noqa: E402
from feddpa_fast.fed.runner import run  # noqa: E402

pytestmark = pytest.mark.flower
CLIENTS = ("sentiment", "product")  # the built-in suite's first two tasks, in order



# cohort_size 1: a SuperNode trains its one client alone; the built-in loop it must equal bit
# for bit is the one-client-at-a-time loop (fed/cohort.py).
_cfg = partial(tiny_cfg, max_steps=3, seed=3, cohort_size=1)


def _flower(cfg, tmp_path, tamper=None):
    grid = FakeGrid(node_configs(tmp_path / "nodes", 2), app_config(cfg), tamper)
    return one_thread(run_server, grid, app_config(cfg)), grid


def _builtin(cfg):
    return one_thread(run, cfg, progress=False)


def _same_global(a_dir, b_dir):
    a, a_state = load_checkpoint(a_dir / "checkpoint.safetensors")
    b, b_state = load_checkpoint(b_dir / "checkpoint.safetensors")
    assert a_state == b_state and set(a) == set(b)
    return all(torch.equal(a[k], b[k]) for k in a)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, extra", [
    ("feddpa-t", {}),
    ("c2a", {}),
    ("feddpa-t", {"wire_dtype": "bf16", "dp_clip": 0.5, "dp_noise_multiplier": 0.5}),
    ("fdlora", {"wire_dtype": "fp16"}),
    ("fedalt", {}),  # one message per client
    ("fedsa", {"wire_dtype": "bf16"}),
])
def test_flower_equals_the_builtin_loop_evaluation_included(bert_dir, tmp_path, algo, extra):
    fl_cfg = _cfg(bert_dir, tmp_path / "flower", algo=algo, **extra)
    fl, grid = _flower(fl_cfg, tmp_path)
    bi = _builtin(_cfg(bert_dir, tmp_path / "builtin", algo=algo, **extra))
    assert _same_global(tmp_path / "flower", tmp_path / "builtin")
    assert (fl["P"], fl["TTP"]) == (bi["P"], bi["TTP"])
    assert fl["per_client"] == bi["per_client"] and fl["by_assignment"] == bi["by_assignment"]
    assert fl["dp"] == bi["dp"]
    fl_rows, bi_rows = _metrics(tmp_path / "flower"), _metrics(tmp_path / "builtin")
    assert [r.get("P") for r in fl_rows] == [r.get("P") for r in bi_rows]
    assert all("P" in r for r in fl_rows)  # eval-every 1, then the final line
    assert (tmp_path / "flower" / "results.json").is_file()
    assert (tmp_path / "flower" / "plots" / "rounds.png").stat().st_size > 1000
    # The local adapters stayed on the nodes and equal the built-in loop's.
    for i, name in enumerate(CLIENTS):
        node_files = sorted((tmp_path / "nodes" / f"node{i}" / name).glob("local_r*"))
        ref_files = sorted((tmp_path / "builtin" / "clients" / name).glob("local_r*"))
        assert [f.name for f in node_files] == [f.name for f in ref_files]
        for a, b in zip(node_files, ref_files):
            ta, tb = load_file(a), load_file(b)
            assert all(torch.equal(ta[k], tb[k]) for k in tb)
        # ... and each node exports its final local adapter in PEFT format, as in process
        exported = tmp_path / "nodes" / f"node{i}" / "adapters" / name / "local"
        ta = load_file(exported / "adapter_model.safetensors")
        tb = load_file(tmp_path / "builtin" / "adapters" / name / "local" /
                       "adapter_model.safetensors")
        assert (exported / "adapter_config.json").is_file() and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in tb)
        assert not (tmp_path / "flower" / "adapters" / name).exists()  # not the server's out
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {"query", "train", "evaluate"}
    if algo == "c2a":  # round 0 was preceded by the conditioning exchange
        steps = [json.loads(json.dumps(dict(m.content.config_records["fed"])))["step"]
                 for m in grid.sent if m.metadata.message_type == "query"]
        assert steps.count("setup") == 2


# ---- hostile and broken SuperNodes ---------------------------------------------------------
HOSTILE_NODE, HOSTILE_ROUND = 102, 1  # the node of "product", in round 1


def _reply_tamper(kind: str, once_per_round: bool = True):
    """A tamper hook: the hostile node's train reply in HOSTILE_ROUND, changed by ``kind``."""
    done = set()

    def tamper(message: Message, reply: Message):
        meta = message.metadata
        if meta.dst_node_id != HOSTILE_NODE or meta.message_type != "train":
            return reply
        name, r, blob, stats = decode_reply(reply.content)
        if r != HOSTILE_ROUND or blob is None or (once_per_round and r in done):
            return reply
        done.add(r)
        if kind == "silent":
            return None  # no reply before round-timeout
        if kind == "wrong-round":
            content = encode_reply(name, r + 1, blob, stats)
        else:
            content = encode_reply(name, r, _bad_blob(kind, blob, name, r), stats)
        return Message(content, reply_to=message)
    return tamper


def _bad_blob(kind: str, blob: bytes, name: str, r: int) -> bytes:
    if kind == "corrupt":
        return blob[:40] + bytes(b ^ 0xFF for b in blob[40:80]) + blob[80:]
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + header_len])["__metadata__"]
    tensors = {k: v.clone() for k, v in wire_tensors(blob).items()}
    if kind == "nan":
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] = float("nan")
    elif kind == "other-client":
        meta = {**meta, "client": CLIENTS[0]}  # claims to be the other client
    return st_save(tensors, metadata=meta)


def wire_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


def _drop_in_process(monkeypatch, attempts: set[int]):
    """The in-process equivalent: "product"'s reply in HOSTILE_ROUND becomes a failure in the
    given attempts (0-based; a redone round is attempt 1)."""
    original = in_process.InProcess.exchange
    seen = {}

    def exchange(self, r, sampled, broadcasts):
        replies, stats = original(self, r, sampled, broadcasts)
        attempt = seen.get(r, 0)
        seen[r] = attempt + 1
        if r == HOSTILE_ROUND and attempt in attempts:
            replies[CLIENTS[1]] = RuntimeError("the hostile node's reply")
        return replies, stats

    monkeypatch.setattr(in_process.InProcess, "exchange", exchange)


# The hostile and malformed-reply tests below all compare against this one in-process run.
LEFT_OUT = dict(algo="feddpa-t", eval_every=0, rounds=2)


@pytest.fixture(scope="module")
def left_out_reference(bert_dir, tmp_path_factory):
    """The built-in loop with "product"'s HOSTILE_ROUND reply failed once: what every Flower
    run with one bad reply must equal. Run once per module (per xdist worker); read only."""
    out = tmp_path_factory.mktemp("left-out") / "builtin"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _drop_in_process(monkeypatch, attempts={0})
        _builtin(_cfg(bert_dir, out, **LEFT_OUT))
    return out


@pytest.mark.parametrize("kind", ["corrupt", "wrong-round", "other-client", "nan", "silent"])
def test_a_hostile_or_broken_node_is_left_out_exactly_as_in_process(bert_dir, tmp_path,
                                                                    left_out_reference, kind):
    _flower(_cfg(bert_dir, tmp_path / "flower", **LEFT_OUT), tmp_path, _reply_tamper(kind))
    assert _same_global(tmp_path / "flower", left_out_reference)
    rows = [r for r in _metrics(tmp_path / "flower") if "round" in r]
    assert rows[HOSTILE_ROUND]["accepted"] == [CLIENTS[0]]  # the round went on without it
    assert rows[0]["accepted"] == list(CLIENTS)
    _, state = load_checkpoint(tmp_path / "flower" / "checkpoint.safetensors")
    assert state.rounds_done == 2 and not list((tmp_path / "flower").glob(".*.tmp"))


def test_too_few_valid_replies_redo_the_round_exactly_as_in_process(bert_dir, tmp_path,
                                                                     monkeypatch):
    kw = dict(algo="feddpa-t", eval_every=0, rounds=2, min_clients=2)
    _flower(_cfg(bert_dir, tmp_path / "flower", **kw), tmp_path, _reply_tamper("nan"))
    _drop_in_process(monkeypatch, attempts={0})
    _builtin(_cfg(bert_dir, tmp_path / "builtin", **kw))
    assert _same_global(tmp_path / "flower", tmp_path / "builtin")
    rows = [r for r in _metrics(tmp_path / "flower") if "round" in r]
    assert rows[HOSTILE_ROUND]["accepted"] == list(CLIENTS)  # redone; both valid the 2nd time


def test_wire_rejects_what_the_hostile_blobs_carry():
    """The checks the hostile replies above run into, named."""
    tensors = {"w": torch.ones(2, 2)}
    blob = wire.encode(tensors, {"round": 1, "client": "product", "num_examples": 4})
    for kind, error in (("corrupt", wire.WireError), ("nan", wire.NonFiniteError),
                        ("other-client", wire.MetadataError)):
        bad = _bad_blob(kind, blob, "product", 1)
        with pytest.raises(error):
            wire.decode(bad, tensors, round=1, sender="product")


def _malformed(kind: str):
    """A tamper hook: the hostile node's round-1 train reply replaced by a malformed one."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    def tamper(message: Message, reply: Message):
        meta = message.metadata
        if meta.dst_node_id != HOSTILE_NODE or meta.message_type != "train":
            return reply
        name, r, blob, stats = decode_reply(reply.content)
        if r != HOSTILE_ROUND or blob is None:
            return reply
        if kind == "no-record":
            content = RecordDict({"other": ConfigRecord({"x": 1})})
        elif kind == "int-blob":
            content = RecordDict({"fed": ConfigRecord({"client": name, "round": r,
                                                       "blob": 2 ** 40})})
        else:  # junk stats next to a valid blob: only finite loss_* survive
            content = RecordDict({"fed": ConfigRecord({"client": name, "round": r,
                                                       "blob": blob}),
                                  "metrics": MetricRecord({"round": 99.0, "accepted": 1.0,
                                                           "loss_global": float("nan"),
                                                           "loss_junk": [1.0, 2.0]})})
        return Message(content, reply_to=message)
    return tamper


@pytest.mark.parametrize("kind", ["no-record", "int-blob"])
def test_a_malformed_reply_is_a_failed_one_not_a_crash(bert_dir, tmp_path, left_out_reference,
                                                       kind):
    _flower(_cfg(bert_dir, tmp_path / "flower", **LEFT_OUT), tmp_path, _malformed(kind))
    assert _same_global(tmp_path / "flower", left_out_reference)


def test_a_node_cannot_write_other_keys_into_the_metrics(bert_dir, tmp_path):
    _flower(_cfg(bert_dir, tmp_path / "flower", eval_every=0), tmp_path, _malformed("stats"))
    rows = [r for r in _metrics(tmp_path / "flower") if "round" in r]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(set(r) <= {"round", "sampled", "accepted", "bytes_up_per_client", "bytes_down",
                          "server_s", "round_s", "loss_global", "loss_local"} for r in rows)
    assert rows[1]["accepted"] == list(CLIENTS)  # the blob itself was valid


def _bad_evaluation(message, reply):
    """The hostile node's evaluation replies: an out-of-range score (7.0), i.e. no valid one."""
    from feddpa_fast.fed.flower.codec import encode_result

    if message.metadata.dst_node_id == HOSTILE_NODE and \
            message.metadata.message_type == "evaluate":
        return Message(encode_result(CLIENTS[1], 0, {"P": 7.0}), reply_to=message)
    return reply


def _silent_evaluation(message, reply):
    """A node that died after training: no evaluation reply at all."""
    if message.metadata.dst_node_id == HOSTILE_NODE and \
            message.metadata.message_type == "evaluate":
        return None
    return reply


@pytest.mark.parametrize("tamper", [_bad_evaluation, _silent_evaluation])
def test_evaluation_goes_on_without_a_missing_node_and_names_it(bert_dir, tmp_path, tamper):
    results, _ = _flower(_cfg(bert_dir, tmp_path / "flower", rounds=2), tmp_path, tamper)
    rows = _metrics(tmp_path / "flower")
    assert [r["eval_missing"] for r in rows if "round" in r] == [[CLIENTS[1]], [CLIENTS[1]]]
    assert rows[-1]["final"] and rows[-1]["eval_missing"] == [CLIENTS[1]]
    saved = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert saved["eval_missing"] == [CLIENTS[1]] and list(saved["per_client"]) == [CLIENTS[0]]
    # FedDPA-T: the authors' weights; P is the one evaluated client's own
    assert results["P"] == saved["P"] == saved["per_client"][CLIENTS[0]]["P"]
    assert rows[0]["accepted"] == list(CLIENTS)  # training still had both


def test_evaluation_below_min_clients_stops_naming_the_node(bert_dir, tmp_path):
    with pytest.raises(RuntimeError, match="no valid reply from \\['product'\\]; 1 replied, "
                                           "min_clients is 2"):
        _flower(_cfg(bert_dir, tmp_path / "flower", rounds=1, min_clients=2), tmp_path,
                _bad_evaluation)
    # The round is scored before its line and its checkpoint: nothing of it was committed,
    # so a restarted ServerApp redoes it.
    assert not (tmp_path / "flower" / "checkpoint.safetensors").exists()
    assert (tmp_path / "flower" / "metrics.jsonl").read_text() == ""


def test_nodes_drop_local_adapters_the_checkpoint_does_not_cover(bert_dir, tmp_path):
    stale = tmp_path / "nodes" / "node1" / CLIENTS[1] / "local_r0009.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by another run")
    _flower(_cfg(bert_dir, tmp_path / "flower", eval_every=0), tmp_path)
    assert not stale.exists()
