"""Small WordNet and dictd files in the real formats, written by the tests (CI must not depend on
the Debian packages): ``write_sources(root)`` -> (wordnet_dir, dictd_dir)."""
from __future__ import annotations

import gzip
from pathlib import Path

from feddpa_fast.fed.lexical.wordnet import LEXNAMES

# Nouns: (words, lexname, hypernym key or None, gloss). Keys are the first word.
NOUNS = [
    (["animal", "beast"], "noun.Tops", None, "a living organism that feeds on organic matter"),
    (["plant", "flora"], "noun.Tops", None, "a living organism lacking the power of locomotion"),
    (["artifact", "artefact"], "noun.Tops", None, "a man-made object taken as a whole"),
    (["feline", "felid"], "noun.animal", "animal", "any of various lithe-bodied roundheaded "
     "fissiped mammals"),
    (["cat", "true_cat"], "noun.animal", "feline", "feline mammal usually having thick soft fur; "
     '"cats purr"'),
    (["dog", "domestic_dog"], "noun.animal", "animal", "a member of the genus Canis"),
    (["horse", "equus_caballus"], "noun.animal", "animal", "solid-hoofed herbivorous quadruped"),
    (["tree", "tree_diagram"], "noun.plant", "plant", "a tall perennial woody plant"),
    (["rose", "rosebush"], "noun.plant", "plant", "any of many shrubs of the genus Rosa"),
    (["file", "data_file"], "noun.artifact", "artifact", "a set of related records kept together"),
    (["table", "tabular_array"], "noun.artifact", "artifact", "a set of data arranged in rows"),
    (["house", "home"], "noun.artifact", "artifact", "a dwelling that serves as living quarters"),
    (["car", "auto"], "noun.artifact", "artifact", "a motor vehicle with four wheels"),
]
# Adjective antonym pairs: (word, antonym, gloss of the word).
ADJECTIVES = [("good", "bad", "having desirable or positive qualities"),
              ("hot", "cold", "used of physical heat"), ("big", "small", "above average in size"),
              ("fast", "slow", "acting or moving quickly"), ("open", "closed", "not shut")]
FRENCH = {"cat": "1. chat, matou", "dog": "chien", "horse": "cheval <masc>", "tree": "arbre",
          "rose": "rose", "file": "fichier", "table": "table", "house": "maison",
          "car": "voiture", "good": "bon", "big": "grand"}
GERMAN = {"cat": "Katze <fem> [zool.]", "dog": "Hund <masc>", "horse": "Pferd <neut>",
          "tree": "Baum", "rose": "Rose", "file": "Datei", "table": "Tabelle",
          "house": "Haus", "car": "Auto", "good": "gut", "hot": "heiß"}
FOLDOC = {"file": "<storage> A collection of data stored under one name. More text.",
          "table": "<database> A set of rows with the same columns.",
          "cat": "<tool> (From \"catenate\") {Unix}'s command which copies files to the screen.",
          "tree": "<data> A directed acyclic graph with one root node.",
          "house": "<jargon> A computing term for testing the house rule.",
          "car": "<programming> The first element of a list in {Lisp}.",
          "horse": "See {Trojan horse}."}
HEADER = "  1 This software and database is being provided\n  2 fixture copy\n"


def _synset_line(offset, lexname, ss_type, words, pointers, gloss) -> str:
    word_fields = " ".join(f"{w} 0" for w in words)
    ptr_fields = " ".join(f"{sym} {off:08d} {pos} {st}" for sym, off, pos, st in pointers)
    body = f"{offset:08d} {LEXNAMES.index(lexname):02d} {ss_type} {len(words):02x} " \
           f"{word_fields} {len(pointers):03d}"
    return f"{body}{' ' + ptr_fields if ptr_fields else ''} | {gloss}  \n"


def _write_pos(directory: Path, name: str, synsets: list[tuple]) -> None:
    """``synsets``: (key, words, lexname, ss_type, [(symbol, target key, pos, st)], gloss).
    Offsets are fixed-width, so a first pass with zeros gives every line's byte offset."""
    offsets, position = {}, len(HEADER.encode())
    for key, words, lexname, ss_type, pointers, gloss in synsets:
        offsets[key] = position
        zeros = [(s, 0, p, st) for s, _, p, st in pointers]
        position += len(_synset_line(0, lexname, ss_type, words, zeros, gloss).encode())
    lines, index = [HEADER], {}
    for key, words, lexname, ss_type, pointers, gloss in synsets:
        resolved = [(s, offsets[t], p, st) for s, t, p, st in pointers]
        lines.append(_synset_line(offsets[key], lexname, ss_type, words, resolved, gloss))
        for w in words:
            index.setdefault(w.lower(), []).append(offsets[key])
    (directory / f"data.{name}").write_text("".join(lines))
    pos = "n" if name == "noun" else "a"
    index_lines = [HEADER]
    for w, offs in sorted(index.items()):
        joined = " ".join(f"{x:08d}" for x in offs)
        index_lines.append(f"{w} {pos} {len(offs)} 1 @ {len(offs)} 0 {joined}  \n")
    (directory / f"index.{name}").write_text("".join(index_lines))


def write_wordnet(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    nouns = [(words[0], words, lexname, "n", [("@", hyper, "n", "0000")] if hyper else [], gloss)
             for words, lexname, hyper, gloss in NOUNS]
    _write_pos(directory, "noun", nouns)
    adjectives = []
    for word, antonym, gloss in ADJECTIVES:
        adjectives.append((word, [word], "adj.all", "a", [("!", antonym, "a", "0101")], gloss))
        adjectives.append((antonym, [antonym], "adj.all", "a", [("!", word, "a", "0101")],
                           f"not {word}"))
    _write_pos(directory, "adj", adjectives)
    return directory


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = digits[n % 64]
    while n >= 64:
        n //= 64
        out = digits[n % 64] + out
    return out


def write_dictionary(directory: Path, name: str, entries: dict[str, str]) -> None:
    """``entries``: {headword: full entry text}; plus a ``00databaseinfo`` metadata entry."""
    directory.mkdir(parents=True, exist_ok=True)
    text, index = b"", []
    for head, body in [("00databaseinfo", "fixture dictionary\n")] + sorted(entries.items()):
        blob = body.encode()
        index.append(f"{head}\t{_b64(len(text))}\t{_b64(len(blob))}\n")
        text += blob
    (directory / f"{name}.index").write_text("".join(index))
    (directory / f"{name}.dict.dz").write_bytes(gzip.compress(text))


def write_dictd(directory: Path) -> Path:
    write_dictionary(directory, "freedict-eng-fra",
                     {w: f"{w} /x/\n{t}\n" for w, t in FRENCH.items()})
    write_dictionary(directory, "freedict-eng-deu",
                     {w: f"{w} /y/\n{t}\n   Synonym: {{other}}\n\n" for w, t in GERMAN.items()})
    write_dictionary(directory, "foldoc", {w: f"{w}\n\n   {t}\n\n" for w, t in FOLDOC.items()})
    return directory


def write_sources(root: Path) -> tuple[Path, Path]:
    """(wordnet_dir, dictd_dir) under ``root``."""
    return write_wordnet(Path(root) / "wordnet"), write_dictd(Path(root) / "dictd")
