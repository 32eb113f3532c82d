"""A reader for dictd dictionaries (``<name>.index`` plus ``<name>.dict.dz``, as Debian's
``dict-freedict-*`` and ``dict-foldoc`` install them), with no network (docs/ARCHITECTURE.md §3).

The index holds one entry per line, ``headword<TAB>offset<TAB>length``, with offset and length
in dictd's base-64 digits (``A``-``Z``, ``a``-``z``, ``0``-``9``, ``+``, ``/``, most
significant first); they address the *decompressed* text of the ``.dict.dz`` (gzip, dictzip
variant). Entries whose headword starts with ``00`` are the dictionary's own metadata.
Every malformed line, an offset past the end of the text and a truncated ``.dict.dz`` raise
``DataError``.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from ..data import DataError

__all__ = ["Dictionary", "b64_number", "read_index"]

_DIGITS = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def b64_number(text: str) -> int:
    """dictd's base-64 number: ``"B"`` -> 1, ``"BA"`` -> 64.

    Raises:
        ValueError: an empty string or a character outside the alphabet.
    """
    if not text:
        raise ValueError("empty number")
    value = 0
    for char in text:
        if char not in _DIGITS:
            raise ValueError(f"{char!r} is not a dictd base-64 digit")
        value = value * 64 + _DIGITS[char]
    return value


def read_index(path: Path) -> list[tuple[str, int, int, str]]:
    """[(headword, offset, length, "file:line")] of a ``.index`` file, in file order.

    Raises:
        DataError: a line without three tab-separated fields or with a bad number.
    """
    entries = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            fields = line.split("\t")
            if len(fields) < 3:
                raise DataError(f"{where}: expected headword<TAB>offset<TAB>length, got "
                                f"{len(fields)} field(s)")
            try:
                offset, length = b64_number(fields[1]), b64_number(fields[2])
            except ValueError as err:
                raise DataError(f"{where}: bad offset or length ({err})") from None
            entries.append((fields[0], offset, length, where))
    if not entries:
        raise DataError(f"{path}: no entries (empty file)")
    return entries


def _decompress(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: not a complete gzip / dictzip file ({err})") from None


class Dictionary:
    """One dictd dictionary, read whole: ``entries(word)`` gives its definitions."""

    def __init__(self, directory: Path, name: str):
        """Args:
            directory: holds ``<name>.index`` and ``<name>.dict.dz``.
            name: e.g. ``freedict-eng-fra``.
        Raises:
            FileNotFoundError: a file is missing.
            DataError: a malformed index, a truncated text, an offset past its end.
        """
        directory = Path(directory)
        self.name = name
        index_path, text_path = directory / f"{name}.index", directory / f"{name}.dict.dz"
        for path in (index_path, text_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
        text = _decompress(text_path)
        self._text = text
        # (offset, length) per headword; decoded on demand (freedict-eng-deu: 79 MB of text).
        self._spans: dict[str, list[tuple[int, int]]] = {}
        for headword, offset, length, where in read_index(index_path):
            if offset + length > len(text):
                raise DataError(f"{where}: entry {headword!r} ends at byte {offset + length}, "
                                f"past the end of {text_path.name} ({len(text)} bytes)")
            if not headword.startswith("00"):
                self._spans.setdefault(headword.lower(), []).append((offset, length))

    def headwords(self) -> list[str]:
        """The (lower-cased) headwords, in index order."""
        return list(self._spans)

    def entries(self, word: str) -> list[str]:
        """The definitions filed under ``word`` (lower-cased), in index order."""
        return [self._text[o: o + n].decode("utf-8", errors="replace")
                for o, n in self._spans.get(word.lower(), [])]
