"""Cohort training (fed/cohort.py) equals the one-client-at-a-time loop (``--cohort-size 1``):
every method, the per-client losses, the final global state, every client's saved state, and P
and TTP (docs/trainer.md, "Cohorts")."""
import json

import pytest
import torch
import transformers
from fed_fixtures import _tokenizer, interrupted_then_resumed, tiny_cfg
from safetensors.torch import load_file

from feddpa_fast.fed import runner
from feddpa_fast.fed.algorithms import ALGORITHMS
from feddpa_fast.fed.cohort import COHORT_SEQUENCES, cohort_size
from feddpa_fast.fed.run_config import RunConfig

# Tolerance of the cohort against the loop, fp32: the same computation up to float summation
# order (a cohort pass pads to its longest row and its GEMMs have more rows), about 1e-7
# relative per step, which AdamW (an update divided by the root of the squared gradients)
# passes on to the parameters over the run's 2 rounds of 2 steps at lr 1e-2. Largest measured
# difference of any saved tensor (2026-12-07): 1.8e-5 for C2A (its hypernetwork's weights are
# the largest tensors), at most 4.2e-6 for the others; 1e-4 leaves a 5x margin and is a hundredth
# of one AdamW step (lr 1e-2).
ATOL = 1e-4


@pytest.fixture(scope="module")
def quiet_bert(tmp_path_factory):
    """The tiny BERT with its own dropout off: the cohort draws the base model's dropout over the
    whole pass (the loop, per client), so equality holds only without it."""
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                  intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("models") / "quiet-bert"
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(model_dir, out, **overrides):
    cfg = tiny_cfg(model_dir, out, clients=3, dropout=0.0, dtype="fp32", **overrides)
    results = runner.run(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return results, [r for r in rows if "round" in r]


def _states(out) -> dict:
    """Every tensor a run leaves: the checkpoint's state and each client's state files."""
    found = {"checkpoint": load_file(out / "checkpoint.safetensors")}
    for path in sorted((out / "clients").glob("*/*.safetensors")):
        found[str(path.relative_to(out))] = load_file(path)
    return found


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_a_cohort_round_equals_one_client_at_a_time(quiet_bert, tmp_path, algo):
    one, one_rows = _run(quiet_bert, tmp_path / "one", algo=algo, cohort_size=1)
    cohort, cohort_rows = _run(quiet_bert, tmp_path / "cohort", algo=algo)
    assert all(0 <= r["padding"] < 1 for r in cohort_rows)  # the cohort ran: it reports padding
    assert not any("padding" in r for r in one_rows)
    for a, b in zip(one_rows, cohort_rows, strict=True):
        assert a["accepted"] == b["accepted"]
        for key in (k for k in a if k.startswith("loss_")):
            assert b[key] == pytest.approx(a[key], abs=ATOL), key
    states_one, states_cohort = _states(tmp_path / "one"), _states(tmp_path / "cohort")
    assert states_one.keys() == states_cohort.keys()
    for name, tensors in states_one.items():
        assert tensors.keys() == states_cohort[name].keys(), name
        for key, value in tensors.items():
            torch.testing.assert_close(states_cohort[name][key], value, rtol=0, atol=ATOL,
                                       msg=f"{name} {key}")
    assert cohort["P"] == one["P"] and cohort["TTP"] == one["TTP"]


def test_clients_with_fewer_steps_leave_the_cohort(quiet_bert, tmp_path):
    """No step cap: each client runs its own number of batches (its data size); the cohort
    shrinks as they finish, and every client still matches its own loop."""
    kw = dict(algo="feddpa-t", max_steps=None, rounds=2, batch_size=16)
    one, one_rows = _run(quiet_bert, tmp_path / "one", cohort_size=1, **kw)
    cohort, cohort_rows = _run(quiet_bert, tmp_path / "cohort", **kw)
    for a, b in zip(one_rows, cohort_rows, strict=True):
        for key in (k for k in a if k.startswith("loss_")):
            assert b[key] == pytest.approx(a[key], abs=ATOL), key
    for name, tensors in _states(tmp_path / "one").items():
        for key, value in tensors.items():
            torch.testing.assert_close(_states(tmp_path / "cohort")[name][key], value, rtol=0,
                                       atol=ATOL)


@pytest.mark.parametrize("extra", [dict(hostile="scale"), dict(dp_clip=0.5)])
def test_hostile_clients_and_dp_clipping_stay_per_client(quiet_bert, tmp_path, extra,
                                                         uploads_seen):
    """What a hostile client sends, and each client's DP-clipped update, are the loop's (round
    0: after it a hostile global is 1000 times larger, and so are its float differences)."""
    _run(quiet_bert, tmp_path / "one", algo="fedit", cohort_size=1, rounds=1, **extra)
    sent_one = list(uploads_seen)
    uploads_seen.clear()
    _run(quiet_bert, tmp_path / "cohort", algo="fedit", rounds=1, **extra)
    assert [m["client"] for m, _ in uploads_seen] == [m["client"] for m, _ in sent_one]
    tolerance = ATOL * (1000 if "hostile" in extra else 1)  # the update, scaled 1000 times
    for (_, a), (_, b) in zip(sent_one, uploads_seen, strict=True):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=tolerance)


