"""The embedded synthetic task: determinism, disjoint splits, GSM8K format, correct arithmetic and
multi-modality of the answers with the documented weights."""

from __future__ import annotations

import collections
import math
import random
import re

import pytest

from rlkd_cli.data import synthetic as S

CALC_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\$?)<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def _eval(a: int, op: str, b: int) -> int:
    """Brute-force reference arithmetic (division must be exact)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert b != 0 and a % b == 0, f"{a}/{b} is not an even division"
    return a // b


def test_generate_is_deterministic_and_seed_dependent():
    a = S.generate(200, seed=3)
    b = S.generate(200, seed=3)
    c = S.generate(200, seed=4)
    assert a == b
    assert a != c
    assert all(set(r) == {"question", "answer"} for r in a)
    # The global random generator is neither used nor disturbed.
    random.seed(123)
    before = random.random()
    random.seed(123)
    S.generate(50, seed=1)
    assert random.random() == before


def test_generate_splits_deterministic_sized_and_disjoint():
    s1 = S.generate_splits(3000, 300, 300, seed=7)
    s2 = S.generate_splits(3000, 300, 300, seed=7)
    s3 = S.generate_splits(3000, 300, 300, seed=8)
    assert s1 == s2
    assert s1["train"] != s3["train"]
    assert [len(s1[k]) for k in ("train", "validation", "test")] == [3000, 300, 300]
    train_q = {r["question"] for r in s1["train"]}
    val_q = [r["question"] for r in s1["validation"]]
    test_q = [r["question"] for r in s1["test"]]
    assert not train_q & set(val_q)
    assert not train_q & set(test_q)
    assert not set(val_q) & set(test_q)
    assert len(set(val_q)) == len(val_q) and len(set(test_q)) == len(test_q)
    # The train split is generated from its own derived seed, not from `seed` itself.
    assert s1["train"] != S.generate(3000, seed=7)


def test_format_and_arithmetic_of_every_annotation():
    rows = S.generate(3000, seed=11)
    words = set()
    for row in rows:
        lines = row["answer"].split("\n")
        assert 3 <= len(lines) <= 5, row["answer"]  # 2-4 reasoning lines, then the final line
        m = re.fullmatch(r"#### (\d+)", lines[-1])
        assert m, lines[-1]
        final = int(m.group(1))
        assert S.final_answer(row["answer"]) == m.group(1)
        calcs = CALC_RE.findall(row["answer"])
        assert calcs, row["answer"]
        assert row["answer"].count("<<") == len(calcs)  # every annotation has the `a op b = ` form
        for a, op, b, _dollar, a2, op2, b2, r, shown in calcs:
            # The visible expression and the annotation agree, and the result is right.
            assert (a, op, b) == (a2, op2, b2)
            assert int(r) == int(shown) == _eval(int(a), op, int(b))
            assert int(r) < 1000
        assert int(calcs[-1][7]) == final
        for line in lines[:-1]:
            assert line.endswith("."), line
        words.update(re.findall(r"[A-Za-z]+", row["question"] + " " + row["answer"]))
    assert 100 <= len(words) <= 300, len(words)


@pytest.mark.parametrize("kind", S.KINDS)
def test_every_kind_solves_correctly(kind):
    rng = random.Random(kind)
    for _ in range(300):
        p = S.sample_params(kind, rng)
        ex = S.make_example(p, rng)
        assert int(S.final_answer(ex["answer"])) == S.solve(p)
        assert ex["question"] == S.render_question(p)
        operands = [int(x) for x in re.findall(r"\d+", ex["question"])]
        assert max(operands) <= 120 and S.solve(p) >= 0


def test_question_does_not_depend_on_phrasing():
    p = S.sample_params("add_subtract", random.Random(0))
    qs = {S.make_example(p, random.Random(i))["question"] for i in range(50)}
    assert len(qs) == 1


def test_choice_points_table():
    table = S.choice_points()
    assert len(table) >= 8
    for name, alts in table.items():
        weights = [w for _, w in alts]
        assert 2 <= len(alts) <= 4, name
        assert math.isclose(sum(weights), 1.0), name
        assert len(set(weights)) == len(weights), f"{name}: weights must be distinct (a unique rank order)"
    # The module docstring documents every choice point.
    for name in table:
        assert f"``{name}``" in S.__doc__


def _sample_answers(p, n, seed=0):
    rng = random.Random(seed)
    return [S.render_answer(p, rng) for _ in range(n)]


def test_multimodal_answers_match_the_weights_from_text():
    """For one fixed problem, the empirical frequencies read off the answer *text* match the weights."""
    n = 6000
    tol = 4 * math.sqrt(0.25 / n)  # four standard deviations of a proportion
    p = {"kind": "add", "a": "Tom", "b": "Anna", "item": ("apple", "apples"), "item2": ("pear", "pears"),
         "box": ("box", "boxes"), "box2": ("bag", "bags"), "x": 3, "y": 5}
    answers = _sample_answers(p, n)
    assert len(set(answers)) >= 20  # 3 verbs x 2 orders x 3 openers x 3 phrases = 54 possibilities
    weights = dict(S.choice_points()["opener"])
    openers = collections.Counter(a.split("\n")[1].split(",")[0] for a in answers)
    assert set(openers) == set(weights)
    for word, w in weights.items():
        assert abs(openers[word] / n - w) < tol, (word, openers[word] / n, w)
    # The rank order of the empirical frequencies is the rank order of the weights.
    assert sorted(openers, key=openers.get, reverse=True) == sorted(weights, key=weights.get, reverse=True)

    order_w = dict(S.choice_points()["add_order"])
    as_asked = sum("3 + 5 = <<3+5=8>>8" in a for a in answers) / n
    swapped = sum("5 + 3 = <<5+3=8>>8" in a for a in answers) / n
    assert math.isclose(as_asked + swapped, 1.0)
    assert abs(as_asked - order_w["as asked"]) < tol

    verb_w = dict(S.choice_points()["give_verb"])
    verbs = collections.Counter(a.split("\n")[0].split()[1] for a in answers)
    for verb, w in verb_w.items():
        assert abs(verbs[verb] / n - w) < tol, (verb, verbs[verb] / n, w)

    total_w = dict(S.choice_points()["total_phrase"])
    for phrase, w in total_w.items():
        freq = sum(a.split("\n")[1].endswith(f" {phrase}.") for a in answers) / n
        assert abs(freq - w) < tol, (phrase, freq, w)


def test_step_order_of_independent_steps():
    n = 4000
    tol = 4 * math.sqrt(0.25 / n)
    p = {"kind": "two_products", "a": "Mia", "b": "Leo", "item": ("cookie", "cookies"), "item2": ("egg", "eggs"),
         "box": ("jar", "jars"), "box2": ("tray", "trays"), "n": 2, "k": 3, "n2": 4, "k2": 5}
    answers = _sample_answers(p, n, seed=1)
    first_cookies = sum(a.split("\n")[0].endswith(" cookies.") for a in answers) / n
    assert abs(first_cookies - dict(S.choice_points()["step_order"])["as asked"]) < tol
    assert all(S.final_answer(a) == "26" for a in answers)
    assert len(set(answers)) >= 50


def test_every_choice_point_is_used_with_its_weight():
    """Across all kinds, the recorded draws of each choice point follow its weights."""
    draws: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rng = random.Random(5)
    for i in range(8000):
        kind = S.KINDS[i % len(S.KINDS)]
        trace: list[tuple[str, str]] = []
        S.make_example(S.sample_params(kind, rng), rng, trace)
        for point, alt in trace:
            draws[point][alt] += 1
    table = S.choice_points()
    assert set(draws) == set(table)
    for point, alts in table.items():
        total = sum(draws[point].values())
        tol = 4 * math.sqrt(0.25 / total)
        for alt, w in alts:
            assert abs(draws[point][alt] / total - w) < tol, (point, alt, draws[point][alt] / total, w)


def test_final_answer_parsing():
    assert S.final_answer("a\nb\n#### 42") == "42"
    assert S.final_answer("#### 1,234") == "1234"
    assert S.final_answer("#### -3.5") == "-3.5"
    assert S.final_answer("#### 1\nmore\n#### 7") == "7"
    assert S.final_answer("no answer here") == ""
    assert S.final_answer("") == ""
