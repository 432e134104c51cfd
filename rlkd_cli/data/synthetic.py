"""The embedded default task: synthetic arithmetic word problems in GSM8K's format.

Each row is ``{"question": str, "answer": str}``. The answer is GSM8K-shaped: two or three
reasoning lines carrying calculator annotations ``a op b = <<a op b=r>>r`` (the annotation has no
spaces, exactly like GSM8K's ``16 - 3 = <<16-3=13>>13``), then a last line ``#### r``.

Why this task exists
--------------------
RLKD distils the *order* of the teacher's plausible next tokens (Spearman correlation of the
teacher's and the student's rankings over their top-k union). That is only a meaningful target if
the teacher's next-token distribution has several modes with a well-defined order. Here that is true
*by construction*: the question fixes the arithmetic, but the answer text is sampled with fixed,
skewed probabilities at a set of **choice points**, so a model that fits the data perfectly has, at
each such position, a next-token distribution equal to the weights below (distinct weights, hence a
unique rank order of 2--4 modes). The loss is on the response only, and every choice point is in
the response.

Choice points and their weights (``choice_points()`` returns this table):

- ``opener`` -- first word of the concluding line: So / Then / Therefore: 0.5 / 0.3 / 0.2
- ``buy_verb`` -- buys / gets / purchases: 0.5 / 0.3 / 0.2
- ``give_verb`` -- gives / hands / passes: 0.6 / 0.25 / 0.15
- ``total_phrase`` -- in total / altogether / in all: 0.5 / 0.3 / 0.2
- ``left_phrase`` -- left / remaining: 0.7 / 0.3
- ``each_gets`` -- each friend gets / every friend gets / each friend receives: 0.5 / 0.3 / 0.2
- ``each_word`` -- "Each pencil costs $p." / "One pencil costs $p.": 0.7 / 0.3
- ``per_box_phrase`` -- "Each box holds k items." / "There are k items in each box.": 0.6 / 0.4
- ``add_order`` -- operands of a sum as asked (a + b) / swapped (b + a): 0.6 / 0.4
- ``mul_order`` -- factors of a product as asked (n * k) / swapped (k * n): 0.7 / 0.3
- ``step_order`` -- two independent steps in the question's order / the other order: 0.6 / 0.4
- ``money_style`` -- ``= $<<n*p=r>>r.`` / ``= <<n*p=r>>r dollars.``: 0.6 / 0.4

``add_order`` and ``mul_order`` make the first operand after a verb bimodal over *numbers* (which
number comes first), ``step_order`` makes a whole line's content bimodal, the word choices make
single-token synonyms multi-modal, and ``opener`` makes the first token of the concluding line
three-modal. Each choice is drawn independently at every use.

Problem types (uniformly chosen): ``add``, ``subtract``, ``multiply``, ``divide`` (always even),
``price`` (money), ``multiply_add``, ``two_products``, ``add_subtract``. Operands are mostly at
most 20 (a dividend is at most 108, an intermediate total at most 120) and every result is below
1000. The vocabulary is small (about 150 distinct
words: 24 names, 24 items, 8 containers and the fixed template words) so that a byte-level BPE of
about 1024 tokens makes almost every word one token; a whole example, prompt and answer, is about
110 tokens or fewer with the embedded tokenizer.

Determinism: everything is drawn from ``random.Random(seed)`` (never the global generator); the
three splits use seeds derived from ``seed`` and the split name, and validation and test questions
never repeat a train question (nor each other). Bump :data:`GENERATOR_VERSION` whenever the output
for a given seed changes: it is part of the cache keys of the embedded tokenizer and teacher.
"""

from __future__ import annotations

import hashlib
import random
import re

GENERATOR_VERSION: int = 1

NAMES = (
    "Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Ella",
    "Noah", "Ava", "Owen", "Ruby", "Liam", "Nora", "Finn", "Kate", "Eli", "Rosa", "Ian", "Tara",
)

# (singular, plural)
ITEMS = (
    ("apple", "apples"), ("orange", "oranges"), ("pear", "pears"), ("banana", "bananas"),
    ("peach", "peaches"), ("cookie", "cookies"), ("muffin", "muffins"), ("cupcake", "cupcakes"),
    ("candy", "candies"), ("pencil", "pencils"), ("crayon", "crayons"), ("marker", "markers"),
    ("book", "books"), ("card", "cards"), ("sticker", "stickers"), ("stamp", "stamps"),
    ("marble", "marbles"), ("ball", "balls"), ("shell", "shells"), ("rock", "rocks"),
    ("flower", "flowers"), ("egg", "eggs"), ("bead", "beads"), ("button", "buttons"),
)

