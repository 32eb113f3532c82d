"""RunConfig, declared once (feddpa_fast/fed/run_config.py, fed/options.py): the CLI flags, the
``--config`` TOML file and the Flower run config derived from the declarations agree, and a
bad value fails, naming its flag, before any model or data loads."""
import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import transformers

import feddpa_fast.fed.flower as flower_pkg
from feddpa_fast.fed import loading, runner
from feddpa_fast.fed.algorithms import ALGORITHMS
from feddpa_fast.fed.algorithms.feddpa_weighting import WeightingConfig
from feddpa_fast.fed.cli import build_parser, config_from_args, main
from feddpa_fast.fed.data import DataError
from feddpa_fast.fed.flower.flower_config import EXTRA, app_config, from_flower, render_app_config
from feddpa_fast.fed.options import ConfigError, declared_fields, flag
from feddpa_fast.fed.run_config import RunConfig

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

APP_TOML = Path(flower_pkg.__file__).resolve().parent / "app" / "pyproject.toml"


def _declared():
    """(flag, field) of every declared option, RunConfig's then WeightingConfig's."""
    return ([(flag(f), f) for f in declared_fields(RunConfig)]
            + [(flag(f, "weighting"), f) for f in declared_fields(WeightingConfig)])


def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def _options(subparser) -> dict:
    return {s: a for a in subparser._actions for s in a.option_strings}


def _cfg(argv):
    return config_from_args(build_parser().parse_args(argv))


def _custom() -> RunConfig:
    """A RunConfig far from the defaults, every optional value set but one."""
    return RunConfig(algo="fedit", rounds=2, local_epochs=2, lr=0.01, r=4, alpha=8.0,
                     dropout=0.0, target_modules=("q_proj", "v_proj"), seed=3, out="runs/custom",
                     batch_size=4, max_steps=None, fraction=0.5, clients_per_round=3,
                     aggregation="trimmed-mean", trim=0.2, clip_norm=0.5, min_clients=2,
                     eval_every=0, test_limit=7, hostile="scale", hostile_clients=2,
                     num_beams=2, max_new_tokens=9, dtype="bf16", compile=True,
                     weighting=WeightingConfig(k=3, similarity="l2", reduction="max",
                                               representation="mean", cap=0.25,
                                               assignment="opposite"))


# ---- the three derived configurations agree -------------------------------------------------

def test_every_field_but_weighting_is_declared():
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert names - {f.name for f in declared_fields(RunConfig)} == {"weighting"}
    assert {f.name for f in dataclasses.fields(WeightingConfig)} == \
        {f.name for f in declared_fields(WeightingConfig)}
    assert flag(dataclasses.fields(RunConfig)[0]) == "--algo"
    local_epochs = next(f for f in declared_fields(RunConfig) if f.name == "local_epochs")
    assert flag(local_epochs) == "--local-epochs"
    assert flag(declared_fields(WeightingConfig)[0], "weighting") == "--weighting-k"


def test_every_declared_option_is_a_flag_of_train_and_compare_with_its_default_and_choices():
    _, subs = _subparsers()
    train, compare = _options(subs["train"]), _options(subs["compare"])
    assert "--algo" in train and "--algo" not in compare and "--algos" in compare
    for name, field in _declared():
        meta = field.metadata["option"]
        for command, options in (("train", train), ("compare", compare)):
            if command == "compare" and name == "--algo":
                continue
            assert name in options, (command, name)
            text = options[name].help.replace("%%", "%")
            assert options[name].default is None, name  # unset: the file or the default wins
            assert meta["help"] in text, name
            default = field.default
            shown = ("unset" if default is None
                     else ",".join(default) if isinstance(default, tuple) else str(default))
            assert f"default: {shown}" in text, (name, text)
            if meta["choices"]:
                assert "choices: " + ", ".join(str(c) for c in meta["choices"]) in text, name
            else:
                assert "choices:" not in text, name
    # Nothing else: the declared flags plus the commands' own.
    declared = {name for name, _ in _declared()}
    # A bool option is a pair of flags: --compile / --no-compile.
    own = {"-h", "--help", "--resume", "--config", "--quiet", "--threads", "--no-compile"}
    assert set(train) == declared | own
    assert set(compare) == (declared - {"--algo"}) | own | {"--algos"}


