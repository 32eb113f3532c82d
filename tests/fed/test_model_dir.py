"""A bad --model gets one typed line naming the file, exit 2, before anything is written."""
import json
import shutil

import pytest

from feddpa_fast.fed.cli import main as cli_main


def _train(model, out, capsys):
    code = cli_main(["train", "--model", str(model), "--clients", "2", "--rounds", "1",
                     "--max-steps", "1", "--test-limit", "2", "--r", "4", "--out", str(out),
                     "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def _broken(bert_dir, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    if how == "malformed config":
        (model / "config.json").write_text('{"model_type": "bert",')
    elif how == "config without model_type":
        (model / "config.json").write_text(json.dumps({"hidden_size": 32}))
    elif how == "truncated weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how == "no weights":
        (model / "model.safetensors").unlink()
    elif how == "no tokenizer":
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
    return model


@pytest.mark.parametrize("how, names", [
    ("malformed config", "config.json is not valid JSON"),
    ("config without model_type", "config.json has no model_type"),
    ("truncated weights", "model.safetensors is truncated"),
    ("no weights", "no weights there"),
    ("no tokenizer", "no tokenizer files there"),
])
def test_a_bad_model_directory_is_one_line_naming_the_file(bert_dir, tmp_path, capsys, how,
                                                           names):
    model = _broken(bert_dir, tmp_path, how)
    code, err = _train(model, tmp_path / "out", capsys)
    assert code == 2 and names in err and len(err.splitlines()) == 1, err
    assert err.startswith("feddpa-fast train: error: --model")
    assert not (tmp_path / "out").exists()


def test_a_mistyped_model_name_gets_a_suggestion(tmp_path, capsys):
    code, err = _train("smollm", tmp_path / "out", capsys)
    assert code == 2 and "did you mean --model smollm2?" in err and len(err.splitlines()) == 1