CONTAINERS = (
    ("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"),
    ("basket", "baskets"), ("crate", "crates"), ("tray", "trays"), ("bucket", "buckets"),
)

KINDS = (
    "add", "subtract", "multiply", "divide", "price", "multiply_add", "two_products", "add_subtract",
)

# name -> ((alternative, weight), ...). Weights within a choice point are distinct and sum to 1.
_CHOICE_POINTS: dict[str, tuple[tuple[str, float], ...]] = {
    "opener": (("So", 0.5), ("Then", 0.3), ("Therefore", 0.2)),
    "buy_verb": (("buys", 0.5), ("gets", 0.3), ("purchases", 0.2)),
    "give_verb": (("gives", 0.6), ("hands", 0.25), ("passes", 0.15)),
    "total_phrase": (("in total", 0.5), ("altogether", 0.3), ("in all", 0.2)),
    "left_phrase": (("left", 0.7), ("remaining", 0.3)),
    "each_gets": (("each friend gets", 0.5), ("every friend gets", 0.3), ("each friend receives", 0.2)),
    "each_word": (("Each", 0.7), ("One", 0.3)),
    "per_box_phrase": (("holds", 0.6), ("there are", 0.4)),
    "add_order": (("as asked", 0.6), ("swapped", 0.4)),
    "mul_order": (("as asked", 0.7), ("swapped", 0.3)),
    "step_order": (("as asked", 0.6), ("swapped", 0.4)),
    "money_style": (("$", 0.6), ("dollars", 0.4)),
}


def choice_points() -> dict[str, list[tuple[str, float]]]:
    """The choice points of the answer text: ``{name: [(alternative, weight), ...]}``.

    Weights are the exact probabilities the generator uses (see the module docstring for where
    each choice point appears in an answer).
    """
    return {name: list(alts) for name, alts in _CHOICE_POINTS.items()}


class _Phraser:
    """Draws the answer's choice points from ``rng``; optionally records them in ``trace``."""

    def __init__(self, rng: random.Random, trace: list[tuple[str, str]] | None = None):
        self.rng = rng
        self.trace = trace

    def pick(self, point: str) -> str:
        alts = _CHOICE_POINTS[point]
        u = self.rng.random()
        acc = 0.0
        choice = alts[-1][0]
        for text, weight in alts:
            acc += weight
            if u < acc:
                choice = text
                break
        if self.trace is not None:
            self.trace.append((point, choice))
        return choice

    def swapped(self, point: str) -> bool:
        return self.pick(point) == "swapped"

    def calc(self, a: int, op: str, b: int, order_point: str | None = None) -> tuple[str, int]:
        """``"a op b = <<a op b=r>>r"`` (GSM8K style) and r; commutative ops may swap operands."""
        if order_point is not None and self.swapped(order_point):
            a, b = b, a
        r = _apply(a, op, b)
        return f"{a} {op} {b} = <<{a}{op}{b}={r}>>{r}", r


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a}/{b} is not an even division")
        return a // b
    raise ValueError(f"unknown operator {op!r}")


# --------------------------------------------------------------------------------------------
# Parameters: everything the question depends on. The answer additionally depends on the choices.
# --------------------------------------------------------------------------------------------

def sample_params(kind: str, rng: random.Random) -> dict:
    """Draw the names, items and numbers of one problem of type ``kind``."""
    a, b = rng.sample(NAMES, 2)
    item, item2 = rng.sample(ITEMS, 2)
    box, box2 = rng.sample(CONTAINERS, 2)
    p = {"kind": kind, "a": a, "b": b, "item": item, "item2": item2, "box": box, "box2": box2}
    r = rng.randint
    if kind == "add":
        p.update(x=r(2, 20), y=r(2, 20))
    elif kind == "subtract":
        x = r(5, 25)
        p.update(x=x, y=r(1, x - 1))
    elif kind == "multiply":
        p.update(n=r(2, 9), k=r(2, 12))
    elif kind == "divide":
        n, q = r(2, 9), r(2, 12)
        p.update(n=n, t=n * q)
    elif kind == "price":
        p.update(n=r(2, 9), price=r(2, 15))
    elif kind == "multiply_add":
        p.update(x=r(2, 20), n=r(2, 6), k=r(2, 10))
    elif kind == "two_products":
        p.update(n=r(2, 6), k=r(2, 9), n2=r(2, 6), k2=r(2, 9))
    elif kind == "add_subtract":
        x = r(5, 20)
        p.update(x=x, y=r(2, 15), z=r(1, x))
    else:
        raise ValueError(f"unknown problem kind {kind!r}; one of {', '.join(KINDS)}")
    return p