def test_help_of_a_few_flags_reads_right():
    _, subs = _subparsers()
    train = _options(subs["train"])
    assert "choices: " + ", ".join(ALGORITHMS) in train["--algo"].help
    assert "default: feddpa-t" in train["--algo"].help
    assert "default: unset" in train["--target-modules"].help
    assert "default: 8" in train["--max-steps"].help
    assert "default: 5" in train["--weighting-k"].help
    assert "choices: cos, l2, pearson" in train["--weighting-similarity"].help
    assert build_parser().parse_args(["train", "--rounds", "4"]).rounds == 4  # typed int


def test_no_flags_give_the_defaults():
    cfg = _cfg(["train"])
    assert cfg == RunConfig(out="runs/feddpa-t") == RunConfig()
    assert cfg.identity() == RunConfig().identity()
    assert _cfg(["compare"]) == RunConfig()
    assert _cfg(["train", "--algo", "fedit"]).out == "runs/fedit"  # out follows the method


def test_flags_build_the_config_they_name():
    cfg = _cfg(["train", "--rounds", "5", "--local-epochs", "2", "--target-modules",
                "q_proj, v_proj", "--clip-norm", "0.5", "--weighting-k", "3", "--hostile", "scale"])
    assert cfg == dataclasses.replace(RunConfig(), rounds=5, local_epochs=2,
                                      target_modules=("q_proj", "v_proj"), clip_norm=0.5,
                                      hostile="scale", weighting=WeightingConfig(k=3))


def test_toml_file_gives_the_config_of_the_same_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 2\nlocal_epochs = 2\nlr = 0.01\ntarget_modules = ["query", "value"]\n'
                    'max-steps = 4\nclip-norm = 0.5\naggregation = "fedavg"\n'
                    'hostile = "scale"\nout = "runs/from-toml"\n'
                    '[weighting]\nk = 3\ncap = 0.25\nsimilarity = "l2"\n')
    flags = ["--rounds", "2", "--local-epochs", "2", "--lr", "0.01", "--target-modules",
             "query,value", "--max-steps", "4", "--clip-norm", "0.5", "--aggregation", "fedavg",
             "--hostile", "scale", "--out", "runs/from-toml", "--weighting-k", "3",
             "--weighting-cap", "0.25", "--weighting-similarity", "l2"]
    from_file = _cfg(["train", "--config", str(path)])
    assert from_file == _cfg(["train", *flags])
    assert from_file.target_modules == ("query", "value") and from_file.weighting.k == 3
    assert from_file.weighting.cap == 0.25 and from_file.max_steps == 4
    # Flags win over the file; what the file does not set keeps its default.
    both = _cfg(["train", "--config", str(path), "--rounds", "7", "--weighting-k", "9"])
    assert both == dataclasses.replace(from_file, rounds=7,
                                       weighting=dataclasses.replace(from_file.weighting, k=9))
    assert both.batch_size == RunConfig().batch_size


def test_toml_file_with_every_key_gives_the_config_of_every_flag(tmp_path):
    cfg = dataclasses.replace(_custom(), max_steps=5)  # every optional value set
    values = {k: v for k, v in app_config(cfg).items() if k not in EXTRA}
    assert "" not in values.values() and 0 not in (values["max-steps"], values["clip-norm"])
    path = tmp_path / "every.toml"
    path.write_text("".join(f"{key} = {json.dumps(v)}\n" for key, v in values.items()))
    flags = [item for key, v in values.items()
             for item in ((f"--{key}" if v else f"--no-{key}",) if isinstance(v, bool)
                          else (f"--{key}", str(v)))]
    assert _cfg(["train", "--config", str(path)]) == cfg
    assert _cfg(["train", *flags]) == cfg


