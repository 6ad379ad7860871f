"""Synthetic instructions with exact answers: the check that fine-tuning teaches a model something.

Each task kind is a small function that draws one item from a seeded RNG: a canonical `key`
(what is asked, e.g. `add:47+385`), an alpaca `instruction`/`input` phrased by one of a few
templates, and the exact `output` (the answer only, so that exact match is well defined):

    {"instruction": "What is 47 + 385?", "input": "", "output": "432", "kind": "add"}
    {"instruction": "Write this word in capital letters.", "input": "plant", "output": "PLANT", ...}

Train and held-out items are disjoint by construction: an item's split is a hash of its key,

    heldout  ⇔  int(sha256(key)[:8 bytes]) / 2^64 < heldout_fraction,

independent of the seed and of the phrasing, so no paraphrase of a held-out question is ever
trained on, whatever seeds produced the two files (47 + 385 and 385 + 47 share a key, and so do
7 km -> m and 7000 m -> km).

Why these tasks. The built-in model (SmolLM2-135M-Instruct) answers all of them in chatty
sentences and mostly wrongly: it adds 47 + 385 by "combining the numbers", converts 7 km into
"1000000000", writes "planet" reversed as "planet-a-l-l-l". On 100 held-out items of each kind
its exact match is 0% for every kind but `upper` (4%), and only 3.7% of its replies even
*contain* the right answer (`llmlab eval em`, bf16, seed 0). Yet each task should be a pattern a
135M model can pick up from a few hundred examples in a few hundred LoRA steps: digits are
single tokens in its vocabulary, so addition with carries and products by one digit are
digit-wise rules; powers-of-ten conversions append or strip zeros; case changes and first/last
letters are token-local. Reversing 4–5 letter words is the hardest kind of the default mix;
sorting letters (and lowercasing, which repeats uppercasing) are available but left out of it.
Left out entirely: multi-digit × multi-digit products and long words, which a small model
cannot learn to compute from so little data, so they would not show learning.
"""

import hashlib
import random
from dataclasses import dataclass
from importlib import resources

from llmlab.errors import LlmlabError, closest


@dataclass(frozen=True)
class Task:
    key: str  # what is asked, independent of phrasing; decides the split
    instruction: str
    input: str
    output: str


# ---- the task kinds: each draws one item from `rng` ----

def add(rng: random.Random) -> Task:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    template = rng.choice(["What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}.",
                           "What is the sum of {a} and {b}?"])
    return Task(f"add:{min(a, b)}+{max(a, b)}", template.format(a=a, b=b), "", str(a + b))  # b + a is the same item


def mul(rng: random.Random) -> Task:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    template = rng.choice(["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
                           "Calculate {a} × {b}."])
    return Task(f"mul:{a}*{b}", template.format(a=a, b=b), "", str(a * b))


# (symbol, name) of the larger unit, of the smaller one, and how many smaller make one larger
UNITS = [(("km", "kilometers"), ("m", "meters"), 1000), (("m", "meters"), ("cm", "centimeters"), 100),
         (("cm", "centimeters"), ("mm", "millimeters"), 10), (("kg", "kilograms"), ("g", "grams"), 1000),
         (("L", "liters"), ("mL", "milliliters"), 1000)]


def units(rng: random.Random) -> Task:
    """Powers-of-ten conversions both ways, with integer answers: 7 km -> 7000 m, 7000 m -> 7 km."""
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 999)
    src, dst, value, answer = (big, small, n, n * factor) if rng.random() < 0.5 else (small, big, n * factor, n)
    template = rng.choice(["Convert {v} {s} to {d}.", "How many {D} are in {v} {S}?", "{v} {s} = ? {d}"])
    text = template.format(v=value, s=src[0], d=dst[0], S=src[1], D=dst[1])
    return Task(f"units:{n}{big[0]}={small[0]}", text, "", str(answer))  # one key for both directions


def _word_task(name: str, templates: list[str], answer, shown=lambda w: w):
    """A kind that asks about one word of the word list: `answer(word)` is the output.

    Words that are their own answer ("noon" reversed, "chip" sorted) are skipped: echoing the
    question would score them.
    """
    pool = []

    def kind(rng: random.Random) -> Task:
        if not pool:
            pool.extend(w for w in words() if answer(w) != shown(w))
        word = rng.choice(pool)
        template = rng.choice(templates)
        if "{w}" in template:  # the word inside the instruction, or as the alpaca input
            return Task(f"{name}:{word}", template.format(w=shown(word)), "", answer(word))
        return Task(f"{name}:{word}", template, shown(word), answer(word))
    kind.__name__ = name
    return kind


