"""``compare`` reuses the rounds FedDPA-F shares with FedIT (fed/reuse.py), and ``compare
--resume`` continues what exists, starts what does not and does not run a finished method again.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fed_fixtures import causal_lm_data_dir, tiny_llama_dir
from safetensors.torch import load_file

from feddpa_fast.fed.checkpoint import CheckpointError
from feddpa_fast.fed.cli import main
from feddpa_fast.fed.reuse import seed_from_rounds
from feddpa_fast.fed.run_config import RunConfig
from feddpa_fast.fed.runner import run

FLAGS = ["--task", "causal-lm", "--rounds", "2", "--max-steps", "1", "--r", "4",
         "--batch-size", "4", "--test-limit", "2", "--max-new-tokens", "3", "--target-modules",
         "q_proj,v_proj", "--quiet"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    return str(tiny_llama_dir(root)), str(causal_lm_data_dir(root))


def _cfg(setting, algo, out):
    model, data = setting
    return RunConfig(algo=algo, model=model, task="causal-lm", data=data, rounds=2, max_steps=1,
                     r=4, batch_size=4, test_limit=2, max_new_tokens=3, out=str(out),
                     target_modules=("q_proj", "v_proj"))


def _compare(setting, out, *extra):
    model, data = setting
    return main(["compare", "--algos", "fedit,feddpa-f", "--model", model, "--data", data,
                 "--out", str(out), *FLAGS, *extra])


def _tensors(run_dir):
    files = sorted(p for p in run_dir.rglob("*.safetensors") if "checkpoint" not in p.name)
    return {str(p.relative_to(run_dir)): load_file(p) for p in files}


def _rounds(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = ("server_s", "round_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if "round" in r]


def test_feddpa_f_after_fedit_equals_a_separate_run(setting, tmp_path):
    assert _compare(setting, tmp_path / "cmp") == 0
    separate = run(_cfg(setting, "feddpa-f", tmp_path / "alone"), progress=False)
    reused = json.loads((tmp_path / "cmp" / "feddpa-f" / "results.json").read_text())
    assert reused["reused_rounds_of"] == "fedit"
    assert reused["per_client"] == separate["per_client"]
    assert (reused["P"], reused["TTP"]) == (separate["P"], separate["TTP"])
    mine, theirs = _tensors(tmp_path / "cmp" / "feddpa-f"), _tensors(tmp_path / "alone")
    assert mine.keys() == theirs.keys() and len(mine) >= 3
    for name in mine:
        for key in mine[name]:
            assert torch.equal(mine[name][key], theirs[name][key]), (name, key)
    assert _rounds(tmp_path / "cmp" / "feddpa-f") == _rounds(tmp_path / "alone")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "feddpa-f reuses fedit's rounds" in table


def test_compare_resume_starts_missing_and_keeps_finished_methods(setting, tmp_path):
    assert _compare(setting, tmp_path / "cmp", "--resume") == 0  # nothing there yet: starts
    results = tmp_path / "cmp" / "fedit" / "results.json"
    before = results.read_text(), (tmp_path / "cmp" / "fedit" / "metrics.jsonl").read_text()
    assert _compare(setting, tmp_path / "cmp", "--resume") == 0
    after = results.read_text(), (tmp_path / "cmp" / "fedit" / "metrics.jsonl").read_text()
    assert after == before  # finished: neither trained nor evaluated again
    base_results = (tmp_path / "cmp" / "base" / "results.json").read_text()
    assert _compare(setting, tmp_path / "cmp", "--resume") == 0
    assert (tmp_path / "cmp" / "base" / "results.json").read_text() == base_results  # kept
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["method"] for r in compared["methods"]][:3] == [
        "base model, no adapter", "fedit", "feddpa-f"]
    assert {iv["comparison"] for iv in compared["intervals"]} >= {"fedit vs base"}


def test_rounds_of_another_configuration_are_not_reused(setting, tmp_path):
    source = _cfg(setting, "fedit", tmp_path / "fedit")
    run(source, progress=False)
    other = dataclasses.replace(_cfg(setting, "feddpa-f", tmp_path / "f"), lr=5e-4)
    with pytest.raises(CheckpointError, match=r"differs .* in \['lr'\]"):
        seed_from_rounds(tmp_path / "fedit", other)
    longer = dataclasses.replace(_cfg(setting, "feddpa-f", tmp_path / "g"), rounds=3)
    with pytest.raises(CheckpointError, match="differs"):
        seed_from_rounds(tmp_path / "fedit", longer)
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()


def test_unfinished_rounds_are_not_reused(setting, tmp_path):
    from feddpa_fast.fed.checkpoint import load_checkpoint, save_checkpoint

    source = _cfg(setting, "fedit", tmp_path / "fedit")
    run(source, progress=False)
    path = tmp_path / "fedit" / "checkpoint.safetensors"
    tensors, state = load_checkpoint(path)
    save_checkpoint(path, tensors, dataclasses.replace(state, rounds_done=1))
    with pytest.raises(CheckpointError, match="1 of 2 rounds done"):
        seed_from_rounds(tmp_path / "fedit", _cfg(setting, "feddpa-f", tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_only_a_seeded_run_is_labelled_as_reusing(setting, tmp_path):
    from feddpa_fast.fed.reuse import REUSED, reused_from

    run(_cfg(setting, "fedit", tmp_path / "fedit"), progress=False)
    target = _cfg(setting, "feddpa-f", tmp_path / "f")
    assert seed_from_rounds(tmp_path / "fedit", target)
    assert reused_from(tmp_path / "f") == "fedit" and (tmp_path / "f" / REUSED).is_file()
    assert not seed_from_rounds(tmp_path / "fedit", target)  # already started: left alone
    assert reused_from(tmp_path / "fedit") is None
    with pytest.raises(ValueError, match="shares its rounds with no other method"):
        seed_from_rounds(tmp_path / "fedit", _cfg(setting, "feddpa-t", tmp_path / "t"))
