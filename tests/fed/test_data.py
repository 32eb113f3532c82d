"""feddpa_fast.fed.data: JSONL loading, partitioning, and the built-in synthetic suite."""
import collections
import dataclasses
import hashlib
import json
import math

import pytest

from feddpa_fast.fed import builtin_suite as suite_mod
from feddpa_fast.fed.data import (
    BUILTIN_PAIRS,
    BUILTIN_TASKS,
    ClassifyExample,
    DataError,
    LMExample,
    builtin_suite,
    load_data_dir,
    load_jsonl,
    partition_by_task,
    partition_dirichlet,
)


@pytest.fixture(scope="module")
def suite():
    return builtin_suite(0)


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# ----------------------------------------------------------------------------- built-in suite
def test_builtin_tasks_and_sizes(suite):
    train, test = suite
    assert len(BUILTIN_TASKS) == 8 and len(set(BUILTIN_TASKS)) == 8
    assert tuple(train) == BUILTIN_TASKS and tuple(test) == BUILTIN_TASKS
    for task in BUILTIN_TASKS:
        assert len(train[task]) == 300 and len(test[task]) == 100


def test_builtin_deterministic(suite):
    again = builtin_suite(0)
    assert again == suite
    other = builtin_suite(1)
    for task in BUILTIN_TASKS:
        assert [e.text for e in other[0][task]] != [e.text for e in suite[0][task]]


def test_builtin_golden_digest(suite):
    # Pins the exact output for seed 0: any change to the word lists, templates or the random
    # streams (or a platform whose `random` differs) shows up here.
    blob = json.dumps([[(e.text, e.label, e.choices, e.task) for t in BUILTIN_TASKS for e in s[t]]
                       for s in suite])
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == GOLDEN_SEED0


GOLDEN_SEED0 = "2f21704eca9cc0ee"


def test_builtin_examples_well_formed(suite):
    train, test = suite
    for task in BUILTIN_TASKS:
        choices = suite_mod.choices(task)
        assert 2 <= len(choices) <= 4 and len(set(choices)) == len(choices)
        for ex in train[task] + test[task]:
            assert isinstance(ex, ClassifyExample)
            assert ex.task == task and ex.choices == choices and ex.label in ex.choices
            assert 5 <= len(ex.text.split()) <= 15, ex.text
            # the label is a function of the sentence alone
            assert suite_mod.label_text(task, ex.text) == ex.label


@pytest.mark.parametrize("split", [0, 1])
def test_builtin_balanced(suite, split):
    for task in BUILTIN_TASKS:
        examples = suite[split][task]
        counts = collections.Counter(e.label for e in examples)
        assert set(counts) == set(suite_mod.choices(task))
        even = len(examples) / len(counts)
        assert all(abs(c - even) <= 0.1 * even for c in counts.values()), (task, counts)


def test_builtin_no_train_test_overlap(suite):
    train, test = suite
    for task in BUILTIN_TASKS:
        train_texts = {e.text for e in train[task]}
        assert len(train_texts) == 300
        assert not train_texts & {e.text for e in test[task]}, task


def _conditional_accuracy(xs, ys):
    """Accuracy of the best predictor of y from x (majority y per x value)."""
    by_x = collections.defaultdict(collections.Counter)
    for x, y in zip(xs, ys):
        by_x[x][y] += 1
    return sum(c.most_common(1)[0][1] for c in by_x.values()) / len(xs)


def test_builtin_paired_tasks_really_differ(suite):
    train, _ = suite
    assert len(BUILTIN_PAIRS) >= 2
    for a, b in BUILTIN_PAIRS:
        for own, other in ((a, b), (b, a)):
            texts = [e.text for e in train[own]]
            mine = [e.label for e in train[own]]
            theirs = [suite_mod.label_text(other, t) for t in texts]  # same sentences, other task
            chance = max(collections.Counter(theirs).values()) / len(theirs)
            assert _conditional_accuracy(mine, theirs) <= chance + 0.05, (own, other)


