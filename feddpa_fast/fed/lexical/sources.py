"""Where the lexical suite's raw data lives: the Debian packages, their files, and the error that
names them when they are missing (docs/ARCHITECTURE.md §3)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ...errors import MissingFileError
from .dictd import Dictionary
from .wordnet import WordNet

__all__ = ["DEFAULT_DICTD_DIR", "DEFAULT_WORDNET_DIR", "DICTIONARIES", "MissingSourceError",
           "Sources", "WORDNET_PACKAGE", "load_sources", "missing_files"]

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_DICTD_DIR = Path("/usr/share/dictd")
WORDNET_PACKAGE = "wordnet-base"
# dictd dictionary name -> the Debian package that installs it.
DICTIONARIES = {"freedict-eng-fra": "dict-freedict-eng-fra",
                "freedict-eng-deu": "dict-freedict-eng-deu",
                "foldoc": "dict-foldoc"}
_WORDNET_FILES = ("data.noun", "index.noun", "data.adj", "index.adj")


class MissingSourceError(MissingFileError):
    """A source file of the lexical suite is missing; the message names the Debian package
    and the flag that points at a copy."""


@dataclasses.dataclass
class Sources:
    """The parsed raw data: WordNet (nouns and adjectives) and the dictd dictionaries."""

    wordnet: WordNet
    dictionaries: dict[str, Dictionary]


def _missing(wordnet_dir: Path, dictd_dir: Path) -> tuple[list[Path], list[str], list[str]]:
    """(missing files, their packages, the flags that point at copies)."""
    files, packages, flags = [], [], []
    for name in _WORDNET_FILES:
        if not (wordnet_dir / name).is_file():
            files.append(wordnet_dir / name)
            packages.append(WORDNET_PACKAGE)
            flags.append("--wordnet-dir")
    for name, package in DICTIONARIES.items():
        for suffix in (".index", ".dict.dz"):
            if not (dictd_dir / f"{name}{suffix}").is_file():
                files.append(dictd_dir / f"{name}{suffix}")
                packages.append(package)
                flags.append("--dictd-dir")
    return files, list(dict.fromkeys(packages)), list(dict.fromkeys(flags))


def missing_files(wordnet_dir=None, dictd_dir=None) -> list[Path]:
    """The suite's source files that are not there (``make lexical-sources`` asks)."""
    wordnet_dir, dictd_dir = wordnet_dir or DEFAULT_WORDNET_DIR, dictd_dir or DEFAULT_DICTD_DIR
    return _missing(Path(wordnet_dir), Path(dictd_dir))[0]


def load_sources(wordnet_dir=None, dictd_dir=None) -> Sources:
    """Parses WordNet and the dictionaries the suite reads.

    Args:
        wordnet_dir: WordNet's database directory (default /usr/share/wordnet).
        dictd_dir: the dictd directory (default /usr/share/dictd).

    Returns:
        ``Sources``.

    Raises:
        MissingSourceError: naming every missing file, its Debian package and the flag.
        data.DataError: a malformed file, naming ``file:line``.
    """
    wordnet_dir = Path(wordnet_dir) if wordnet_dir else DEFAULT_WORDNET_DIR
    dictd_dir = Path(dictd_dir) if dictd_dir else DEFAULT_DICTD_DIR
    files, packages, flags = _missing(wordnet_dir, dictd_dir)
    if files:
        raise MissingSourceError(
            "the lexical suite needs " + ", ".join(str(f) for f in files) + ". Install "
            f"the Debian package(s) with `apt-get install {' '.join(packages)}` (as root; "
            "`make lexical-sources` does it), or point " + " / ".join(flags) + " at a "
            "directory holding copies of those files")
    return Sources(WordNet(wordnet_dir), {name: Dictionary(dictd_dir, name)
                                          for name in DICTIONARIES})
