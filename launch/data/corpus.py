"""The embedded default corpus: synthetic text with structure a tiny model can learn on a CPU.

No network and no third-party prose: every word list below was written for this project, and the
text is produced by a small seeded generator. A document mixes a few kinds of lines:

* sentences from a probabilistic grammar with subject-verb number agreement
  ("the two quiet foxes follow a red ship near the river."),
* fixed facts that hold in every document, whatever the seed ("the color of the lamp is green.",
  "Mara lives in Dunwick."), so a model can memorise them across documents,
* arithmetic facts ("17+25=42.", "9*7=63.", "Q: what is 40-13? A: 27."),
* simple patterns (counting, alphabet runs, repetition).

A byte-level model first learns the spelling and the templates, then agreement and facts, then
some digits: a 2-layer, 96-wide byte transformer goes from 5.9 to about 2.2 nats/byte in 50 steps
and about 1.3 in 400 steps of 16 x 64 tokens (25 s on one CPU thread).

Determinism: the generator uses its own splitmix64 stream instead of `random`, so the output is
byte-identical on every Python version and platform. Document i depends only on (seed, i), hence
the first N documents for a seed are the same whatever num_docs is asked for.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

__all__ = [
    "CORPUS_VERSION",
    "build_embedded_corpus",
    "iter_embedded_corpus",
    "write_embedded_jsonl",
]

# Bump when the generated text changes, so caches keyed on it are rebuilt.
CORPUS_VERSION = 1

_MASK64 = (1 << 64) - 1


class _Rng:
    """splitmix64: tiny, fast enough in pure Python, and stable forever (unlike `random`'s internals)."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        # The modulo bias for n < 2**16 is below 2**-48: irrelevant here.
        return self.next() % n

    def chance(self, p: float) -> bool:
        return self.next() < int(p * (1 << 64))

    def pick(self, items: Sequence):
        return items[self.next() % len(items)]

    def weighted(self, weights: Sequence[int]) -> int:
        r = self.below(sum(weights))
        for i, w in enumerate(weights):
            if r < w:
                return i
            r -= w
        return len(weights) - 1


# ---- word lists (written for this project) ----------------------------------------------------
# (singular, plural)
_NOUNS = (
    ("cat", "cats"), ("dog", "dogs"), ("fox", "foxes"), ("bird", "birds"), ("horse", "horses"),
    ("child", "children"), ("teacher", "teachers"), ("farmer", "farmers"), ("robot", "robots"),
    ("sailor", "sailors"), ("baker", "bakers"), ("mouse", "mice"), ("goat", "goats"),
    ("painter", "painters"), ("owl", "owls"), ("frog", "frogs"),
)
_THINGS = (
    ("box", "boxes"), ("ship", "ships"), ("lamp", "lamps"), ("book", "books"), ("key", "keys"),
    ("apple", "apples"), ("stone", "stones"), ("cup", "cups"), ("kite", "kites"),
    ("drum", "drums"), ("map", "maps"), ("coat", "coats"), ("bell", "bells"), ("boat", "boats"),
)
_PLACES = (
    "the river", "the garden", "the market", "the hill", "the bridge", "the old mill",
    "the harbor", "the forest", "the school", "the tower", "the square", "the lake",
)
_ADJECTIVES = (
    "small", "big", "quiet", "happy", "old", "young", "clever", "tired", "brave", "lazy",
    "red", "green", "blue", "yellow", "bright", "dark", "warm", "cold", "tall", "round",
)
_INTRANSITIVE = ("sleep", "run", "sing", "wait", "jump", "laugh", "swim", "rest", "dance", "hide")
_TRANSITIVE = (
    "see", "like", "find", "carry", "follow", "watch", "push", "paint", "help", "build",
    "catch", "wash", "fix", "draw", "miss",
)
_PREPOSITIONS = ("near", "under", "behind", "beside", "above", "inside", "across")
_ADVERBS = ("slowly", "quickly", "again", "quietly", "today", "at night", "all day")
_NAMES = (
    "Ada", "Bo", "Cyra", "Dov", "Eli", "Fen", "Gus", "Hal", "Ivo", "Juno", "Kai", "Lio",
    "Mara", "Nel", "Oto", "Pim", "Quin", "Rua", "Sol", "Tova",
)
_TOWNS = ("Brill", "Cadmor", "Dunwick", "Elsby", "Farrow", "Glenmere", "Harth", "Istow")
_COLORS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Facts are fixed by a constant seed, not the corpus seed: they must agree across every document
# and every corpus so that they can be learned.
_FACT_RNG = _Rng(0x5EED_FAC7)
_THING_COLOR = tuple(_FACT_RNG.pick(_COLORS) for _ in _THINGS)
_NAME_TOWN = tuple(_FACT_RNG.pick(_TOWNS) for _ in _NAMES)


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _noun_phrase(rng: _Rng, table, plural: bool, allow_pp: bool = True) -> str:
    sing, plur = rng.pick(table)
    if plural:
        det = rng.pick(("the", "some", "the", "my", rng.pick(_NUMBER_WORDS)))
        noun = plur
    else:
        det = rng.pick(("the", "a", "the", "my", "every", "one"))
        noun = sing
    words = [det]
    if rng.chance(0.5):
        adj = rng.pick(_ADJECTIVES)
        if det == "a" and adj[0] in "aeiou":
            det = words[0] = "an"
        words.append(adj)
    elif det == "a" and noun[0] in "aeiou":
        words[0] = "an"
    words.append(noun)
    if allow_pp and rng.chance(0.25):
        words += [rng.pick(_PREPOSITIONS), rng.pick(_PLACES)]
    return " ".join(words)


def _sentence(rng: _Rng) -> str:
    plural = rng.chance(0.4)
    subject = _noun_phrase(rng, _NOUNS, plural)
    kind = rng.weighted((3, 5, 2))
    if kind == 0:
        verb = rng.pick(_INTRANSITIVE)
        verb = verb if plural else _third_person(verb)
        tail = f" {rng.pick(_ADVERBS)}" if rng.chance(0.4) else ""
        predicate = verb + tail
    elif kind == 1:
        verb = rng.pick(_TRANSITIVE)
        verb = verb if plural else _third_person(verb)
        predicate = f"{verb} {_noun_phrase(rng, _THINGS, rng.chance(0.3))}"
    else:
        predicate = f"{'are' if plural else 'is'} {rng.pick(_ADJECTIVES)}"
    text = f"{subject} {predicate}"
    if rng.chance(0.15):
        text += f" and {_sentence(rng)[:-1]}"
    return text + "."


def _fact(rng: _Rng) -> str:
    if rng.chance(0.5):
        i = rng.below(len(_THINGS))
        return f"the color of the {_THINGS[i][0]} is {_THING_COLOR[i]}."
    i = rng.below(len(_NAMES))
    return f"{_NAMES[i]} lives in {_NAME_TOWN[i]}."


def _arithmetic(rng: _Rng) -> str:
    kind = rng.weighted((5, 3, 3, 2))
    if kind == 0:
        a, b = rng.below(100), rng.below(100)
        return f"{a}+{b}={a + b}."
    if kind == 1:
        a, b = rng.below(100), rng.below(100)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}={a - b}."
    if kind == 2:
        a, b = 1 + rng.below(12), 1 + rng.below(12)
        return f"{a}*{b}={a * b}."
    a, b = rng.below(50), rng.below(50)
    return f"Q: what is {a}+{b}? A: {a + b}."


