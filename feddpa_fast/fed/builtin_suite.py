"""The built-in demo suite: 8 SYNTHETIC text-classification tasks, one per client.

Nothing here is real data. Every sentence is built from a template and word lists, and its
label is a deterministic function of the attributes it was generated from (``label_text``
recovers it from the text alone). The classifier that uses the suite embeds the text and each
label name with a sentence encoder (all-MiniLM-L6-v2), picks the closest label name, and is
fine-tuned with LoRA; the tasks are built for that setting:

============== ========== ========================================= ==========================
task           family     labels (what decides them)                zero-shot?
============== ========== ========================================= ==========================
sentiment      review     positive / negative (the verdict phrase)  yes, improvable
product        review     kestrel / marlin / juniper (electronics,  no: code words
                          clothing, kitchen item)
temperature    weather    hot / cold (the temperature phrase)       yes, improvable
precipitation  weather    category A / category B (dry, wet)        no
topic          news       sports / politics / science / business    yes, improvable
                          (who the story is about)
scope          news       category A / category B (local, abroad)   no
urgency        ticket     yes / no (does the ticket ask for speed)  no
resolved       ticket     yes / no (is the problem fixed)           no
============== ========== ========================================= ==========================

The four pairs (sentiment, product), (temperature, precipitation), (topic, scope) and
(urgency, resolved) draw the same kind of sentence and label a *different* attribute of it,
so the same text can carry different labels on two clients. Label names also collide with
different meanings: "yes"/"no" means "urgent" on one client and "fixed" on another, and
"category A"/"category B" means dry/wet weather on one and local/foreign news on another. A
single global adapter therefore cannot fit every client; a personal (local) adapter can.

Within a family both attributes are drawn jointly and balanced over their Cartesian product
(cycled, then shuffled), so each task's labels are balanced (within one example per cell) and
the two labels of a pair are statistically independent: knowing one predicts nothing about the
other. Train and test texts of a task never coincide (duplicates are re-drawn). Sentences have
5 to 15 words. Each task draws from ``random.Random(seed * 1000 + task_index)``: the same seed
gives byte-identical output on every run and platform (no ``hash()``, no set iteration), and
the two tasks of a pair never share a random stream for any seed.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

N_TRAIN = 300
N_TEST = 100


@dataclass(frozen=True)
class _Family:
    templates: tuple[str, ...]
    fillers: dict[str, tuple[str, ...]]          # slot -> words with no label information
    attributes: dict[str, dict[str, tuple[str, ...]]]  # attribute -> value -> marker phrases


@dataclass(frozen=True)
class _Task:
    name: str
    family: str
    attribute: str
    labels: dict[str, str]                       # attribute value -> label name (choices order)


_FAMILIES = {
    "review": _Family(
        templates=(
            "The {kind} I {got} {when} {polarity}.",
            "{when}, I {got} this {kind}; it {polarity}.",
            "Honestly, this {kind} {polarity}.",
            "My {relative} says the {kind} {polarity}.",
            "Review: the {adj} {kind} {polarity}, {closing}.",
        ),
        fillers={
            "got": ("bought", "ordered", "got", "received"),
            "when": ("last week", "last month", "yesterday", "in the spring", "two days ago",
                     "recently"),
            "relative": ("sister", "neighbor", "roommate", "dad", "coworker", "uncle"),
            "adj": ("budget", "premium", "brand-new", "store-brand", "imported", "mid-range"),
            "closing": ("to be honest", "in my opinion", "all things considered", "so far",
                        "overall"),
        },
        attributes={
            "polarity": {
                "positive": ("works perfectly", "exceeded my expectations",
                             "is worth every penny", "is not bad at all", "made me really happy",
                             "is excellent", "feels like a great buy", "is better than I hoped",
                             "has been a delight"),
                "negative": ("broke within a week", "was a waste of money",
                             "is not worth the price", "disappointed me", "is terrible",
                             "fell apart quickly", "feels like a poor buy",
                             "is worse than I feared", "has been a constant headache"),
            },
            "kind": {
                "electronics": ("pair of headphones", "tablet", "smartwatch",
                                "bluetooth speaker", "laptop", "digital camera", "keyboard",
                                "phone charger"),
                "clothing": ("winter jacket", "wool sweater", "pair of jeans", "silk scarf",
                             "pair of boots", "summer dress", "hoodie", "raincoat"),
                "kitchen": ("blender", "frying pan", "coffee grinder", "toaster", "kettle",
                            "knife set", "rice cooker", "mixing bowl"),
            },
        },
    ),
    "weather": _Family(
        templates=(
            "{place} can expect {temp} and {precip} {time}.",
            "{time}, {place} will see {precip} with {temp}.",
            "Forecasters warn of {temp} in {place}, along with {precip}.",
            "Expect {precip} and {temp} across {place} {time}.",
            "Weather update: {temp} and {precip} for {place}.",
        ),
        fillers={
            "place": ("the valley", "the coast", "the city center", "the northern suburbs",
                      "the mountains", "the islands", "the river towns", "the plains"),
            "time": ("this weekend", "on Tuesday", "tomorrow", "through Friday", "tonight",
                     "early next week", "on Saturday"),
        },
        attributes={
            "temp": {
                "hot": ("scorching heat", "sweltering temperatures", "a heat wave",
                        "record highs", "blistering afternoons", "tropical warmth"),
                "cold": ("freezing temperatures", "bitter cold", "a cold snap", "record lows",
                         "frosty mornings", "arctic air"),
            },
            "precip": {
                "dry": ("clear skies", "bright sunshine", "bone-dry air", "dry conditions",
                        "cloudless skies", "zero rainfall"),
                "wet": ("heavy rain", "steady showers", "a passing downpour",
                        "scattered thunderstorms", "persistent drizzle", "soaking rain"),
            },
        },
    ),
    "news": _Family(
        templates=(
            "{topic} {pred} {scope} {time}.",
            "Reports say {topic} {pred} {scope}.",
            "{time}, {topic} {pred} {scope}.",
            "Breaking: {topic} {pred} {scope}.",
            "Observers noted that {topic} {pred} {scope}.",
        ),
        fillers={
            "pred": ("made headlines", "drew a large crowd", "announced big changes",
                     "surprised observers", "faced sharp criticism", "celebrated a milestone",
                     "unveiled new plans", "attracted attention"),
            "time": ("on Monday", "this week", "yesterday", "last night", "on Friday"),
        },
        attributes={
            "topic": {
                "sports": ("the hockey team", "a star striker", "the marathon organizers",
                           "the tennis champion", "the basketball coach", "the swim squad"),
                "politics": ("lawmakers", "campaign officials", "a new political party",
                             "the election commission", "opposition leaders", "the cabinet"),
                "science": ("researchers", "a team of astronomers", "the biology lab",
                            "climate scientists", "a physics institute", "geologists"),
                "business": ("a retail chain", "the central bank", "a tech startup",
                             "shareholders", "the factory owners", "an airline"),
            },
            "scope": {
                "local": ("here in town", "in our county", "in the neighborhood",
                          "close to home", "on Main Street", "at the community center"),
                "international": ("overseas", "abroad", "across Europe and Asia",
                                  "around the world", "in three foreign countries",
                                  "on another continent"),
            },
        },
    ),
    "ticket": _Family(
        templates=(
            "{greet} the {system} {status}; {urgency}.",
            "About the {system}: it {status}; {urgency}.",
            "Ticket {num}: the {system} {status}; {urgency}.",
            "{urgency}. The {system} {status}.",
        ),
        fillers={
            "greet": ("Hi support,", "Hello,", "Quick note:", "Hi team,", "FYI,", "Heads up:"),
            "system": ("printer", "VPN connection", "email server", "payroll app",
                       "shared drive", "login page", "office wifi", "billing portal"),
            "num": tuple(f"#{n}" for n in range(1000, 1100)),
        },
        attributes={
            "urgency": {
                "urgent": ("please respond right away", "this is critical",
                           "we need help immediately", "please treat this as urgent",
                           "it cannot wait", "our whole team is blocked"),
                "routine": ("no rush on this", "reply whenever you have time",
                            "this is low priority", "handle it when convenient",
                            "it can wait until next month", "there is no hurry"),
            },
            "status": {
                "fixed": ("is fixed now", "works again", "has been sorted out",
                          "was repaired this morning", "runs normally again",
                          "no longer shows errors"),
                "broken": ("is still broken", "keeps crashing", "still fails to load",
                           "has not been repaired", "shows errors again", "remains unusable"),
            },
        },
    ),
}

_TASKS = (
    _Task("sentiment", "review", "polarity", {"positive": "positive", "negative": "negative"}),
    _Task("product", "review", "kind",
          {"electronics": "kestrel", "clothing": "marlin", "kitchen": "juniper"}),
    _Task("temperature", "weather", "temp", {"hot": "hot", "cold": "cold"}),
    _Task("precipitation", "weather", "precip", {"dry": "category A", "wet": "category B"}),
    _Task("topic", "news", "topic", {v: v for v in ("sports", "politics", "science", "business")}),
    _Task("scope", "news", "scope", {"local": "category A", "international": "category B"}),
    _Task("urgency", "ticket", "urgency", {"urgent": "yes", "routine": "no"}),
    _Task("resolved", "ticket", "status", {"fixed": "yes", "broken": "no"}),
)
_BY_NAME = {t.name: t for t in _TASKS}

BUILTIN_TASKS: tuple[str, ...] = tuple(t.name for t in _TASKS)
# Pairs of tasks that draw the same kind of sentence but label different attributes.
BUILTIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a.name, b.name) for i, a in enumerate(_TASKS) for b in _TASKS[i + 1:] if a.family == b.family)


def choices(task: str) -> tuple[str, ...]:
    """The label names of a built-in task, in their fixed order."""
    return tuple(_BY_NAME[task].labels.values())


def _normalise(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9'-]+", " ", text.lower()).split()) + " "


def label_text(task: str, text: str) -> str:
    """The label `task` gives to a sentence of its family, recovered from the text alone.

    Works on any sentence of the task's family (e.g. a "product" sentence labelled for
    "sentiment"): exactly one value of the attribute must have a marker phrase in the text.
    """
    t = _BY_NAME[task]
    padded = _normalise(text)
    found = [value for value, markers in _FAMILIES[t.family].attributes[t.attribute].items()
             if any(_normalise(m) in padded for m in markers)]
    if len(found) != 1:
        raise ValueError(f"{task}: expected exactly one {t.attribute!r} marker in {text!r}, "
                         f"found {found}")
    return t.labels[found[0]]


def _balanced_cells(family: _Family, n: int, rng: random.Random) -> list[dict[str, str]]:
    """n attribute assignments cycling over the Cartesian product of all attribute values."""
    cells: list[dict[str, str]] = [{}]
    for attr, values in family.attributes.items():
        cells = [{**c, attr: v} for c in cells for v in values]
    out = [cells[k % len(cells)] for k in range(n)]
    rng.shuffle(out)
    return out


def _sentence(family: _Family, cell: dict[str, str], rng: random.Random) -> str:
    template = rng.choice(family.templates)
    fields = {slot: rng.choice(words) for slot, words in family.fillers.items()}
    fields.update({attr: rng.choice(family.attributes[attr][v]) for attr, v in cell.items()})
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def generate(seed: int = 0) -> tuple[dict[str, list[tuple[str, str]]],
                                     dict[str, list[tuple[str, str]]]]:
    """{task: [(text, label), ...]} for train (N_TRAIN each) and test (N_TEST each)."""
    train: dict[str, list[tuple[str, str]]] = {}
    test: dict[str, list[tuple[str, str]]] = {}
    for index, task in enumerate(_TASKS):
        rng = random.Random(seed * 1000 + index)
        family = _FAMILIES[task.family]
        seen: set[str] = set()
        for split, n in ((train, N_TRAIN), (test, N_TEST)):
            rows = []
            for cell in _balanced_cells(family, n, rng):
                for _ in range(1000):
                    text = _sentence(family, cell, rng)
                    if text not in seen:
                        break
                else:  # pragma: no cover - the word lists give thousands of sentences per cell
                    raise RuntimeError(f"built-in task {task.name}: ran out of distinct sentences")
                seen.add(text)
                rows.append((text, task.labels[cell[task.attribute]]))
            split[task.name] = rows
    return train, test