def render_question(p: dict) -> str:
    """The question text; it depends only on the parameters (never on the answer's choices)."""
    kind, a, b = p["kind"], p["a"], p["b"]
    s, pl = p["item"]
    s2, pl2 = p["item2"]
    c, cs = p["box"]
    c2, cs2 = p["box2"]
    if kind == "add":
        return f"{a} has {p['x']} {pl}. {b} gives {a} {p['y']} more {pl}. How many {pl} does {a} have now?"
    if kind == "subtract":
        return f"{a} has {p['x']} {pl}. {a} gives {p['y']} {pl} to {b}. How many {pl} does {a} have left?"
    if kind == "multiply":
        return f"{a} buys {p['n']} {cs} of {pl}. Each {c} holds {p['k']} {pl}. How many {pl} does {a} buy?"
    if kind == "divide":
        return (f"{a} has {p['t']} {pl} and shares them equally among {p['n']} friends. "
                f"How many {pl} does each friend get?")
    if kind == "price":
        return f"{a} buys {p['n']} {pl} for ${p['price']} each. How much money does {a} spend?"
    if kind == "multiply_add":
        return (f"{a} has {p['x']} {pl}. {a} buys {p['n']} {cs} with {p['k']} {pl} in each. "
                f"How many {pl} does {a} have now?")
    if kind == "two_products":
        return (f"{a} buys {p['n']} {cs} of {p['k']} {pl} and {p['n2']} {cs2} of {p['k2']} {pl2}. "
                f"How many items does {a} buy?")
    if kind == "add_subtract":
        return (f"{a} has {p['x']} {pl}. {a} gets {p['y']} more and gives {p['z']} to {b}. "
                f"How many {pl} does {a} have left?")
    raise ValueError(f"unknown problem kind {kind!r}")


def render_answer(p: dict, rng: random.Random, trace: list[tuple[str, str]] | None = None) -> str:
    """Sample one answer text for the problem ``p``; every choice point is drawn from ``rng``.

    ``trace`` (if given) receives ``(choice_point, alternative)`` for each draw, in order.
    """
    ph = _Phraser(rng, trace)
    kind, a, b = p["kind"], p["a"], p["b"]
    s, pl = p["item"]
    s2, pl2 = p["item2"]
    c, cs = p["box"]
    lines: list[str] = []
    if kind == "add":
        lines.append(f"{b} {ph.pick('give_verb')} {a} {p['y']} more {pl}.")
        expr, r = ph.calc(p["x"], "+", p["y"], "add_order")
        lines.append(f"{ph.pick('opener')}, {a} has {expr} {pl} {ph.pick('total_phrase')}.")
    elif kind == "subtract":
        lines.append(f"{a} {ph.pick('give_verb')} {p['y']} {pl} to {b}.")
        expr, r = ph.calc(p["x"], "-", p["y"])
        lines.append(f"{ph.pick('opener')}, {a} has {expr} {pl} {ph.pick('left_phrase')}.")
    elif kind == "multiply":
        if ph.pick("per_box_phrase") == "holds":
            lines.append(f"Each {c} holds {p['k']} {pl}.")
        else:
            lines.append(f"There are {p['k']} {pl} in each {c}.")
        expr, r = ph.calc(p["n"], "*", p["k"], "mul_order")
        lines.append(f"{ph.pick('opener')}, {a} {ph.pick('buy_verb')} {expr} {pl} {ph.pick('total_phrase')}.")
    elif kind == "divide":
        lines.append(f"{a} has {p['t']} {pl} for {p['n']} friends.")
        expr, r = ph.calc(p["t"], "/", p["n"])
        lines.append(f"{ph.pick('opener')}, {ph.pick('each_gets')} {expr} {pl}.")
    elif kind == "price":
        lines.append(f"{ph.pick('each_word')} {s} costs ${p['price']}.")
        n, price = p["n"], p["price"]
        if ph.swapped("mul_order"):
            n, price = price, n
        r = n * price
        opener = ph.pick("opener")
        if ph.pick("money_style") == "$":
            lines.append(f"{opener}, {a} spends {n} * {price} = $<<{n}*{price}={r}>>{r}.")
        else:
            lines.append(f"{opener}, {a} spends {n} * {price} = <<{n}*{price}={r}>>{r} dollars.")
    elif kind == "multiply_add":
        expr, m = ph.calc(p["n"], "*", p["k"], "mul_order")
        lines.append(f"{a} {ph.pick('buy_verb')} {expr} {pl}.")
        expr, r = ph.calc(p["x"], "+", m, "add_order")
        lines.append(f"{ph.pick('opener')}, {a} has {expr} {pl} {ph.pick('total_phrase')}.")
    elif kind == "two_products":
        steps = [(p["n"], p["k"], pl), (p["n2"], p["k2"], pl2)]
        if ph.swapped("step_order"):
            steps.reverse()
        values = []
        for n, k, plural in steps:
            expr, v = ph.calc(n, "*", k, "mul_order")
            values.append(v)
            lines.append(f"{a} {ph.pick('buy_verb')} {expr} {plural}.")
        expr, r = ph.calc(values[0], "+", values[1], "add_order")
        lines.append(f"{ph.pick('opener')}, that is {expr} {ph.pick('total_phrase')}.")
    elif kind == "add_subtract":
        x, y, z = p["x"], p["y"], p["z"]
        if ph.swapped("step_order"):
            expr, mid = ph.calc(x, "-", z)
            lines.append(f"{a} has {expr} {pl} after giving some away.")
            expr, r = ph.calc(mid, "+", y, "add_order")
        else:
            expr, mid = ph.calc(x, "+", y, "add_order")
            lines.append(f"{a} has {expr} {pl} after getting more.")
            expr, r = ph.calc(mid, "-", z)
        lines.append(f"{ph.pick('opener')}, {a} has {expr} {pl} {ph.pick('left_phrase')}.")
    else:
        raise ValueError(f"unknown problem kind {kind!r}")
    lines.append(f"#### {r}")
    return "\n".join(lines)