upper = _word_task("upper", ["Write this word in capital letters.", "Convert the word to uppercase.",
                             "Write '{w}' in uppercase."], str.upper)
lower = _word_task("lower", ["Write this word in lowercase letters.", "Convert the word to lowercase.",
                             "Write '{w}' in lowercase."], str.lower, shown=str.upper)
reverse = _word_task("reverse", ["Reverse the letters of this word.", "Write this word backwards.",
                                 "Spell '{w}' backwards."], lambda w: w[::-1])
first = _word_task("first", ["What is the first letter of this word?", "Give the first letter of the word.",
                             "What letter does '{w}' start with?"], lambda w: w[0])
last = _word_task("last", ["What is the last letter of this word?", "Give the last letter of the word.",
                           "What letter does '{w}' end with?"], lambda w: w[-1])
sort = _word_task("sort", ["Sort the letters of this word alphabetically.",
                           "Write the letters of this word in alphabetical order.",
                           "Sort the letters of '{w}' from a to z."], lambda w: "".join(sorted(w)))

KINDS = {"add": add, "mul": mul, "units": units, "upper": upper, "lower": lower, "reverse": reverse,
         "first": first, "last": last, "sort": sort}
GROUPS = {"arithmetic": ["add", "mul"], "strings": ["upper", "lower", "reverse", "first", "last", "sort"],
          "all": list(KINDS)}


def words() -> list[str]:
    """The word list of the string kinds: 914 common English words of 4 and 5 letters."""
    if not hasattr(words, "cache"):
        text = resources.files("llmlab.assets").joinpath("words.txt").read_text(encoding="utf-8")
        words.cache = [w for w in text.split() if w]
    return words.cache


def expand_kinds(kinds: list[str]) -> list[str]:
    """Kind names with group names (arithmetic, strings, all) expanded, in order, without repeats."""
    out = []
    for name in kinds:
        if name not in KINDS and name not in GROUPS:
            raise LlmlabError(f"unknown task kind '{name}'{closest(name, [*KINDS, *GROUPS])}; "
                              f"choose from {', '.join([*KINDS, *GROUPS])}")
        out += [k for k in GROUPS.get(name, [name]) if k not in out]
    return out


def split_of(key: str, heldout_fraction: float = 0.2) -> str:
    """'heldout' or 'train', by the hash of the item's key (see the module docstring)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h < heldout_fraction * 2**64 else "train"


def make_tasks(kinds: list[str], n: int, seed: int = 0, split: str = "train",
               heldout_fraction: float = 0.2) -> list[dict]:
    """`n` distinct items of each kind from `split`, shuffled, as alpaca rows with a `kind` field."""
    if split not in ("train", "heldout"):
        raise LlmlabError(f"split must be 'train' or 'heldout', got '{split}'")
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for kind in expand_kinds(kinds):
        rows += [{"instruction": t.instruction, "input": t.input, "output": t.output, "kind": kind}
                 for t in _draw(KINDS[kind], rng, n, split, heldout_fraction)]
    rng.shuffle(rows)
    return rows


def _draw(kind, rng: random.Random, n: int, split: str, heldout_fraction: float) -> list[Task]:
    """Sample until `n` items of `split` with distinct keys; an error if the kind has fewer."""
    found: dict[str, Task] = {}
    for _ in range(200 * n + 1000):
        if len(found) == n:
            return list(found.values())
        task = kind(rng)
        if task.key not in found and split_of(task.key, heldout_fraction) == split:
            found[task.key] = task
    raise LlmlabError(f"task kind '{kind.__name__}' has only about {len(found)} distinct {split} items; "
                      f"ask for fewer than {n} per kind")


def alpaca_message(row: dict) -> str:
    """The user message of an alpaca row: the instruction, then a blank line and the input if there is one."""
    extra = row.get("input")
    return row["instruction"] + ("\n\n" + extra if extra and extra.strip() else "")


# ---- the `llmlab data tasks` verb ----


__all__ = ["Task", "KINDS", "GROUPS", "make_tasks", "split_of", "expand_kinds", "alpaca_message"]
