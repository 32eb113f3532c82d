"""The lexical suite (feddpa_fast/fed/lexical): the WordNet and dictd readers and the suite builder,
on fixture files in the real formats (tests/lexical_fixtures.py); no system package is read."""
from __future__ import annotations

import gzip
import json

import pytest
from lexical_fixtures import write_dictionary, write_sources

from feddpa_fast.fed.cli import main
from feddpa_fast.fed.data import DataError, load_data_dir
from feddpa_fast.fed.lexical import (
    LEXICAL_TASKS,
    MissingSourceError,
    build_lexical,
    load_sources,
    write_lexical,
)
from feddpa_fast.fed.lexical.dictd import Dictionary, b64_number
from feddpa_fast.fed.lexical.wordnet import read_data, read_index

TASK_NAMES = [t.name for t in LEXICAL_TASKS]


@pytest.fixture
def sources_dirs(tmp_path):
    return write_sources(tmp_path / "raw")


def _build(dirs, **kw):
    kw = {"train_per_task": 3, "test_per_task": 2, **kw}
    return build_lexical(load_sources(*dirs), **kw)


def test_eight_tasks_with_the_requested_split_sizes(sources_dirs):
    train, test, stats = _build(sources_dirs)
    assert list(train) == list(test) == TASK_NAMES
    assert all(len(train[t]) == 3 and len(test[t]) == 2 for t in TASK_NAMES)
    assert all(e.task == t and e.instruction for t in TASK_NAMES for e in train[t] + test[t])
    assert set(stats) == set(TASK_NAMES)


def test_answers_come_from_the_sources(sources_dirs):
    sources = load_sources(*sources_dirs)
    answer = {t.name: t.answer for t in LEXICAL_TASKS}
    assert answer["define"](sources, "cat") == "feline mammal usually having thick soft fur"
    assert answer["synonym"](sources, "cat") == "true cat"
    assert answer["antonym"](sources, "good") == "bad"
    assert answer["hypernym"](sources, "cat") == "feline"
    assert answer["category"](sources, "cat") == "animal"
    assert answer["category"](sources, "animal") is None  # noun.Tops names no category
    assert answer["french"](sources, "cat") == "chat"      # "1. chat, matou": first sense
    assert answer["german"](sources, "cat") == "Katze"     # markup removed
    assert answer["computing"](sources, "file") == "A collection of data stored under one name"
    assert answer["computing"](sources, "horse") is None   # a cross-reference
    assert answer["french"](sources, "zebra") is None


def test_the_same_seed_writes_the_same_bytes(sources_dirs, tmp_path):
    for out in ("a", "b"):
        write_lexical(tmp_path / out, wordnet_dir=sources_dirs[0], dictd_dir=sources_dirs[1],
                      train_per_task=3, test_per_task=2)
    for name in ("train.jsonl", "test.jsonl", "suite.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_lexical(tmp_path / "c", wordnet_dir=sources_dirs[0], dictd_dir=sources_dirs[1],
                  train_per_task=3, test_per_task=2, seed=1)
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != \
        (tmp_path / "a" / "train.jsonl").read_bytes()


def test_no_example_in_both_splits_and_words_shared_across_tasks(sources_dirs):
    train, test, stats = _build(sources_dirs)
    for task in TASK_NAMES:
        assert not {e.input for e in train[task]} & {e.input for e in test[task]}
    # The same word under different instructions, with different targets.
    by_word = {}
    for split in (train, test):
        for examples in split.values():
            for e in examples:
                by_word.setdefault(e.input, {})[e.task] = e.output
    shared = {w: t for w, t in by_word.items() if len(t) >= 3}
    assert shared, "no word is asked by three tasks"
    assert any(len(set(t.values())) == len(t) for t in shared.values())
    assert sum(s["test_words_in_other_tasks"] for s in stats.values()) > 0


def test_written_jsonl_is_the_projects_causal_lm_format(sources_dirs, tmp_path):
    summary = write_lexical(tmp_path / "suite", wordnet_dir=sources_dirs[0],
                            dictd_dir=sources_dirs[1], train_per_task=3, test_per_task=2)
    train, test = load_data_dir(tmp_path / "suite", "causal-lm")
    assert list(train) == TASK_NAMES and all(len(test[t]) == 2 for t in TASK_NAMES)
    assert json.loads((tmp_path / "suite" / "suite.json").read_text()) == summary
    assert not list((tmp_path / "suite").glob(".*.tmp"))


def test_cli_build_lexical(sources_dirs, tmp_path, capsys):
    rc = main(["data", "build-lexical", "--out", str(tmp_path / "cli"), "--wordnet-dir",
               str(sources_dirs[0]), "--dictd-dir", str(sources_dirs[1]), "--train-per-task",
               "3", "--test-per-task", "2"])
    assert rc == 0
    assert (tmp_path / "cli" / "train.jsonl").is_file()
    assert "computing" in capsys.readouterr().out


