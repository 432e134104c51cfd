"""Scoring generated text against references (pure functions): GSM8K-style accuracy, ROUGE-L, predictions files.

``accuracy`` (GSM8K, synthetic_math)
    Exact match of the final number: the first number after ``####`` when the text has one, else
    the last number of the text; ``$`` and thousands separators are ignored and numbers compare as
    decimals (``18.0 == 18``). accuracy = correct / scored, where scored counts the examples whose
    reference has a final number.
``rougeL`` (Dolly, XSum)
    ROUGE-L F1 (longest common subsequence; ``rouge-score`` with Porter stemming) of every
    prediction against its reference; the corpus score is ``100 * mean_i F1_i``.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import jsonl_lines


# A number: optional minus sign (not when glued to a preceding word or digit, so "16-3" gives 16 and
# 3, not -3), digits with optional thousands groups (1,234,567), optional decimal part.
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_MARKER = "####"


def _numbers(text: str) -> list[str]:
    return [m.group(0).replace(",", "") for m in _NUMBER_RE.finditer(text)]


def extract_final_number(text: str | None) -> str | None:
    """The final answer of a GSM8K-style text as a plain number string, or ``None``.

    The first number after the first ``####`` when the text has ``####`` (``None`` if no number
    follows it), else the last number in the text. ``$`` signs and thousands separators are
    dropped: ``"#### $1,234"`` -> ``"1234"``, ``"so 3 + 4 = 7 apples"`` -> ``"7"``,
    ``"no digits"`` -> ``None``. A minus sign counts only when it starts a number (``"-5"``), not
    between two numbers (``"16-3"`` gives ``"3"``).
    """
    if not text:
        return None
    text = text.replace("$", "")
    if _MARKER in text:
        found = _numbers(text.split(_MARKER, 1)[1])
        return found[0] if found else None
    found = _numbers(text)
    return found[-1] if found else None


def _as_decimal(number: str | None) -> Decimal | None:
    if number is None:
        return None
    try:
        return Decimal(number)
    except InvalidOperation:
        return None


def accuracy_score(pred: str | None, ref: str | None) -> bool:
    """True when the final numbers of ``pred`` and ``ref`` (:func:`extract_final_number`) are equal
    as decimals (``"18.0"`` equals ``"18"``); False when either text has no final number."""
    p = _as_decimal(extract_final_number(pred))
    r = _as_decimal(extract_final_number(ref))
    return p is not None and r is not None and p == r


_ROUGE_SCORER = None


def _pin_absl_stream() -> None:
    """Keep rouge-score's ``absl.logging`` from closing someone else's stderr.

    absl's handler keeps the ``sys.stderr`` of import time. ``logging.config.dictConfig`` (Hydra
    configures logging for every job) closes every handler ever created, and absl's ``close()``
    closes its stream unless it is one of ``sys.stderr``/``sys.stdout``/``sys.__stderr__``. When
    stderr is redirected at import time (a multirun job, a test runner) and later restored, that
    would close the redirect's stream. Pointing the handler at the process's own stderr, which
    ``close()`` never closes, avoids it.
    """
    import sys

    try:
        from absl import logging as absl_logging

        handler = absl_logging.get_absl_handler().python_handler
    except (ImportError, AttributeError):  # pragma: no cover - absl not used / a future absl
        return
    if sys.__stderr__ is not None:
        handler.stream = sys.__stderr__


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F1 x 100 of ``preds[i]`` against ``refs[i]``.

    ROUGE-L F1 = 2 P R / (P + R) with P = LCS / |pred tokens| and R = LCS / |ref tokens|, LCS the
    longest common token subsequence; tokens are ``rouge-score``'s (lower-cased alphanumeric runs,
    Porter-stemmed). An empty prediction or reference scores 0. The corpus ROUGE-L is the mean.
    """
    global _ROUGE_SCORER
    require(len(preds) == len(refs), f"rouge_l needs as many predictions as references ({len(preds)} vs {len(refs)})")
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _pin_absl_stream()
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * _ROUGE_SCORER.score(str(r), str(p))["rougeL"].fmeasure for p, r in zip(preds, refs)]