def test_builtin_label_names_collide_with_different_meanings():
    # The same label names mean different things on different clients.
    assert suite_mod.choices("urgency") == suite_mod.choices("resolved") == ("yes", "no")
    assert suite_mod.choices("precipitation") == suite_mod.choices("scope")
    assert ("urgency", "resolved") in BUILTIN_PAIRS
    assert suite_mod.label_text("urgency", "Ticket #1001: the printer works again; this is "
                                "critical.") == "yes"
    assert suite_mod.label_text("resolved", "Ticket #1001: the printer is still broken; this "
                                "is critical.") == "no"


# ----------------------------------------------------------------------------- JSONL
def test_load_jsonl_classify_round_trip(tmp_path):
    path = _write(tmp_path / "c.jsonl", [
        {"text": "good film", "label": "pos"},
        "",
        {"text": "bad film", "label": "neg", "id": 7},
        {"text": "is it late?", "label": "yes", "choices": ["no", "yes", "no"], "task": "late"},
        {"text": "sunny", "label": "dry", "task": "rain"},
        {"text": "wet", "label": "wet", "task": "rain"},
        "   ",
    ])
    got = load_jsonl(path, "classify", default_task="films")
    assert got == [
        ClassifyExample("good film", "pos", ("neg", "pos"), "films"),
        ClassifyExample("bad film", "neg", ("neg", "pos"), "films"),
        ClassifyExample("is it late?", "yes", ("no", "yes"), "late"),
        ClassifyExample("sunny", "dry", ("dry", "wet"), "rain"),
        ClassifyExample("wet", "wet", ("dry", "wet"), "rain"),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].label = "x"  # frozen


def test_load_jsonl_causal_lm_round_trip(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 3", "output": "5", "task": "math"},
            {"instruction": "Greet.", "output": "Hello!"}]
    got = load_jsonl(_write(tmp_path / "lm.jsonl", rows), "causal-lm")
    assert got == [LMExample("Add.", "2 3", "5", "math"), LMExample("Greet.", "", "Hello!",
                                                                   "default")]


BAD_CLASSIFY = [
    ('{"text": "x", "label": ', "not valid JSON"),
    ('["text", "label"]', "expected a JSON object"),
    ({"label": "a"}, "missing field 'text'"),
    ({"text": "x"}, "missing field 'label'"),
    ({"text": 3, "label": "a"}, "'text' must be a string"),
    ({"text": "x", "label": 1}, "'label' must be a string"),
    ({"text": "  ", "label": "a"}, "'text' is empty"),
    ({"text": "x", "label": ""}, "'label' is empty"),
    ({"text": "x", "label": "a", "choices": "a,b"}, "list of non-empty strings"),
    ({"text": "x", "label": "a", "choices": ["a", 2]}, "list of non-empty strings"),
    ({"text": "x", "label": "a", "choices": ["a", "a"]}, "at least 2 distinct"),
    ({"text": "x", "label": "c", "choices": ["a", "b"]}, "not in choices"),
    ({"text": "x", "label": "a", "task": 5}, "'task' must be a string"),
    ({"text": "x", "label": "a", "task": ""}, "'task' is empty"),
]
BAD_LM = [
    ({"output": "y"}, "missing field 'instruction'"),
    ({"instruction": "i"}, "missing field 'output'"),
    ({"instruction": "i", "output": " "}, "'output' is empty"),
    ({"instruction": "i", "input": 3, "output": "y"}, "'input' must be a string"),
    ({"instruction": ["i"], "output": "y"}, "'instruction' must be a string"),
    ("42", "expected a JSON object"),
]


@pytest.mark.parametrize("kind,bad,message",
                         [("classify", b, m) for b, m in BAD_CLASSIFY]
                         + [("causal-lm", b, m) for b, m in BAD_LM])
