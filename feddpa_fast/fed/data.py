"""Data: JSONL loaders, client partitioners, and the built-in demo suite.

Real runs read a directory holding ``train.jsonl`` and ``test.jsonl`` (``load_data_dir``):

* classification lines ``{"text", "label", "choices"?, "task"?}``; without ``choices`` a task's
  label names are the sorted set of its labels (over the file, or over both files in a
  directory, so train and test agree);
* causal-LM lines ``{"instruction", "input"?, "output", "task"?}`` (the loss goes on the
  response only, downstream).

Lines that carry ``task`` make one client per task. Otherwise classification data is split
over ``clients`` clients by label with Dirichlet(alpha) proportions (small alpha: each client
sees few labels; large alpha: every client looks like the whole set), and causal-LM data is
split evenly at random. Every malformed input raises ``DataError`` naming ``file:line``.

``builtin_suite(seed)`` is the embedded default: 8 *synthetic* classification tasks, one per
client, generated from templates (see ``feddpa_fast.fed.builtin_suite`` for how and why).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FeddpaError, MissingFileError
from . import builtin_suite as _suite
from .builtin_suite import BUILTIN_PAIRS, BUILTIN_TASKS

KINDS = ("classify", "causal-lm")


class DataError(FeddpaError, ValueError):
    """Malformed data or arguments; JSONL problems say ``file:line``."""


@dataclass(frozen=True)
class ClassifyExample:
    text: str
    label: str
    choices: tuple[str, ...]
    task: str


@dataclass(frozen=True)
class LMExample:
    instruction: str
    input: str
    output: str
    task: str


Example = ClassifyExample | LMExample


@dataclass(frozen=True)
class _Row:
    where: str                 # "file:line"
    fields: dict               # validated fields, without task
    task: str | None           # None when the line has no "task"
    choices: tuple[str, ...] | None


def str_field(obj: dict, key: str, where: str, *, required: bool = True,
               nonempty: bool = False) -> str | None:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _parse_line(obj: dict, kind: str, where: str) -> _Row:
    task = str_field(obj, "task", where, required=False, nonempty=True)
    if kind == "causal-lm":
        fields = {"instruction": str_field(obj, "instruction", where),
                  "input": str_field(obj, "input", where, required=False) or "",
                  "output": str_field(obj, "output", where, nonempty=True)}
        return _Row(where, fields, task, None)
    fields = {"text": str_field(obj, "text", where, nonempty=True),
              "label": str_field(obj, "label", where, nonempty=True)}
    choices = None
    if "choices" in obj:
        raw = obj["choices"]
        if not isinstance(raw, list) or not all(isinstance(c, str) and c.strip() for c in raw):
            raise DataError(f"{where}: field 'choices' must be a list of non-empty strings")
        choices = tuple(dict.fromkeys(raw))  # drop repeats, keep order
        if len(choices) < 2:
            raise DataError(f"{where}: 'choices' needs at least 2 distinct labels")
        if fields["label"] not in choices:
            raise DataError(f"{where}: label {fields['label']!r} is not in choices {list(choices)}")
    return _Row(where, fields, task, choices)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {KINDS}")


def _read_rows(path: Path, kind: str) -> list[_Row]:
    _check_kind(kind)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append(_parse_line(obj, kind, where))
    if not rows:
        raise DataError(f"{path}: no examples (empty file)")
    return rows


def _build(files: list[list[_Row]], kind: str, default_task: str) -> list[list[Example]]:
    """Rows -> examples. Missing choices = sorted labels of the task over all `files`."""
    if kind == "causal-lm":
        return [[LMExample(**r.fields, task=r.task or default_task) for r in rows]
                for rows in files]
    labels: dict[str, set[str]] = {}
    for rows in files:
        for r in rows:
            labels.setdefault(r.task or default_task, set()).add(r.fields["label"])
    out = []
    for rows in files:
        examples = []
        for r in rows:
            task = r.task or default_task
            choices = r.choices or tuple(sorted(labels[task]))
            if len(choices) < 2:
                raise DataError(f"{r.where}: task {task!r} has a single label {choices[0]!r} and "
                                "the line gives no 'choices'; add 'choices' (>= 2 labels)")
            examples.append(ClassifyExample(r.fields["text"], r.fields["label"], choices, task))
        out.append(examples)
    return out


def load_jsonl(path, kind: str, *, default_task: str = "default") -> list[Example]:
    """Read a JSONL file of `kind` ("classify" or "causal-lm"); blank lines are skipped."""
    _check_kind(kind)
    path = Path(path)
    return _build([_read_rows(path, kind)], kind, default_task)[0]


def partition_by_task(examples) -> dict[str, list]:
    """{task: examples}, tasks in order of first appearance, examples in input order."""
    out: dict[str, list] = {}
    for ex in examples:
        out.setdefault(ex.task, []).append(ex)
    return out


def _check_dirichlet_args(examples, n_clients, alpha) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise DataError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not all(isinstance(ex, ClassifyExample) for ex in examples):
        raise DataError("Dirichlet partitioning needs classification examples (labels)")
    if len(examples) < n_clients:
        raise DataError(f"cannot give {n_clients} clients at least one example each: "
                        f"only {len(examples)} examples")


def _draw_proportions(labels: list[str], n_clients: int, alpha: float,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    draws = rng.dirichlet(np.full(n_clients, float(alpha)), size=len(labels))
    return {label: draws[i] for i, label in enumerate(labels)}


def _split(examples, props: dict[str, np.ndarray], n_clients: int,
           rng: np.random.Generator) -> list[list]:
    """Shuffle each label's examples, cut them by that label's proportions, then fill empties."""
    owner = np.empty(len(examples), dtype=np.int64)
    for label in sorted(props):
        idx = np.array([i for i, ex in enumerate(examples) if ex.label == label], dtype=np.int64)
        if idx.size == 0:
            continue
        idx = rng.permutation(idx)
        cuts = np.floor(np.cumsum(props[label])[:-1] * idx.size).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            owner[part] = client
    members = [sorted(np.flatnonzero(owner == c).tolist()) for c in range(n_clients)]
    # A client the draw left empty takes the last example of the currently largest client
    # (lowest client index on ties): deterministic, and moves as few examples as possible.
    for c in range(n_clients):
        if not members[c]:
            donor = max(range(n_clients), key=lambda k: (len(members[k]), -k))
            members[c].append(members[donor].pop())
    return [[examples[i] for i in m] for m in members]


def partition_dirichlet(examples, n_clients: int, alpha: float, seed: int) -> list[list]:
    """Split classification examples over clients, label by label, with Dirichlet proportions.

    For each label (sorted), proportions over clients ~ Dirichlet(alpha) from
    ``numpy.random.Generator(PCG64(seed))`` (all labels drawn first, then the shuffles). One
    draw, no re-draws: a client left empty takes one example from the largest client. Each
    example lands in exactly one client; clients keep the input order.
    """
    examples = list(examples)
    _check_dirichlet_args(examples, n_clients, alpha)
    rng = np.random.default_rng(seed)
    labels = sorted({ex.label for ex in examples})
    return _split(examples, _draw_proportions(labels, n_clients, alpha, rng), n_clients, rng)


def _load_split_file(directory: Path, name: str, kind: str) -> list[_Row]:
    path = directory / name
    if not path.is_file():
        raise MissingFileError(f"{path} not found (a data directory holds train.jsonl and "
                                "test.jsonl)")
    return _read_rows(path, kind)


def _check_tasks_match(directory: Path, train_rows, test_rows) -> None:
    """Every task of train.jsonl has test examples, and the other way round."""
    train_tasks = list(dict.fromkeys(r.task for r in train_rows))
    test_tasks = set(r.task for r in test_rows)
    for name in train_tasks:
        if name not in test_tasks:
            raise DataError(f"{directory / 'test.jsonl'}: task {name!r} of train.jsonl has "
                            "no test examples")
    for r in test_rows:
        if r.task not in train_tasks:
            raise DataError(f"{r.where}: task {r.task!r} of test.jsonl has no training "
                            "examples")


def load_data_dir(path, kind: str, *, clients: int | None = None, alpha: float = 0.5,
                  seed: int = 0) -> tuple[dict[str, list], dict[str, list]]:
    """(train_by_client, test_by_client) from ``path/train.jsonl`` and ``path/test.jsonl``.

    All lines carry "task": one client per task, every task in both files; ``clients`` keeps
    the first N tasks (file order); more than there are gives every task, with a warning (the
    trainer's default of 8 clients must not refuse a 2-task directory); ``alpha`` is unused.
    No line carries "task": ``clients`` clients "client0".."clientN-1" (required);
    classification is split by Dirichlet(alpha) over labels with the SAME per-label proportions
    for train and test (one Generator(seed) draws them once), causal-LM is split evenly at
    random. With test labels a subset of train labels, the train split equals
    ``partition_dirichlet(train, clients, alpha, seed)``.
    """
    _check_kind(kind)
    directory = Path(path)
    train_rows = _load_split_file(directory, "train.jsonl", kind)
    test_rows = _load_split_file(directory, "test.jsonl", kind)
    tagged = [r.task is not None for r in train_rows + test_rows]
    if any(tagged) and not all(tagged):
        bad = next(r for r in train_rows + test_rows if r.task is None)
        raise DataError(f"{bad.where}: missing field 'task' (other lines carry one; give it on "
                        "every line or on none)")
    if all(tagged):
        _check_tasks_match(directory, train_rows, test_rows)
    train, test = _build([train_rows, test_rows], kind, "default")
    if all(tagged):
        train_by, test_by = partition_by_task(train), partition_by_task(test)
        names = list(train_by)
        if clients is not None and clients > len(names):
            logging.getLogger(__name__).warning(
                "%s: clients=%d, but the lines carry %d tasks: one client per task (%s)",
                directory, clients, len(names), ", ".join(names))
        names = names[:clients]
        return {n: train_by[n] for n in names}, {n: test_by[n] for n in names}

    if clients is None:
        raise DataError(f"{directory}: the lines carry no 'task', so the number of clients "
                        "must be given (clients=N)")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise DataError(f"clients must be an integer >= 1, got {clients!r}")
    names = [f"client{i}" for i in range(clients)]
    if kind == "causal-lm":
        for split, n in (("train", len(train)), ("test", len(test))):
            if n < clients:
                raise DataError(f"{directory / (split + '.jsonl')}: {n} examples cannot give "
                                f"{clients} clients one each")
        rng = np.random.default_rng(seed)
        parts = [[[data[i] for i in sorted(chunk.tolist())]
                  for chunk in np.array_split(rng.permutation(len(data)), clients)]
                 for data in (train, test)]
    else:
        for split, data in (("train", train), ("test", test)):
            try:
                _check_dirichlet_args(data, clients, alpha)
            except DataError as err:
                raise DataError(f"{directory / (split + '.jsonl')}: {err}") from None
        rng = np.random.default_rng(seed)
        labels = sorted({ex.label for ex in train} | {ex.label for ex in test})
        props = _draw_proportions(labels, clients, alpha, rng)
        parts = [_split(train, props, clients, rng), _split(test, props, clients, rng)]
    return dict(zip(names, parts[0])), dict(zip(names, parts[1]))


def builtin_suite(seed: int = 0) -> tuple[dict[str, list[ClassifyExample]],
                                          dict[str, list[ClassifyExample]]]:
    """The embedded synthetic suite: ({task: train}, {task: test}), 300 / 100 per task.

    Same seed -> identical output on every run and platform. Tasks in ``BUILTIN_TASKS`` order.
    """
    train, test = _suite.generate(seed)

    def wrap(split):
        return {task: [ClassifyExample(text, label, _suite.choices(task), task)
                       for text, label in rows] for task, rows in split.items()}
    return wrap(train), wrap(test)


__all__ = ["BUILTIN_PAIRS", "BUILTIN_TASKS", "ClassifyExample", "DataError", "Example", "KINDS",
           "LMExample", "builtin_suite", "load_data_dir", "load_jsonl", "partition_by_task",
           "partition_dirichlet", "str_field"]