def test_toml_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 3\n")
    with pytest.raises(ValueError, match="unknown option 'epochs'"):
        _cfg(["train", "--config", str(bad)])
    bad.write_text("[weighting]\nkk = 3\n")
    with pytest.raises(ValueError, match="unknown option"):
        _cfg(["train", "--config", str(bad)])
    bad.write_text("rounds = 0\n")
    with pytest.raises(ConfigError, match="--rounds"):
        _cfg(["train", "--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="--config"):
        _cfg(["train", "--config", str(tmp_path / "missing.toml")])


@pytest.mark.parametrize("cfg", [RunConfig(), _custom(),
                                 dataclasses.replace(RunConfig(), target_modules=("query", "value"),
                                                     max_steps=None, clip_norm=0.5,
                                                     weighting=WeightingConfig(k=3),
                                                     hostile="scale")],
                         ids=["default", "custom", "brief"])
def test_flower_run_config_round_trips(cfg):
    flat = app_config(cfg)
    assert list(flat)[-len(EXTRA):] == list(EXTRA)
    assert all(v is not None for v in flat.values())  # unset: 0 or "" (Flower has no None)
    assert from_flower(flat) == cfg
    assert tomllib.loads(render_app_config(cfg)) == flat


def test_flower_run_config_encodes_unset_values():
    flat = app_config(dataclasses.replace(RunConfig(), max_steps=None,
                                          target_modules=("query", "value")))
    assert flat["max-steps"] == 0 and flat["clip-norm"] == 0 and flat["hostile"] == ""
    assert flat["target-modules"] == "query,value" and flat["weighting-k"] == 5
    assert from_flower({"max-steps": 0, "target-modules": "query, value"}) == \
        dataclasses.replace(RunConfig(), max_steps=None, target_modules=("query", "value"))


def test_flower_app_pyproject_holds_the_derived_config():
    app = tomllib.loads(APP_TOML.read_text())["tool"]["flwr"]["app"]
    assert app["config"] == app_config(RunConfig(out="runs/flower-feddpa-t"))
    assert list(app["config"]) == list(app_config(RunConfig()))  # same keys, same order
    assert app["components"] == {"serverapp": "feddpa_fast.fed.flower.server_app:server_app",
                                 "clientapp": "feddpa_fast.fed.flower.client_app:client_app"}
    assert from_flower(app["config"]) == RunConfig(out="runs/flower-feddpa-t")


def test_from_flower_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="epochs"):
        from_flower({"epochs": 3})
    with pytest.raises(ConfigError, match="--rounds"):
        from_flower({"rounds": 0})
    with pytest.raises(ConfigError, match="--weighting-cap"):
        from_flower({"weighting-cap": 1.5})
    assert from_flower({"torch-threads": 4, "node-wait": 1.0}) == RunConfig()  # app settings


# ---- validation before anything loads, as a new user meets it ----------------------------

@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    """Runs in tmp_path; any model load or run build fails the test loudly."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded")

    for cls in (transformers.AutoTokenizer, transformers.AutoModel,
                transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    return refuse


def _fails(capsys, argv, out: Path) -> str:
    """Runs ``main(argv + --out out)``; checks it fails with 2 and wrote nothing; stderr."""
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"feddpa-fast {argv[0]}: error: "), err
    assert not out.exists() or not any(out.iterdir())
    return err


@pytest.mark.parametrize("argv, words", [
    (["--rounds", "-1"], ["--rounds must be >= 1", "-1"]),
    (["--rounds", "0"], ["--rounds"]),
    (["--algo", "nope"], ["--algo", "'nope'", *ALGORITHMS]),
    (["--dropout", "1.0"], ["--dropout must be < 1"]),
    (["--fraction", "0"], ["--fraction must be > 0"]),
    (["--lr", "nan"], ["--lr must be finite"]),
    (["--weighting-cap", "2"], ["--weighting-cap must be <= 1"]),
    (["--weighting-k", "0"], ["--weighting-k"]),
    (["--weighting-similarity", "dot"], ["--weighting-similarity", "cos, l2, pearson"]),
    (["--aggregation", "x"], ["--aggregation", "fedavg", "median", "trimmed-mean"]),
    (["--hostile", "bogus"], ["--hostile", "scale", "signflip"]),
    (["--model", "builtin", "--task", "causal-lm"], ["--model builtin", "--task"]),
    (["--data", "builtin", "--task", "causal-lm", "--model", "smollm2"], ["--data builtin"]),
])
def test_bad_flag_fails_naming_it_before_anything_loads(no_loading, capsys, tmp_path, argv,
                                                        words):
    out = tmp_path / "run"
    for command in ("train", "compare"):
        if command == "compare" and "--algo" in argv:
            continue
        err = _fails(capsys, [command, *argv], out)
        for word in words:
            assert word in err, (word, err)
    assert list(tmp_path.iterdir()) == []  # nothing written at all


def test_model_dir_without_config_json_fails_fast(no_loading, capsys, tmp_path):
    empty = tmp_path / "my-model"
    empty.mkdir()
    err = _fails(capsys, ["train", "--model", str(empty)], tmp_path / "run")
    assert "--model" in err and "config.json" in err and str(empty) in err
    err = _fails(capsys, ["train", "--model", str(tmp_path / "nowhere")], tmp_path / "run")
    assert "--model" in err and "no such directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model"]


def _jsonl(path: Path, *lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return path


def test_malformed_data_fails_naming_file_and_line_before_the_model_loads(no_loading, capsys,
                                                                          tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train = _jsonl(data / "train.jsonl",
                   {"text": "a", "label": "x", "choices": ["x", "y"], "task": "t"}, "not json")
    _jsonl(data / "test.jsonl", {"text": "b", "label": "y", "choices": ["x", "y"], "task": "t"})
    out = tmp_path / "run"
    err = _fails(capsys, ["train", "--model", "builtin", "--data", str(data)], out)
    assert f"{train}:2" in err and "not valid JSON" in err
    cfg = RunConfig(model="builtin", data=str(data), out=str(out))
    with pytest.raises(DataError, match=re.escape(f"{train}:2")):
        runner.run(cfg)
    with pytest.raises(DataError, match=re.escape(f"{train}:2")):
        runner.build_run(cfg)
    assert not out.exists()


def test_data_dir_without_test_jsonl_names_data(no_loading, capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "train.jsonl", {"text": "a", "label": "x", "choices": ["x", "y"], "task": "t"})
    err = _fails(capsys, ["train", "--data", str(data)], tmp_path / "run")
    assert "--data" in err and "test.jsonl" in err
    err = _fails(capsys, ["train", "--data", str(tmp_path / "nowhere")], tmp_path / "run")
    assert "--data" in err and "no such directory" in err
    with pytest.raises(ConfigError, match="--data"):
        loading.load_data(RunConfig(data=str(data)))


def test_existing_run_is_not_overwritten(no_loading, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"not a real checkpoint")
    code = main(["train", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors"]
    with pytest.raises(FileExistsError):
        runner.run(RunConfig(out=str(out)))
    code = main(["train", "--resume", "--out", str(tmp_path / "fresh")])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


# ---- RunConfig itself ---------------------------------------------------------------------

def test_run_config_checks_its_values():
    with pytest.raises(ConfigError, match="^--rounds must be >= 1, got 0$"):
        RunConfig(rounds=0)
    with pytest.raises(ConfigError, match="--lr"):
        RunConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="--lr"):
        RunConfig(lr=0.0)
    with pytest.raises(ConfigError, match="--hostile"):
        RunConfig(hostile="bogus")
    with pytest.raises(ConfigError, match="--rounds must be of type int"):
        RunConfig(rounds=2.5)
    with pytest.raises(ConfigError, match="--rounds must be of type int"):
        RunConfig(rounds=True)
    with pytest.raises(ConfigError, match="--r must be given"):
        RunConfig(r=None)
    with pytest.raises(ConfigError, match="--target-modules"):
        RunConfig(target_modules=("q_proj", ""))
    with pytest.raises(ConfigError, match="weighting"):
        RunConfig(weighting={"k": 3})
    with pytest.raises(ConfigError, match="--model builtin"):
        RunConfig(task="causal-lm")
    with pytest.raises(ConfigError, match="--model smollm2"):
        RunConfig(model="smollm2")
    assert RunConfig(max_steps=None).max_steps is None
    assert RunConfig(hostile="signflip").hostile == "signflip"
    assert RunConfig(alpha=16) == RunConfig(alpha=16.0)


def test_weighting_config_checks_its_values():
    with pytest.raises(ConfigError, match="--weighting-k"):
        WeightingConfig(k=0)
    with pytest.raises(ConfigError, match="--weighting-cap"):
        WeightingConfig(cap=1.5)
    with pytest.raises(ConfigError, match="--weighting-assignment"):
        WeightingConfig(assignment="both")
    assert WeightingConfig(k=1, cap=0.0).cap == 0.0


def test_run_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().rounds = 5


@pytest.mark.parametrize("cfg", [RunConfig(), _custom(),
                                 dataclasses.replace(RunConfig(), max_new_tokens=64)],
                         ids=["default", "custom", "decoding"])
def test_identity_round_trips(cfg):
    identity = cfg.identity()
    assert "out" not in identity
    json.dumps(identity)  # a checkpoint stores it as JSON
    resolved = cfg.with_base_dtype()[0]  # an unset --dtype is recorded as resolved
    assert RunConfig.from_identity(identity, cfg.out) == resolved
    assert RunConfig.from_identity(json.loads(json.dumps(identity)), cfg.out) == resolved
    assert RunConfig.from_identity(identity, "elsewhere").out == "elsewhere"
    # Checkpoint schema 4 records every option (fed/run_state.py).
    assert {"num_beams", "max_new_tokens", "prompt_format", "wire_dtype", "dtype",
            "cohort_size"} <= set(identity)


def test_zero_unsets_an_optional_flag_as_in_the_flower_run_config():
    """The authors' setting (docs/trainer.md, CLI): --max-steps 0 --test-limit 0 means no cap."""
    args = build_parser().parse_args(["train", "--max-steps", "0", "--test-limit", "0",
                                      "--clip-norm", "0", "--rounds", "2"])
    cfg = config_from_args(args)
    assert (cfg.max_steps, cfg.test_limit, cfg.clip_norm, cfg.rounds) == (None, None, None, 2)
    with pytest.raises(ConfigError, match="--rounds"):  # a required field has no 'unset'
        config_from_args(build_parser().parse_args(["train", "--rounds", "0"]))


def test_a_checkpoint_from_before_prompt_format_reads_as_alpaca():
    """Runs before --prompt-format used the Alpaca template whatever the model: a schema-1
    identity without the field is an Alpaca run, and today's default (auto) is recorded."""
    from feddpa_fast.fed.run_state import RunState

    cfg = RunConfig()
    identity = cfg.identity()
    assert identity["prompt_format"] == "auto"
    old = {k: v for k, v in identity.items() if k != "prompt_format"}
    state = RunState.from_json({"config": old, "seed": 0, "rounds_done": 1})  # schema 1
    assert RunConfig.from_identity(state.config, "x").prompt_format == "alpaca"
    alpaca = dataclasses.replace(cfg, prompt_format="alpaca")
    assert alpaca.identity() == state.config  # so an Alpaca run resumes the old checkpoint