def score_predictions(metric: str, predictions: Sequence[str], references: Sequence[str]) -> tuple[dict, list[dict]]:
    """Corpus score and per-example fields for ``accuracy`` or ``rougeL``.

    Returns ``({"accuracy" | "rougeL": value, "scored": n}, [per-example dict, ...])``; the
    per-example dicts hold ``correct``, ``pred_answer``, ``ref_answer`` (accuracy) or ``rougeL``.
    Accuracy is over the examples whose reference has a final number (the others get
    ``correct: null``); the value is ``nan`` when nothing could be scored.
    """
    if metric == "accuracy":
        per, hits, scored = [], 0, 0
        for pred, ref in zip(predictions, references):
            p, r = extract_final_number(pred), extract_final_number(ref)
            if _as_decimal(r) is None:
                per.append({"correct": None, "pred_answer": p, "ref_answer": r})
                continue
            ok = accuracy_score(pred, ref)
            scored += 1
            hits += int(ok)
            per.append({"correct": ok, "pred_answer": p, "ref_answer": r})
        return {"accuracy": hits / scored if scored else float("nan"), "scored": scored}, per
    if metric == "rougeL":
        scores = rouge_l(predictions, references)
        value = sum(scores) / len(scores) if scores else float("nan")
        return {"rougeL": value, "scored": len(scores)}, [{"rougeL": s} for s in scores]
    raise RlkdError(f"metric '{metric}' cannot score generated text; use accuracy or rougeL")



def _normalise_id(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def read_predictions(path: str | Path, *, default_label: str) -> dict[str, dict[str, str]]:
    """Parse a predictions file: ``{model label: {id: prediction}}`` in file order.

    Every non-blank line must be a JSON object with ``id`` and ``prediction`` (a string; numbers are
    turned into text); an optional ``model`` key names the row it belongs to (default
    ``default_label``). Problems are :class:`RlkdError` lines naming the file and line number.
    """
    p = Path(str(path)).expanduser()
    require(p.is_file(), f"predictions file '{path}' does not exist; pass predictions=FILE.jsonl "
            "(lines {\"id\": ..., \"prediction\": ...})")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise RlkdError(f"cannot read predictions file '{path}' ({e}); give a UTF-8 JSON Lines file") from e
    groups: dict[str, dict[str, str]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlkdError(f"{path}:{lineno}: malformed JSON line ({e.msg}); each line must be a JSON object "
                            "like {\"id\": \"0\", \"prediction\": \"...\"}") from e
        require(isinstance(row, dict), f"{path}:{lineno}: not a JSON object; each line must look like "
                "{\"id\": \"0\", \"prediction\": \"...\"}")
        require("prediction" in row, f"{path}:{lineno}: no 'prediction' key (keys: {', '.join(row) or 'none'}); "
                "each line needs {\"id\": ..., \"prediction\": \"...\"}")
        require("id" in row and row["id"] is not None, f"{path}:{lineno}: no 'id' key; each line needs the "
                "example's id (the row index in the split, or the dataset's id column)")
        pred = row["prediction"]
        if isinstance(pred, (int, float)) and not isinstance(pred, bool):
            pred = str(pred)
        require(isinstance(pred, str), f"{path}:{lineno}: 'prediction' must be a string, got {type(pred).__name__}")
        label = str(row.get("model") or default_label)
        ex_id = _normalise_id(row["id"])
        key = (label, ex_id)
        if key in first_line:
            raise RlkdError(f"{path}:{lineno}: id {ex_id!r} (model {label!r}) already appeared on line "
                            f"{first_line[key]}; keep one prediction per example")
        first_line[key] = lineno
        groups.setdefault(label, {})[ex_id] = pred
    require(bool(groups), f"predictions file '{path}' is empty (no lines); write one JSON object per line: "
            "{\"id\": ..., \"prediction\": \"...\"}")
    return groups

