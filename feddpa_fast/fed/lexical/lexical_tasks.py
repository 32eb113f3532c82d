"""The lexical suite's eight instruction tasks: what each asks and how its answer is read from
the raw data (docs/ARCHITECTURE.md §3). ``answer(sources, word)`` is the reference output for
an English ``word``, or None when the source has no usable one.

Every WordNet task reads the word's most frequent sense (the first synset of its index entry;
the noun's before the adjective's, the adjective's first for antonyms);
every dictionary task reads the first entry whose headword is the word itself. Answers are kept
short (a definition's first clause, at most ``MAX_DEFINITION_WORDS`` words) so a 135 M model can
be scored on them with a few dozen generated tokens.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from .sources import Sources

__all__ = ["LEXICAL_TASKS", "LexicalTask", "MAX_DEFINITION_WORDS", "is_word"]

MAX_DEFINITION_WORDS = 14
_WORD = re.compile(r"[a-z]{3,15}")
_MARKUP = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)")  # <fem>, [chem.], (informal)


def is_word(text: str) -> bool:
    """A lower-case alphabetic English word of 3 to 15 letters (the suite's inputs)."""
    return bool(_WORD.fullmatch(text))


def _clean(text: str) -> str:
    return " ".join(_MARKUP.sub(" ", text).replace("{", "").replace("}", "").split())


def _short(text: str, lo: int = 2, hi: int = MAX_DEFINITION_WORDS) -> str | None:
    return text if lo <= len(text.split()) <= hi else None


# ---- WordNet ------------------------------------------------------------------------------
def _sense(sources: Sources, word: str, parts=("n", "a")):
    for pos in parts:
        synset = sources.wordnet.first_sense(pos, word)
        if synset is not None:
            return synset
    return None


def _define(sources: Sources, word: str) -> str | None:
    synset = _sense(sources, word)
    if synset is None or not synset.gloss:
        return None
    first = synset.gloss.split(";")[0].strip()
    return None if '"' in first else _short(_clean(first))


def _synonym(sources: Sources, word: str) -> str | None:
    synset = _sense(sources, word)
    others = [w for w in (synset.words if synset else ()) if w.lower() != word]
    return others[0] if others else None


def _antonym(sources: Sources, word: str) -> str | None:
    synset = _sense(sources, word, ("a", "n"))
    if synset is None or word not in synset.words:
        return None
    number = synset.words.index(word) + 1
    for p in synset.pointers:
        if p.symbol == "!" and p.source == number:
            target = sources.wordnet.synset(p.pos, p.offset, f"the antonym of {word!r}")
            return target.words[p.target - 1] if 0 < p.target <= len(target.words) else None
    return None


def _hypernym(sources: Sources, word: str) -> str | None:
    synset = sources.wordnet.first_sense("n", word)
    for p in synset.pointers if synset else ():
        if p.symbol in ("@", "@i"):
            return sources.wordnet.synset(p.pos, p.offset, f"the hypernym of {word!r}").words[0]
    return None


def _category(sources: Sources, word: str) -> str | None:
    synset = sources.wordnet.first_sense("n", word)
    if synset is None or synset.lexname == "noun.Tops":  # the top nodes name no category
        return None
    return synset.lexname.split(".", 1)[1]


# ---- dictd ------------------------------------------------------------------------------
def _translation(name: str) -> Callable[[Sources, str], str | None]:
    """The first translation of the first freedict entry headed by the word."""
    def answer(sources: Sources, word: str) -> str | None:
        for entry in sources.dictionaries[name].entries(word):
            lines = entry.split("\n")
            if lines[0].split(" /")[0].strip().lower() != word or len(lines) < 2:
                continue
            first = _clean(re.sub(r"^\d+\.\s*", "", lines[1].strip()))
            text = re.split(r"[,;]", first)[0].strip()
            return text or None
        return None
    return answer


def _computing(sources: Sources, word: str) -> str | None:
    """The first sentence of the FOLDOC entry headed by the word itself (not its acronym)."""
    for entry in sources.dictionaries["foldoc"].entries(word):
        head, _, body = entry.partition("\n\n")  # the headword and its aliases, then the text
        if head.split("\n")[0].strip() != word:
            continue
        # "/de'moh/ 1. A demonstration ...": a pronunciation, then numbered senses.
        text = re.sub(r"^(/[^/]*/\s*)?(\d+\.\s*)?", "", _clean(body))
        if text.startswith("See "):  # a cross-reference, not a definition
            return None
        sentence = re.split(r"\.\s+(?=[A-Z])", text + " ")[0].strip().rstrip(".")
        return _short(sentence, 3)
    return None


@dataclasses.dataclass(frozen=True)
class LexicalTask:
    """One client's instruction type."""

    name: str
    instruction: str
    source: str   # the Debian package its answers come from
    answer: Callable[[Sources, str], str | None]


LEXICAL_TASKS = (
    LexicalTask("define", "Define the word in a few words.", "wordnet-base", _define),
    LexicalTask("synonym", "Give a synonym of the word.", "wordnet-base", _synonym),
    LexicalTask("antonym", "Give an antonym of the word.", "wordnet-base", _antonym),
    LexicalTask("hypernym", "The word names a kind of something. Name that more general thing.",
                "wordnet-base", _hypernym),
    LexicalTask("category", "Name the semantic category of the noun (for example animal, "
                "artifact, person or plant).", "wordnet-base", _category),
    LexicalTask("french", "Translate the English word into French.", "dict-freedict-eng-fra",
                _translation("freedict-eng-fra")),
    LexicalTask("german", "Translate the English word into German.", "dict-freedict-eng-deu",
                _translation("freedict-eng-deu")),
    LexicalTask("computing", "Define the computing term in one sentence.", "dict-foldoc",
                _computing),
)
