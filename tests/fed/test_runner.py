"""The federated loop end to end on tiny models: every algorithm, what travels, resume after
kill -9, the causal-LM path, the CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fed_fixtures import causal_lm_data_dir, tiny_cfg, tiny_llama_dir
from safetensors.torch import load_file

from feddpa_fast.fed.checkpoint import CheckpointError, load_checkpoint
from feddpa_fast.fed.cli import main as cli_main
from feddpa_fast.fed.runner import run

ALGOS = ["fedit", "local", "feddpa-f", "feddpa-t", "fdlora", "c2a", "fedalt", "fedsa"]



@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_runs_two_clients_two_rounds(finished_run, algo):
    results, out, _ = finished_run(algo)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "round" in r] == [0, 1] and rows[-1]["final"]
    assert 0 <= results["P"] <= 1 and 0 <= results["TTP"] <= 1
    clients = sorted(results["per_client"])
    assert len(clients) == 2
    if algo == "local":  # nothing travels
        assert results["bytes_per_client_round"] == 0
        assert not (out / "adapters" / "global").exists()
    elif algo != "c2a":  # one message's adapter, and nothing else, travels
        size = results["global_adapter_bytes"]
        assert size < results["bytes_per_client_round"] < size + 16384
        exported = algo not in ("fedalt", "fedsa")  # their own outputs: test_fed{alt,sa}.py
        assert (out / "adapters" / "global" / "adapter_config.json").is_file() == exported
    if algo == "c2a":  # the hypernetwork travels, and is smaller than one adapter
        assert (out / "adapters" / "hypernetwork.safetensors").is_file()
    if algo != "fedit":
        for name in clients:
            assert (out / "adapters" / name / "local" / "adapter_model.safetensors").is_file()
    if algo in ("feddpa-f", "feddpa-t"):
        assert set(results["by_assignment"]) == {"authors", "opposite"}
    assert (out / "plots" / "rounds.png").stat().st_size > 1000


@pytest.mark.parametrize("algo", ["fedit", "local", "feddpa-t"])
def test_predictions_are_saved_and_give_back_the_scores(finished_run, algo):
    results, out, _ = finished_run(algo)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    dynamic = algo.startswith("feddpa")
    keys = ["authors", "opposite"] if dynamic else [None]
    clients = list(results["per_client"])
    assert len(rows) == len(clients) * len(clients) * 8 * len(keys)  # clients x sets x 8 x keys
    assert {r["client"] for r in rows} == set(clients) == {r["task"] for r in rows}
    for row in rows:
        assert set(row) >= {"client", "task", "prompt", "reference", "answer", "weights"}
        assert row.get("assignment") in keys and row["prompt"] and row["reference"]
    fixed = {"fedit": (1.0, 0.0), "local": (0.0, 1.0)}.get(algo)
    weights = {(r["weights"]["global"], r["weights"]["local"]) for r in rows}
    assert weights == {fixed} if fixed else len(weights) > 2  # one mix per instance
    for client in clients:  # P is the own-task accuracy of these answers
        key = "authors" if dynamic else None
        own = [r for r in rows if r["client"] == client == r["task"]
               and r.get("assignment") == key]
        accuracy = sum(r["answer"] == r["reference"] for r in own) / len(own)
        record = results["per_client"][client]  # one record per client (fed/results.py)
        entry = record["by_assignment"]["authors"] if dynamic else record
        assert (record["by_assignment"] is None) == (not dynamic)
        assert accuracy == pytest.approx(entry["P"])
    assert "predictions" not in json.loads((out / "results.json").read_text())["per_client"][
        clients[0]]


def test_uploads_hold_only_the_global_adapter(finished_run):
    _, out, uploads = finished_run("feddpa-t")
    assert len(uploads) == 4  # 2 clients x 2 rounds
    for meta, tensors in uploads:
        assert tensors and all(".lora_" in k and "local" not in k for k in tensors)
        local_file = out / "clients" / meta["client"] / "local_r0001.safetensors"
        local = load_file(local_file)
        assert set(local) == set(tensors)  # same layout, different adapter:
        if meta["round"] == 1:
            assert any(not torch.equal(local[k], tensors[k]) for k in local)


@pytest.mark.parametrize("algo", ["fdlora", "c2a"])
def test_what_fdlora_and_c2a_upload(bert_dir, tmp_path, uploads_seen, algo):
    out = tmp_path / algo
    run(tiny_cfg(bert_dir, out, algo=algo, rounds=3), progress=False)
    uploads = uploads_seen
    assert len(uploads) == 6  # 2 clients x 3 rounds
    for meta, tensors in uploads:
        if algo == "c2a":  # only the hypernetwork: no adapter tensor leaves a client
            assert tensors and not any("lora_" in k for k in tensors)
            continue
        assert all(".lora_" in k for k in tensors)
        personal = load_file(out / "clients" / meta["client"] / "local_r0000.safetensors")
        same = all(torch.equal(personal[k], tensors[k]) for k in personal)
        # round 0: the personalized adapter, once (its average initialises the global one);
        # afterwards only the global adapter, which differs from the personalized one
        assert same == (meta["round"] == 0)


def _train_cmd(model_dir, out, rounds):
    return [sys.executable, "-m", "feddpa_fast.fed.cli", "train", "--model", str(model_dir),
            "--clients", "2", "--rounds", str(rounds), "--max-steps", "3", "--batch-size", "8",
            "--lr", "0.01", "--r", "4", "--seed", "3", "--out", str(out), "--quiet"]


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(bert_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(bert_dir, reference, 4) + ["--test-limit", "4"], check=True,
                   env=env, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(bert_dir, killed, 4) + ["--test-limit", "4"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until round 1 is committed: round 2 is under way
        try:
            if load_checkpoint(ckpt)[1].rounds_done >= 2:
                break
        except (FileNotFoundError, CheckpointError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, state = load_checkpoint(killed / "checkpoint.safetensors")
    assert 2 <= state.rounds_done < 4  # killed mid-run
    subprocess.run(_train_cmd(bert_dir, killed, 4) + ["--test-limit", "4", "--resume"],
                   check=True, env=env, capture_output=True, timeout=600)
    a, _ = load_checkpoint(reference / "checkpoint.safetensors")
    b, _ = load_checkpoint(killed / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    for name in ("sentiment", "product"):
        la = load_file(reference / "adapters" / name / "local" / "adapter_model.safetensors")
        lb = load_file(killed / "adapters" / name / "local" / "adapter_model.safetensors")
        assert all(torch.equal(la[k], lb[k]) for k in la)


def test_refuses_to_overwrite_a_run_and_to_resume_with_other_flags(bert_dir, tmp_path):
    run(tiny_cfg(bert_dir, tmp_path / "r", algo="fedit", rounds=1), progress=False)
    with pytest.raises(FileExistsError):
        run(tiny_cfg(bert_dir, tmp_path / "r", algo="fedit", rounds=1), progress=False)
    with pytest.raises(RuntimeError, match="another configuration"):
        run(tiny_cfg(bert_dir, tmp_path / "r", algo="fedit", rounds=1, lr=0.5), resume=True,
            progress=False)


def test_causal_lm_path_with_a_model_loaded_by_path(tmp_path):
    model_dir = tiny_llama_dir(tmp_path)
    data_dir = causal_lm_data_dir(tmp_path)
    results = run(tiny_cfg(model_dir, tmp_path / "lm", algo="feddpa-t", task="causal-lm",
                       data=str(data_dir), target_modules=("q_proj", "v_proj")), progress=False)
    assert sorted(results["per_client"]) == ["echo", "plural"]
    assert 0 <= results["P"] <= 1 and 0 <= results["TTP"] <= 1
    assert (tmp_path / "lm" / "adapters" / "global" / "adapter_model.safetensors").is_file()


def test_cli_train_eval_and_compare(bert_dir, tmp_path, capsys):
    common = ["--model", str(bert_dir), "--clients", "2", "--rounds", "1", "--max-steps", "1",
              "--test-limit", "4", "--r", "4", "--quiet"]
    assert cli_main(["train", "--algo", "fedit", "--out", str(tmp_path / "t")] + common) == 0
    assert "fedit: P" in capsys.readouterr().out
    trained = json.loads((tmp_path / "t" / "results.json").read_text())
    assert cli_main(["eval", "--run", str(tmp_path / "t"), "--quiet"]) == 0
    assert "fedit: P" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "t" / "results.json").read_text())
    assert evaluated["wall_s"] == trained["wall_s"]  # the training's time is kept
    assert evaluated["eval_wall_s"] > 0 and (evaluated["P"], evaluated["TTP"]) == (
        trained["P"], trained["TTP"])
    final = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["wall_s"] == trained["wall_s"] and final["eval_wall_s"] > 0
    config = tmp_path / "c.toml"
    config.write_text('rounds = 1\nmax_steps = 1\n[weighting]\nassignment = "opposite"\n')
    assert cli_main(["compare", "--algos", "fedit,feddpa-t", "--out", str(tmp_path / "cmp"),
                     "--config", str(config)] + common) == 0
    out = capsys.readouterr().out
    assert "| fedit |" in out and "| feddpa-t |" in out and "authors weights" in out
    assert (tmp_path / "cmp" / "compare.png").is_file()
    bad = tmp_path / "bad.toml"
    bad.write_text("roundz = 3\n")
    assert cli_main(["train", "--config", str(bad), "--out", str(tmp_path / "x")] + common) == 2
    assert "unknown option" in capsys.readouterr().err


def test_final_eval_none_trains_only_and_eval_scores_it_later(bert_dir, tmp_path, capsys):
    # 2 rounds: FedDPA-T's round 0 trains the global adapter only, round 1 the local one too
    common = ["--model", str(bert_dir), "--clients", "2", "--rounds", "2", "--max-steps", "1",
              "--test-limit", "4", "--r", "4", "--quiet"]
    out = tmp_path / "t"
    assert cli_main(["train", "--algo", "feddpa-t", "--final-eval", "none", "--out", str(out)]
                    + common) == 0
    assert "trained, not evaluated" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["P"] is None and results["TTP"] is None
    assert not results["per_client"]["sentiment"]  # no scores, no report
    assert not (out / "predictions.jsonl").exists()
    for adapter in ("global", "sentiment/local", "product/local"):
        assert (out / "adapters" / adapter / "adapter_model.safetensors").is_file()
    assert "final_eval" not in load_checkpoint(out / "checkpoint.safetensors")[1].config
    assert cli_main(["eval", "--run", str(out), "--quiet"]) == 0  # scores it now
    scored = json.loads((out / "results.json").read_text())
    assert 0 <= scored["P"] <= 1 and (out / "predictions.jsonl").stat().st_size > 0
    assert cli_main(["compare", "--final-eval", "none", "--out", str(tmp_path / "c")]
                    + common) == 2
    assert "--final-eval none: compare" in capsys.readouterr().err


def test_both_transports_implement_the_protocol():
    from feddpa_fast.fed.in_process import InProcess
    from feddpa_fast.fed.transport import Transport

    assert isinstance(InProcess(run=None), Transport)
    flower = pytest.importorskip("feddpa_fast.fed.flower.server_app")
    assert isinstance(flower.GridTransport(None, None, {}, 1.0), Transport)
