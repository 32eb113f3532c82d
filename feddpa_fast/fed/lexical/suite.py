"""The lexical suite: eight real-text instruction tasks, one per client, built deterministically
from WordNet and dictd dictionaries (docs/ARCHITECTURE.md §3).

Words are chosen so the tasks share them: every candidate word is scored by how many tasks can
ask about it, and each task takes its ``train + test`` words with the highest such coverage
(ties broken by a seeded hash), then splits them with a seeded shuffle. The same word therefore
appears under several instructions with different targets ("cat": a definition, "chat", a
category), which makes the test-time shift of TTP real. Within a task each word is one
example, so train and test share no example.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ...atomic import atomic_write_bytes
from ..data import DataError, LMExample
from .lexical_tasks import LEXICAL_TASKS, is_word
from .sources import Sources, load_sources

__all__ = ["build_lexical", "vocabulary", "write_lexical"]


def vocabulary(sources: Sources) -> list[str]:
    """The candidate words: WordNet's noun and adjective lemmas and FOLDOC's headwords that
    are plain lower-case words, sorted."""
    words = set(sources.wordnet.lemmas("n")) | set(sources.wordnet.lemmas("a"))
    words |= set(sources.dictionaries["foldoc"].headwords())
    return sorted(w for w in words if is_word(w))


def _rank(seed: int, task: str, word: str) -> str:
    return hashlib.sha256(f"{seed}/{task}/{word}".encode()).hexdigest()


def build_lexical(sources: Sources, *, seed: int = 0, train_per_task: int = 300,
                  test_per_task: int = 50) -> tuple[dict[str, list], dict[str, list], dict]:
    """({task: train}, {task: test}, stats) of the suite; the same inputs give the same output.

    Args:
        sources: the parsed raw data (``load_sources``).
        seed: breaks coverage ties and shuffles each task's split.
        train_per_task, test_per_task: examples per task in each split.

    Returns:
        The two splits as ``LMExample`` lists in task order, and per-task statistics (candidate
        words, test words that other tasks also ask about).

    Raises:
        DataError: a task has fewer than ``train_per_task + test_per_task`` usable words.
    """
    if train_per_task < 1 or test_per_task < 1:
        raise DataError("train_per_task and test_per_task must be >= 1")
    words = vocabulary(sources)
    answers = {t.name: {} for t in LEXICAL_TASKS}
    for task in LEXICAL_TASKS:
        for word in words:
            answer = task.answer(sources, word)
            if answer and answer.lower() != word:
                answers[task.name][word] = answer
    coverage = {w: sum(w in a for a in answers.values()) for w in words}
    need = train_per_task + test_per_task
    train, test, stats, chosen = {}, {}, {}, {}
    for task in LEXICAL_TASKS:
        pool = answers[task.name]
        if len(pool) < need:
            raise DataError(f"lexical task {task.name!r} ({task.source}) has {len(pool)} usable "
                            f"words, fewer than the {need} it needs ({train_per_task} train + "
                            f"{test_per_task} test)")
        picked = sorted(pool, key=lambda w: (-coverage[w], _rank(seed, task.name, w)))[:need]
        random.Random(_rank(seed, task.name, "split")).shuffle(picked)
        chosen[task.name] = picked

        def example(word, task=task):
            return LMExample(task.instruction, word, answers[task.name][word], task.name)
        train[task.name] = [example(w) for w in picked[:train_per_task]]
        test[task.name] = [example(w) for w in picked[train_per_task:]]
    for task in LEXICAL_TASKS:
        elsewhere = set().union(*(set(v) for k, v in chosen.items() if k != task.name))
        stats[task.name] = {"candidates": len(answers[task.name]),
                            "test_words_in_other_tasks": sum(
                                e.input in elsewhere for e in test[task.name])}
    return train, test, stats


def _jsonl(split: dict[str, list]) -> bytes:
    lines = [json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output,
                         "task": e.task}, ensure_ascii=False)
             for examples in split.values() for e in examples]
    return ("\n".join(lines) + "\n").encode()


def write_lexical(out, *, wordnet_dir=None, dictd_dir=None, seed: int = 0,
                  train_per_task: int = 300, test_per_task: int = 50) -> dict:
    """Builds the suite and writes ``train.jsonl``, ``test.jsonl`` (the project's causal-LM
    JSONL: instruction, input, output, task) and ``suite.json`` (settings and statistics) into
    ``out``, each atomically.

    Args:
        out: the output directory (created).
        wordnet_dir, dictd_dir: where the raw data is (``load_sources``).
        seed, train_per_task, test_per_task: as ``build_lexical``.

    Returns:
        The contents of suite.json.

    Raises:
        sources.MissingSourceError: a raw data file is missing (names its Debian package).
        data.DataError: a malformed raw file, or a task with too few words.
    """
    train, test, stats = build_lexical(load_sources(wordnet_dir, dictd_dir), seed=seed,
                                       train_per_task=train_per_task,
                                       test_per_task=test_per_task)
    out = Path(out)
    files = {"train.jsonl": _jsonl(train), "test.jsonl": _jsonl(test)}
    summary = {"suite": "lexical", "format": 1, "seed": seed, "train_per_task": train_per_task,
               "test_per_task": test_per_task,
               "tasks": {t.name: {"instruction": t.instruction, "source": t.source,
                                  **stats[t.name]} for t in LEXICAL_TASKS},
               "sha256": {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}}
    for name, blob in files.items():
        atomic_write_bytes(out / name, blob)
    atomic_write_bytes(out / "suite.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary
