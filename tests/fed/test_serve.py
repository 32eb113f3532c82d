"""``feddpa-fast generate`` and ``ClientGenerator`` (fed/serve.py) on a finished tiny run: the
answers and weights a client's final evaluation gives, batched across clients; bad input is
refused naming the file and line, and nothing is written."""
import dataclasses
import json

import pytest
from fed_fixtures import causal_lm_data_dir, tiny_cfg, tiny_llama_dir

from feddpa_fast.errors import MissingFileError
from feddpa_fast.fed.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from feddpa_fast.fed.cli import main as cli_main
from feddpa_fast.fed.data import DataError
from feddpa_fast.fed.options import ConfigError
from feddpa_fast.fed.runner import run
from feddpa_fast.fed.serve import ClientGenerator, Request, generate_file


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished 3-client FedDPA-T run on the tiny Llama (read only)."""
    root = tmp_path_factory.mktemp("generate")
    model_dir, data_dir = tiny_llama_dir(root), causal_lm_data_dir(root, clients=3)
    out = root / "run"
    run(tiny_cfg(model_dir, out, algo="feddpa-t", task="causal-lm", data=str(data_dir),
                 clients=3, max_new_tokens=4, test_limit=4), progress=False)
    return out


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _evaluated(out) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_cli_answers_as_the_final_evaluation_did(lm_run, tmp_path, capsys):
    rows = _evaluated(lm_run)[::2]  # every client, test prompts of every task
    assert {r["client"] for r in rows} == {"echo", "plural", "shout"}
    requests = [{"client": r["client"], "instruction": r["prompt"], "id": i}
                for i, r in enumerate(rows)]
    src = _write_jsonl(tmp_path / "in.jsonl", requests)
    dst = tmp_path / "deep" / "out.jsonl"
    assert cli_main(["generate", "--run", str(lm_run), "--input", str(src), "--out", str(dst),
                     "--batch-size", "5", "--quiet"]) == 0
    assert f"{len(rows)} answers" in capsys.readouterr().out
    answers = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [a["id"] for a in answers] == list(range(len(rows)))  # input order, fields kept
    for answer, row in zip(answers, rows):
        assert answer["output"] == row["answer"]
        assert answer["global_w"] == pytest.approx(row["weights"]["global"], abs=1e-6)
        assert answer["local_w"] == pytest.approx(row["weights"]["local"], abs=1e-6)


def test_python_api_batches_any_mix_of_clients(lm_run):
    generator = ClientGenerator.from_run(lm_run, batch_size=4)
    try:
        assert generator.clients == ["echo", "plural", "shout"]
        requests = [Request(c, f"repeat the word {w}") for w in ("lamp", "book")
                    for c in ("shout", "echo", "plural", "echo")]
        batched = generator.generate(requests)
        alone = [generator.generate([r])[0] for r in requests]  # one row per call
        assert [a.output for a in batched] == [a.output for a in alone]
        for a, b in zip(batched, alone):
            assert a.global_w == pytest.approx(b.global_w, abs=1e-6)
            assert a.global_w + a.local_w == pytest.approx(1.0)
        assert generator.generate([]) == []
        with pytest.raises(ValueError, match="unknown client"):
            generator.generate([Request("nobody", "hi")])
    finally:
        generator.close()


@pytest.mark.parametrize("rows, message", [
    ([], "no requests"),
    (["", "  "], "no requests"),
    ([{"client": "echo"}], r"in.jsonl:1: missing field 'instruction'"),
    ([{"client": "echo", "instruction": "a"}, "{not json"], r"in.jsonl:2: not valid JSON"),
    ([{"client": "echo", "instruction": "a", "input": 3}], r"in.jsonl:1: field 'input'"),
    ([["echo"]], r"in.jsonl:1: a line must be a JSON object"),
    ([{"client": "echo", "instruction": "a"}, {"client": "bob", "instruction": "b"}],
     r"in.jsonl:2: unknown client 'bob'"),
])
def test_bad_input_names_the_line_and_writes_nothing(lm_run, tmp_path, rows, message):
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    dst = tmp_path / "out.jsonl"
    dst.write_text("kept\n")
    with pytest.raises(DataError, match=message):
        generate_file(lm_run, src, dst, progress=False)
    assert dst.read_text() == "kept\n"


def test_missing_files_unfinished_runs_and_other_tasks_are_refused(lm_run, tmp_path, capsys,
                                                                   bert_dir):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"client": "echo", "instruction": "a"}])
    dst = tmp_path / "out.jsonl"
    with pytest.raises(MissingFileError, match="no such file"):
        generate_file(lm_run, tmp_path / "absent.jsonl", dst, progress=False)
    with pytest.raises(MissingFileError, match="no checkpoint"):
        ClientGenerator.from_run(tmp_path)
    # the CLI: one line naming the problem, exit code 2, nothing written
    assert cli_main(["generate", "--run", str(tmp_path), "--input", str(src), "--out",
                     str(dst), "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not dst.exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    tensors, state = load_checkpoint(lm_run / "checkpoint.safetensors")
    save_checkpoint(unfinished / "checkpoint.safetensors", tensors,
                    dataclasses.replace(state, rounds_done=1))
    with pytest.raises(CheckpointError, match="stopped after 1 of 2 rounds"):
        ClientGenerator.from_run(unfinished)
    classify = tmp_path / "classify"
    run(tiny_cfg(bert_dir, classify, algo="local", rounds=1, final_eval="none"), progress=False)
    with pytest.raises(ConfigError, match="needs a causal-lm run"):
        ClientGenerator.from_run(classify)


def test_a_run_whose_base_model_is_gone_is_refused(tmp_path):
    model_dir = tiny_llama_dir(tmp_path)
    data_dir = causal_lm_data_dir(tmp_path)
    out = tmp_path / "run"
    run(tiny_cfg(model_dir, out, algo="local", task="causal-lm", data=str(data_dir), rounds=1,
                 final_eval="none"), progress=False)
    for f in model_dir.iterdir():
        f.unlink()
    model_dir.rmdir()
    with pytest.raises(ConfigError, match="--model"):
        ClientGenerator.from_run(out)


@pytest.mark.parametrize("algo", ["c2a", "fedalt"])
def test_context_methods_answer_one_client_at_a_time(tmp_path, algo):
    """C2A (generated adapters) and FedALT (each client its own Rest-of-World adapter and
    routers) answer as their final evaluation did."""
    model_dir, data_dir = tiny_llama_dir(tmp_path), causal_lm_data_dir(tmp_path)
    out = tmp_path / algo
    run(tiny_cfg(model_dir, out, algo=algo, task="causal-lm", data=str(data_dir),
                 max_new_tokens=4, test_limit=4), progress=False)
    rows = _evaluated(out)
    generator = ClientGenerator.from_run(out)
    assert generator.pool is None  # its evaluation enters a per-client context
    answers = generator.generate([Request(r["client"], r["prompt"]) for r in rows])
    assert [a.output for a in answers] == [r["answer"] for r in rows]
    assert [(a.global_w, a.local_w) for a in answers] == [
        (r["weights"]["global"], r["weights"]["local"]) for r in rows]