def test_load_jsonl_malformed_line_names_file_and_line(tmp_path, kind, bad, message):
    good = ({"text": "fine", "label": "a", "choices": ["a", "b"]} if kind == "classify"
            else {"instruction": "i", "output": "o"})
    path = _write(tmp_path / "bad.jsonl", [good, "", bad, good])   # bad line is line 3
    with pytest.raises(DataError) as err:
        load_jsonl(path, kind)
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_load_jsonl_empty_single_label_unknown_kind(tmp_path):
    for content in ("", "\n  \n"):
        (tmp_path / "e.jsonl").write_text(content)
        with pytest.raises(DataError, match="empty file"):
            load_jsonl(tmp_path / "e.jsonl", "classify")
    path = _write(tmp_path / "one.jsonl", [{"text": "x", "label": "a", "task": "t"},
                                          {"text": "y", "label": "a", "task": "t"}])
    with pytest.raises(DataError, match=f"{path}:1: task 't' has a single label"):
        load_jsonl(path, "classify")
    with pytest.raises(DataError, match="unknown data kind"):
        load_jsonl(path, "regression")


# ----------------------------------------------------------------------------- partitioning
def test_partition_by_task_order():
    exs = [ClassifyExample(str(i), "a", ("a", "b"), t) for i, t in enumerate("bcbab")]
    got = partition_by_task(exs)
    assert list(got) == ["b", "c", "a"]
    assert [e.text for e in got["b"]] == ["0", "2", "4"]
    assert partition_by_task([]) == {}


def _dataset(n=600, labels=("a", "b", "c", "d")):
    return [ClassifyExample(f"t{i}", labels[i % len(labels)], tuple(labels), "x") for i in range(n)]


def _label_entropy(client):
    counts = collections.Counter(e.label for e in client)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_partition_dirichlet_deterministic_and_covering():
    data = _dataset()
    parts = partition_dirichlet(data, 7, 0.5, seed=3)
    assert parts == partition_dirichlet(data, 7, 0.5, seed=3)
    assert parts != partition_dirichlet(data, 7, 0.5, seed=4)
    assert len(parts) == 7 and all(parts)
    texts = [e.text for p in parts for e in p]
    assert sorted(texts) == sorted(e.text for e in data)   # each example exactly once
    order = {e.text: i for i, e in enumerate(data)}
    assert all([order[e.text] for e in p] == sorted(order[e.text] for e in p) for p in parts)


def test_partition_dirichlet_every_client_nonempty_when_skewed():
    data = _dataset(40, ("a", "b"))
    for seed in range(5):
        parts = partition_dirichlet(data, 10, 0.05, seed)
        assert all(parts) and sum(map(len, parts)) == 40
    parts = partition_dirichlet(data[:6], 6, 0.1, 0)   # as many clients as examples
    assert [len(p) for p in parts] == [1] * 6


def test_partition_dirichlet_skew_decreases_with_alpha():
    data = _dataset()
    def mean_entropy(alpha):
        return sum(_label_entropy(p) for p in partition_dirichlet(data, 8, alpha, 0)) / 8
    skewed, flat = mean_entropy(0.1), mean_entropy(100.0)
    assert skewed < 0.8 < 1.3 < flat <= math.log(4) + 1e-9


@pytest.mark.parametrize("args,message", [
    ((0, 0.5), "n_clients"), ((2.0, 0.5), "n_clients"), ((True, 0.5), "n_clients"),
    ((2, 0.0), "alpha"), ((2, -1.0), "alpha"), ((2, float("nan")), "alpha"),
    ((2, float("inf")), "alpha"), ((11, 0.5), "only 10 examples"),
])
def test_partition_dirichlet_bad_args(args, message):
    with pytest.raises(DataError, match=message):
        partition_dirichlet(_dataset(10), *args, seed=0)


def test_partition_dirichlet_rejects_lm_examples():
    with pytest.raises(DataError, match="classification"):
        partition_dirichlet([LMExample("i", "", "o", "t")] * 3, 2, 1.0, 0)


