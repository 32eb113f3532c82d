"""The final evaluation in batched passes across clients (fed/pooled_eval.py) equals the
per-client evaluation: the same answers, weights, scores and saved adapters."""
import json

import pytest
import torch
from fed_fixtures import causal_lm_data_dir, tiny_cfg, tiny_llama_dir
from safetensors.torch import load_file

from feddpa_fast.fed import in_process
from feddpa_fast.fed.client_pool import can_pool
from feddpa_fast.fed.runner import build_run, evaluate_run, run


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    return tiny_llama_dir(root), causal_lm_data_dir(root, clients=3)


def _spy(monkeypatch) -> list:
    calls, original = [], in_process.evaluate_pooled

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(in_process, "evaluate_pooled", spy)
    return calls


def _outputs(out):
    results = json.loads((out / "results.json").read_text())
    for key in ("wall_s", "eval_wall_s"):
        results.pop(key, None)
    return results, (out / "predictions.jsonl").read_text()


@pytest.mark.parametrize("algo", ["feddpa-t", "feddpa-f", "fdlora", "local", "fedsa"])
def test_pooled_evaluation_equals_the_per_client_one(lm_dirs, tmp_path, monkeypatch, algo):
    model_dir, data_dir = lm_dirs
    out = tmp_path / algo
    calls = _spy(monkeypatch)
    # fp32: a bf16 base (the default on a CPU with native bf16) rounds the two paths' batches
    # differently enough to flip a greedy token.
    run(tiny_cfg(model_dir, out, algo=algo, task="causal-lm", data=str(data_dir), clients=3,
                 max_new_tokens=4, test_limit=4, dtype="fp32"), progress=False)
    assert calls == [1]  # the training's final evaluation took the pooled path
    pooled_results, pooled_rows = _outputs(out)
    adapter = load_file(out / "adapters" / "echo" / "local" / "adapter_model.safetensors")
    evaluate_run(out, progress=False, pooled=False)
    assert calls == [1]  # ... and pooled=False did not
    per_client_results, per_client_rows = _outputs(out)
    # Answers, assignments and row order are the same; a dynamic weight may move in its last
    # float bits (the two paths' representation GEMMs have other row counts, and AVX-512 BLAS
    # kernels round by row count: 3e-8 on an AMD EPYC with AVX-512, 0 with AVX2).
    pooled_list, per_client_list = ([json.loads(line) for line in r.splitlines()]
                                    for r in (pooled_rows, per_client_rows))
    assert len(pooled_list) == len(per_client_list)
    for a, b in zip(pooled_list, per_client_list):
        assert {**a, "weights": None} == {**b, "weights": None}
        for key in ("global", "local"):
            assert a["weights"][key] == pytest.approx(b["weights"][key], abs=1e-6)
    assert pooled_results == per_client_results
    saved = load_file(out / "adapters" / "echo" / "local" / "adapter_model.safetensors")
    assert saved.keys() == adapter.keys()
    assert all(torch.equal(saved[k], adapter[k]) for k in saved)
    rows = [json.loads(line) for line in pooled_rows.splitlines()]
    assert {r["client"] for r in rows} == {"echo", "plural", "shout"}
    if algo.startswith("feddpa"):  # dynamic weights differ per row
        assert len({r["weights"]["global"] for r in rows}) > 3


def test_classify_pooled_equals_per_client(finished_run, monkeypatch):
    out = finished_run("feddpa-t").out
    before, rows_before = _outputs(out)
    calls = _spy(monkeypatch)
    try:
        evaluate_run(out, progress=False, pooled=False)
        per_client, rows = _outputs(out)
        evaluate_run(out, progress=False)
        pooled, pooled_rows = _outputs(out)
    finally:  # the shared run is read by other tests: leave it as it was
        (out / "predictions.jsonl").write_text(rows_before)
    assert calls == [1]
    # The encoder's batches pad to other widths: the weights move in the last float bits
    # (about 3e-8 here); the answers and every score are the same.
    pooled_rows, rows = ([json.loads(line) for line in r.splitlines()] for r in (pooled_rows, rows))
    assert [r["answer"] for r in pooled_rows] == [r["answer"] for r in rows]
    for a, b in zip(pooled_rows, rows):
        assert {**a, "weights": None} == {**b, "weights": None}
        assert a["weights"]["global"] == pytest.approx(b["weights"]["global"], abs=1e-6)
    assert pooled["per_client"] == per_client["per_client"] == before["per_client"]


def test_methods_that_cannot_pool_keep_the_per_client_path(bert_dir, tmp_path):
    c2a = build_run(tiny_cfg(bert_dir, tmp_path / "c2a", algo="c2a"))
    fedalt = build_run(tiny_cfg(bert_dir, tmp_path / "fedalt", algo="fedalt"))
    fedit = build_run(tiny_cfg(bert_dir, tmp_path / "fedit", algo="fedit"))
    one = build_run(tiny_cfg(bert_dir, tmp_path / "one", algo="feddpa-t", clients=1))
    two = build_run(tiny_cfg(bert_dir, tmp_path / "two", algo="feddpa-t"))
    assert not can_pool(c2a) and not can_pool(fedalt)  # a per-client evaluation context
    assert not can_pool(fedit)  # one model for everyone: scored once
    assert not can_pool(one) and can_pool(two)
