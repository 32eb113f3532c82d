"""A reader for WordNet 3.0's database files (``data.<pos>`` and ``index.<pos>``, as Debian's
``wordnet-base`` installs them), with no network and no NLTK (docs/ARCHITECTURE.md §3).

NLTK's reader refuses paths outside its own data directories and wants a ``lexnames`` file
Debian does not ship, so the lexicographer file names (``lexnames(5)``, fixed since WordNet
1.5) are listed here. The formats (``wndb(5)``):

    data.<pos>   offset lex_filenum ss_type w_cnt(hex) (word lex_id(hex)){w_cnt}
                 p_cnt (pointer_symbol offset pos source/target(hex 4)){p_cnt} [frames] | gloss
    index.<pos>  lemma pos synset_cnt p_cnt (pointer_symbol){p_cnt} sense_cnt tagsense_cnt
                 (synset_offset){synset_cnt}          synsets in order of sense frequency

Lines starting with two spaces are the license header. A data line's offset is its byte
offset in the file, which the index uses. Every malformed line raises ``DataError`` naming
``file:line``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import DataError

__all__ = ["LEXNAMES", "POS_FILES", "Pointer", "Synset", "WordNet", "read_data", "read_index"]

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl")
_SS_TYPES = {"n", "v", "a", "s", "r"}


@dataclasses.dataclass(frozen=True)
class Pointer:
    symbol: str      # "@" hypernym, "@i" instance hypernym, "!" antonym, ...
    offset: int      # the target synset's byte offset in data.<pos>
    pos: str         # the target's part of speech (n, v, a, s, r)
    source: int      # 0: between synsets; else the source word's number (1-based)
    target: int      # 0: between synsets; else the target word's number (1-based)


@dataclasses.dataclass(frozen=True)
class Synset:
    offset: int
    lexname: str               # e.g. "noun.animal"
    words: tuple[str, ...]     # lemmas, underscores as spaces, adjective markers removed
    pointers: tuple[Pointer, ...]
    gloss: str                 # definition; then example sentences, separated by "; "


def _header(line: str) -> bool:
    return line.startswith("  ")


def _int(token: str, base: int, where: str, what: str) -> int:
    try:
        return int(token, base)
    except ValueError:
        raise DataError(f"{where}: {what} {token!r} is not a number") from None


def _lemma(word: str) -> str:
    """``outback(a)`` -> ``outback``; ``physical_entity`` -> ``physical entity``."""
    if word.endswith(")") and "(" in word:
        word = word[: word.rindex("(")]
    return word.replace("_", " ")


def _parse_data_line(line: str, where: str) -> Synset:
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, gloss = line.rstrip().removesuffix(" |"), ""
    tokens = head.split()
    if len(tokens) < 6:
        raise DataError(f"{where}: a synset line needs offset, lex_filenum, ss_type, w_cnt, "
                        f"words and p_cnt; got {len(tokens)} fields")
    offset = _int(tokens[0], 10, where, "offset")
    lexnum = _int(tokens[1], 10, where, "lex_filenum")
    if not 0 <= lexnum < len(LEXNAMES):
        raise DataError(f"{where}: lex_filenum {lexnum} is not a lexicographer file")
    if tokens[2] not in _SS_TYPES:
        raise DataError(f"{where}: ss_type {tokens[2]!r} is not one of {sorted(_SS_TYPES)}")
    w_cnt = _int(tokens[3], 16, where, "w_cnt")
    p_at = 4 + 2 * w_cnt
    if w_cnt < 1 or len(tokens) <= p_at:
        raise DataError(f"{where}: w_cnt {w_cnt} does not match the words on the line")
    words = tuple(_lemma(tokens[4 + 2 * i]) for i in range(w_cnt))
    p_cnt = _int(tokens[p_at], 10, where, "p_cnt")
    fields = tokens[p_at + 1: p_at + 1 + 4 * p_cnt]
    if len(fields) != 4 * p_cnt:
        raise DataError(f"{where}: p_cnt {p_cnt} but only {len(fields) // 4} pointers follow")
    pointers = []
    for i in range(p_cnt):
        symbol, target, pos, st = fields[4 * i: 4 * i + 4]
        if pos not in _SS_TYPES or len(st) != 4:
            raise DataError(f"{where}: pointer {i + 1} ({' '.join(fields[4 * i: 4 * i + 4])}) "
                            "is malformed")
        pointers.append(Pointer(symbol, _int(target, 10, where, "pointer offset"), pos,
                                _int(st[:2], 16, where, "pointer source"),
                                _int(st[2:], 16, where, "pointer target")))
    return Synset(offset, LEXNAMES[lexnum], words, tuple(pointers), gloss.strip())


def read_data(path: Path) -> dict[int, Synset]:
    """{byte offset: Synset} of one ``data.<pos>`` file.

    Raises:
        DataError: a malformed line, or a line whose offset is not its byte offset.
    """
    synsets, position = {}, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, position = position, position + len(raw)
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if _header(line) or not line.strip():
                continue
            where = f"{path}:{lineno}"
            synset = _parse_data_line(line, where)
            if synset.offset != start:
                raise DataError(f"{where}: the line says offset {synset.offset} but starts at "
                                f"byte {start} (a truncated or edited file?)")
            synsets[start] = synset
    if not synsets:
        raise DataError(f"{path}: no synsets (empty file)")
    return synsets


def read_index(path: Path) -> dict[str, tuple[int, ...]]:
    """{lemma (spaces, not underscores): synset offsets, most frequent sense first} of one
    ``index.<pos>`` file.

    Raises:
        DataError: a malformed line.
    """
    index = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if _header(line) or not line.strip():
                continue
            where = f"{path}:{lineno}"
            tokens = line.split()
            if len(tokens) < 6:
                raise DataError(f"{where}: an index line needs lemma, pos, synset_cnt, p_cnt, "
                                f"sense_cnt, tagsense_cnt and offsets; got {len(tokens)} fields")
            synset_cnt = _int(tokens[2], 10, where, "synset_cnt")
            p_cnt = _int(tokens[3], 10, where, "p_cnt")
            offsets = tokens[4 + p_cnt + 2:]
            if synset_cnt < 1 or len(offsets) != synset_cnt:
                raise DataError(f"{where}: synset_cnt {synset_cnt} but {len(offsets)} offsets")
            index[tokens[0].replace("_", " ")] = tuple(
                _int(o, 10, where, "synset offset") for o in offsets)
    if not index:
        raise DataError(f"{path}: no lemmas (empty file)")
    return index


class WordNet:
    """The parts of speech of a WordNet database directory (nouns and adjectives by default),
    read once."""

    def __init__(self, directory: Path, parts: tuple[str, ...] = ("n", "a")):
        """Args:
            directory: holds ``data.<pos>`` and ``index.<pos>`` (``dpkg -L wordnet-base``).
            parts: the parts of speech to read (n, v, a, r).
        Raises:
            FileNotFoundError: a file is missing.
            DataError: a malformed file.
        """
        self.directory = Path(directory)
        self.data, self.index = {}, {}
        for pos in parts:
            name = POS_FILES[pos]
            self.data[pos] = read_data(self.directory / f"data.{name}")
            self.index[pos] = read_index(self.directory / f"index.{name}")

    def synset(self, pos: str, offset: int, where: str = "") -> Synset:
        """The synset at ``offset`` of ``data.<pos>`` (satellites live in data.adj).

        Raises:
            DataError: no synset starts at that offset.
        """
        table = self.data.get("a" if pos == "s" else pos, {})
        if offset not in table:
            name = POS_FILES["a" if pos == "s" else pos]
            raise DataError(f"{self.directory / ('data.' + name)}: no synset at offset {offset}"
                            f"{' (pointed to by ' + where + ')' if where else ''}")
        return table[offset]

    def first_sense(self, pos: str, lemma: str) -> Synset | None:
        """The most frequent sense of ``lemma`` as a ``pos``, or None."""
        offsets = self.index[pos].get(lemma)
        if not offsets:
            return None
        return self.synset(pos, offsets[0], f"index.{POS_FILES[pos]} entry {lemma!r}")

    def lemmas(self, pos: str) -> list[str]:
        """Every lemma of ``pos``, in index order (sorted)."""
        return list(self.index[pos])