# ----------------------------------------------------------------------------- data directories
def test_load_data_dir_by_task(tmp_path, caplog):
    _write(tmp_path / "train.jsonl", [{"text": f"s{i}", "label": "ab"[i // 2 % 2], "task": t}
                                      for i, t in enumerate(["y", "x", "y", "x", "y"])])
    _write(tmp_path / "test.jsonl", [{"text": f"q{i}", "label": "ba"[i % 2], "task": t}
                                     for i, t in enumerate(["x", "y", "x"])])
    train, test = load_data_dir(tmp_path, "classify")  # one client per task, in file order
    assert list(train) == list(test) == ["y", "x"]
    first, first_test = load_data_dir(tmp_path, "classify", clients=1)  # honoured: 1 task
    assert list(first) == list(first_test) == ["y"] and first["y"] == train["y"]
    with caplog.at_level("WARNING"):
        assert load_data_dir(tmp_path, "classify", clients=99) == (train, test)
    assert "clients=99, but the lines carry 2 tasks" in caplog.text
    assert [e.text for e in train["y"]] == ["s0", "s2", "s4"]
    assert [e.text for e in test["x"]] == ["q0", "q2"]

    _write(tmp_path / "test.jsonl", [{"text": "q", "label": "a", "task": "y"}])
    with pytest.raises(DataError, match="task 'x' of train.jsonl has no test examples"):
        load_data_dir(tmp_path, "classify")
    _write(tmp_path / "test.jsonl", [{"text": "q", "label": "a", "task": t} for t in "xyz"])
    with pytest.raises(DataError, match="task 'z' of test.jsonl has no training examples"):
        load_data_dir(tmp_path, "classify")
    _write(tmp_path / "test.jsonl", [{"text": "q", "label": "a", "task": "x"},
                                     {"text": "r", "label": "a"}])
    with pytest.raises(DataError, match=f"{tmp_path / 'test.jsonl'}:2: missing field 'task'"):
        load_data_dir(tmp_path, "classify")


def test_load_data_dir_dirichlet(tmp_path):
    rows = [{"text": f"s{i}", "label": "abc"[i % 3]} for i in range(90)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "test.jsonl", [{"text": f"q{i}", "label": "cab"[i % 3]} for i in range(30)])
    train, test = load_data_dir(tmp_path, "classify", clients=4, alpha=0.3, seed=5)
    names = ["client0", "client1", "client2", "client3"]
    assert list(train) == list(test) == names
    assert all(train.values()) and all(test.values())
    assert sum(map(len, train.values())) == 90 and sum(map(len, test.values())) == 30
    assert list(train.values()) == partition_dirichlet(load_jsonl(tmp_path / "train.jsonl",
                                                                  "classify"), 4, 0.3, 5)
    assert load_data_dir(tmp_path, "classify", clients=4, alpha=0.3, seed=5) == (train, test)
    # same proportions for train and test: the clients' dominant labels agree
    for name in names:
        if len(test[name]) >= 5:
            top = collections.Counter(e.label for e in train[name]).most_common(1)[0][0]
            assert collections.Counter(e.label for e in test[name])[top] > 0
    with pytest.raises(DataError, match="clients"):
        load_data_dir(tmp_path, "classify")
    with pytest.raises(DataError, match="test.jsonl.*only 30 examples"):
        load_data_dir(tmp_path, "classify", clients=31)


def test_load_data_dir_choices_shared_across_files(tmp_path):
    _write(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    _write(tmp_path / "test.jsonl", [{"text": "c", "label": "z"}, {"text": "d", "label": "x"}])
    train, test = load_data_dir(tmp_path, "classify", clients=2)
    assert {e.choices for c in (*train.values(), *test.values()) for e in c} == {("x", "y", "z")}


def test_load_data_dir_causal_lm_without_tasks(tmp_path):
    _write(tmp_path / "train.jsonl", [{"instruction": f"i{k}", "output": "o"} for k in range(10)])
    _write(tmp_path / "test.jsonl", [{"instruction": f"j{k}", "output": "o"} for k in range(4)])
    train, test = load_data_dir(tmp_path, "causal-lm", clients=3, seed=1)
    assert [len(v) for v in train.values()] == [4, 3, 3]
    assert [len(v) for v in test.values()] == [2, 1, 1]
    assert sorted(e.instruction for v in train.values() for e in v) == sorted(
        f"i{k}" for k in range(10))


def test_load_data_dir_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_data_dir(tmp_path, "classify", clients=2)
    _write(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_data_dir(tmp_path, "classify", clients=2)
    with pytest.raises(DataError, match="unknown data kind"):
        load_data_dir(tmp_path, "nope", clients=2)