def test_missing_dictionary_names_the_package_and_the_flag(sources_dirs, tmp_path, capsys):
    (sources_dirs[1] / "foldoc.dict.dz").unlink()
    with pytest.raises(MissingSourceError, match="dict-foldoc") as err:
        load_sources(*sources_dirs)
    assert "--dictd-dir" in str(err.value) and "--wordnet-dir" not in str(err.value)
    rc = main(["data", "build-lexical", "--out", str(tmp_path / "x"), "--wordnet-dir",
               str(tmp_path / "none"), "--dictd-dir", str(sources_dirs[1])])
    message = capsys.readouterr().err
    assert rc == 2 and "wordnet-base" in message and "--wordnet-dir" in message
    assert not (tmp_path / "x").exists()


def test_an_empty_task_is_an_error_naming_it(sources_dirs):
    write_dictionary(sources_dirs[1], "foldoc", {"horse": "horse\n\n   See {Trojan horse}.\n"})
    with pytest.raises(DataError, match="'computing'.*0 usable words"):
        _build(sources_dirs)


def test_too_few_words_for_the_split_is_an_error(sources_dirs):
    with pytest.raises(DataError, match="define.*30 usable words, fewer than the 60"):
        _build(sources_dirs, train_per_task=50, test_per_task=10)


# ---- the WordNet reader -------------------------------------------------------------------
def _replace_line(path, lineno, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text
    path.write_text("".join(lines))


@pytest.mark.parametrize("bad", [
    "00000100 05 n zz cat 0 000 | bad word count\n",
    "00000100 99 n 01 cat 0 000 | no such lexicographer file\n",
    "00000100 05 q 01 cat 0 000 | bad ss_type\n",
    "00000100 05 n 01 cat 0 002 @ 00000001 n 0000 | one pointer of two\n",
    "00000100 05 n\n",
])
def test_malformed_data_line_names_file_and_line(sources_dirs, bad):
    path = sources_dirs[0] / "data.noun"
    _replace_line(path, 4, bad)
    with pytest.raises(DataError, match=r"data\.noun:4: "):
        read_data(path)


def test_data_line_at_the_wrong_byte_offset(sources_dirs):
    path = sources_dirs[0] / "data.noun"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3] + lines[4:]))  # a line removed: later offsets shift
    with pytest.raises(DataError, match=r"data\.noun:4: the line says offset"):
        read_data(path)


def test_malformed_index_line_names_file_and_line(sources_dirs):
    path = sources_dirs[0] / "index.noun"
    _replace_line(path, 3, "cat n 2 1 @ 2 0 00000123\n")  # two synsets, one offset
    with pytest.raises(DataError, match=r"index\.noun:3: synset_cnt 2 but 1 offsets"):
        read_index(path)


def test_index_pointing_nowhere(sources_dirs):
    path = sources_dirs[0] / "index.noun"
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("cat "))
    _replace_line(path, path.read_text().splitlines().index(line) + 1,
                  "cat n 1 1 @ 1 0 00999999  \n")
    with pytest.raises(DataError, match="no synset at offset 999999"):
        _build(sources_dirs)


# ---- the dictd reader ---------------------------------------------------------------------
def test_b64_numbers():
    assert b64_number("A") == 0 and b64_number("B") == 1 and b64_number("BA") == 64
    assert b64_number("b6r") == 27 * 64 * 64 + 58 * 64 + 43
    with pytest.raises(ValueError):
        b64_number("a-b")


@pytest.mark.parametrize("line, match", [("cat\tBA\n", "expected headword<TAB>offset"),
                                         ("cat\tB!\tC\n", "bad offset or length")])
def test_malformed_dictd_index_line(sources_dirs, line, match):
    path = sources_dirs[1] / "freedict-eng-fra.index"
    _replace_line(path, 2, line)
    with pytest.raises(DataError, match=rf"freedict-eng-fra\.index:2: {match}"):
        Dictionary(sources_dirs[1], "freedict-eng-fra")


def test_index_offset_past_the_end_of_the_text(sources_dirs):
    path = sources_dirs[1] / "freedict-eng-fra.index"
    lines = path.read_text().splitlines(keepends=True)
    lines.append("zebra\tBAAA\tB\n")
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"\.index:\d+: entry 'zebra' ends at byte 262145, past"):
        Dictionary(sources_dirs[1], "freedict-eng-fra")


def test_truncated_dict_dz(sources_dirs):
    path = sources_dirs[1] / "foldoc.dict.dz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="foldoc.dict.dz: not a complete gzip"):
        Dictionary(sources_dirs[1], "foldoc")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a complete gzip"):
        Dictionary(sources_dirs[1], "foldoc")


def test_dictionary_entries_and_metadata(sources_dirs):
    d = Dictionary(sources_dirs[1], "freedict-eng-deu")
    assert "00databaseinfo" not in d.headwords()
    assert d.entries("CAT")[0].startswith("cat /y/\nKatze")
    assert gzip.decompress((sources_dirs[1] / "freedict-eng-deu.dict.dz").read_bytes())