def test_a_client_with_a_non_finite_loss_fails_alone(quiet_bert, tmp_path, monkeypatch):
    """One client's first loss is NaN: it is left out of the round (as the loop leaves it out);
    the others finish the round."""
    from feddpa_fast.fed.tasks import ClassifyTask

    real, seen = ClassifyTask.group_losses, []

    def product_nan_once(self, groups):
        losses, padding = real(self, groups)
        for i, group in enumerate(groups):
            if group[0].task == "product" and "product" not in seen:
                losses[i] = losses[i] * float("nan")
        seen.extend(g[0].task for g in groups)
        return losses, padding

    monkeypatch.setattr(ClassifyTask, "group_losses", product_nan_once)
    _, rows = _run(quiet_bert, tmp_path / "nan", algo="fedit", rounds=1)
    assert sorted(rows[0]["sampled"]) == ["product", "sentiment", "temperature"]
    assert rows[0]["accepted"] == [n for n in rows[0]["sampled"] if n != "product"]
    assert seen.count("product") == 1  # the failed client left the cohort's later passes


def test_a_step_splits_into_passes_by_width():
    """Clients sorted by their batch's longest row; a pass grows while it pads at most
    COHORT_PADDING of its positions beyond each client's own width."""
    from feddpa_fast.fed.cohort_train import COHORT_PADDING, passes_by_width

    class Lengths:
        @staticmethod
        def row_lengths(examples):
            return list(examples)

    groups = {"a": [10, 40], "b": [41, 5], "c": [100], "d": [39, 39], "e": [98]}
    assert COHORT_PADDING == 0.10
    # d, a, b (widths 39, 40, 41) add 6 of 246 positions; e, c (98, 100) add 2 of 200
    assert passes_by_width(groups, Lengths) == [["d", "a", "b"], ["e", "c"]]
    assert passes_by_width({"a": [10]}, Lengths) == [["a"]]


def test_the_default_cohort_size():
    """Every sampled client, within COHORT_SEQUENCES sequences per pass; --cohort-size wins."""
    assert cohort_size(RunConfig(batch_size=8), 8) == 8
    assert cohort_size(RunConfig(batch_size=16), 8) == COHORT_SEQUENCES // 16 == 4
    assert cohort_size(RunConfig(batch_size=128), 8) == 1
    assert cohort_size(RunConfig(batch_size=8), 3) == 3
    assert cohort_size(RunConfig(cohort_size=2, batch_size=8), 8) == 2
    assert cohort_size(RunConfig(cohort_size=20, batch_size=8), 8) == 8


@pytest.mark.parametrize("algo", ["feddpa-t", "feddpa-f", "c2a"])
def test_a_cohort_run_resumes_bit_identically(bert_dir, tmp_path, monkeypatch, algo):
    """Killed after round 0 and resumed, a cohort run (LoRA dropout and the encoder's own
    dropout on) ends bit for bit where the uninterrupted one does: every stream of a cohort
    phase derives from its clients' phase seeds."""
    cfg = dict(algo=algo, clients=3)
    straight = runner.run(tiny_cfg(bert_dir, tmp_path / "straight", **cfg), progress=False)
    resumed = interrupted_then_resumed(tiny_cfg(bert_dir, tmp_path / "resumed", **cfg),
                                       monkeypatch)
    assert straight["per_client"] == resumed["per_client"]
    a, b = _states(tmp_path / "straight"), _states(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name, tensors in a.items():
        assert all(torch.equal(tensors[k], b[name][k]) for k in tensors), name