def _pattern(rng: _Rng) -> str:
    kind = rng.weighted((3, 2, 2, 1))
    if kind == 0:
        start, n = rng.below(90), 4 + rng.below(6)
        return "count: " + " ".join(str(start + k) for k in range(n)) + "."
    if kind == 1:
        start, n = rng.below(20), 3 + rng.below(5)
        return "letters: " + " ".join(_LETTERS[start:start + n]) + "."
    if kind == 2:
        word = "".join(rng.pick(_LETTERS) for _ in range(2 + rng.below(3)))
        return "echo: " + " ".join([word] * (2 + rng.below(3))) + "."
    name = rng.pick(_NAMES)
    return f"{name} says hello to {rng.pick(_NAMES)}, and {name} waves."


_LINE_MAKERS = (_sentence, _fact, _arithmetic, _pattern)


def _document(seed: int, index: int) -> str:
    # Distinct streams per (seed, index) without collisions for any practical corpus size.
    rng = _Rng((seed & 0xFFFFFFFF) << 32 | (index & 0xFFFFFFFF))
    rng.next()
    # Each document leans towards one kind of line, so documents differ in character.
    weights = [4, 1, 2, 1]
    weights[rng.below(4)] += 4
    lines = [_LINE_MAKERS[rng.weighted(weights)](rng) for _ in range(4 + rng.below(9))]
    text = lines[0][0].upper() + lines[0][1:]
    for line in lines[1:]:
        text += ("\n" if rng.chance(0.3) else " ") + line[0].upper() + line[1:]
    return text


def iter_embedded_corpus(num_docs: int, seed: int = 1234) -> Iterator[str]:
    """Yield the documents of `build_embedded_corpus` one at a time."""
    if num_docs < 0:
        raise ValueError(f"num_docs must be >= 0, got {num_docs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    for i in range(num_docs):
        yield _document(seed, i)


def build_embedded_corpus(num_docs: int, seed: int = 1234) -> list[str]:
    """`num_docs` synthetic documents (about 220 bytes each); identical for identical arguments."""
    return list(iter_embedded_corpus(num_docs, seed))


def write_embedded_jsonl(path: str, num_docs: int, seed: int = 1234, key: str = "text") -> str:
    """Write the corpus as JSON lines ({key: text} per line), atomically; return `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in iter_embedded_corpus(num_docs, seed):
                f.write(json.dumps({key: doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