def solve(p: dict) -> int:
    """The correct final answer of problem ``p`` (independent of the phrasing)."""
    kind = p["kind"]
    if kind == "add":
        return p["x"] + p["y"]
    if kind == "subtract":
        return p["x"] - p["y"]
    if kind == "multiply":
        return p["n"] * p["k"]
    if kind == "divide":
        return p["t"] // p["n"]
    if kind == "price":
        return p["n"] * p["price"]
    if kind == "multiply_add":
        return p["x"] + p["n"] * p["k"]
    if kind == "two_products":
        return p["n"] * p["k"] + p["n2"] * p["k2"]
    if kind == "add_subtract":
        return p["x"] + p["y"] - p["z"]
    raise ValueError(f"unknown problem kind {kind!r}")


def make_example(p: dict, rng: random.Random, trace: list[tuple[str, str]] | None = None) -> dict:
    """One row ``{"question", "answer"}`` for fixed parameters ``p``; phrasing drawn from ``rng``."""
    return {"question": render_question(p), "answer": render_answer(p, rng, trace)}


def _sample_row(rng: random.Random) -> dict:
    kind = KINDS[rng.randrange(len(KINDS))]
    return make_example(sample_params(kind, rng), rng)


def generate(n: int, seed: int) -> list[dict]:
    """``n`` rows ``{"question", "answer"}`` drawn deterministically from ``random.Random(seed)``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    return [_sample_row(rng) for _ in range(n)]


def _derived_seed(seed: int, split: str) -> int:
    digest = hashlib.sha256(f"rlkd-synthetic-v{GENERATOR_VERSION}:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _generate_excluding(n: int, seed: int, exclude: set[str]) -> list[dict]:
    """``n`` rows whose questions are not in ``exclude`` and pairwise distinct (updates ``exclude``)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError("could not draw enough distinct synthetic questions")
        row = _sample_row(rng)
        if row["question"] in exclude:
            continue
        exclude.add(row["question"])
        rows.append(row)
    return rows


def generate_splits(num_train: int, num_validation: int, num_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """Train, validation and test rows from seeds derived from ``seed`` and the split name.

    Train may repeat a question (with a freshly drawn phrasing: that is the point of the task);
    validation and test questions are distinct from every train question and from each other.
    """
    train = generate(num_train, _derived_seed(seed, "train"))
    seen = {row["question"] for row in train}
    validation = _generate_excluding(num_validation, _derived_seed(seed, "validation"), seen)
    test = _generate_excluding(num_test, _derived_seed(seed, "test"), seen)
    return {"train": train, "validation": validation, "test": test}


_FINAL_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(answer_text: str) -> str:
    """The number after the last ``####`` (commas removed), or ``""`` when there is none.

    Works for GSM8K's gold answers as well as for model generations.
    """
    matches = _FINAL_RE.findall(answer_text or "")
    if not matches:
        return ""
    return matches[-1].replace(",", "")


__all__: list[str] = [
    "GENERATOR_VERSION", "KINDS", "choice_points", "final_answer", "generate", "generate_splits",
    "make_example", "render_answer", "render_question", "sample_params", "solve",
]
