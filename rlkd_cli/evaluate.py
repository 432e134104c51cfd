"""``rlkd evaluate``: downstream metrics of models, or of an existing predictions file.

Sources of outputs (exactly one):

* models: ``model.name_or_path=PATH`` and/or ``checkpoints=[A,B,...]`` and/or ``include_teacher=true``
  (the teacher's row, labelled ``teacher``). Each model generates a continuation of every prompt of
  the split (batched, KV cache, greedy unless ``eval.do_sample``) and is scored on it;
* ``predictions=FILE.jsonl``: lines ``{"id": ..., "prediction": "..."}`` (an optional ``model`` key
  groups lines into rows, so a ``predictions.jsonl`` written by this command can be re-scored),
  scored against the references of the split without loading any model.

The metric comes from the dataset config (``dataset.metric``):

``accuracy`` (GSM8K, synthetic_math)
    Exact match of the final number: the first number after ``####`` when the text has one, else
    the last number of the text; ``$`` and thousands separators are ignored and numbers compare as
    decimals (``18.0 == 18``). accuracy = correct / scored, where scored counts the examples whose
    reference has a final number.
``rougeL`` (Dolly, XSum)
    ROUGE-L F1 (longest common subsequence; ``rouge-score`` with Porter stemming) of every
    prediction against its reference; the corpus score is ``100 * mean_i F1_i``.
``perplexity`` (text, jsonl)
    ``exp(sum NLL / number of reference tokens)`` over the response tokens (the ``labels != -100``
    positions of :func:`rlkd_cli.dataset.build_split`, including the eos that ends each response),
    as in training's validation ``ppl``; no generation. For the other metrics the same perplexity is
    reported too when ``eval.perplexity=true``.

Each model uses its own tokenizer: ``tokenizer.name_or_path`` when set, else the tokenizer saved in
the model folder (rlkd checkpoints carry theirs), else the teacher's/embedded one
(:func:`rlkd_cli.engine.resolve_tokenizer`).

Output (in the run dir): ``results.json`` (dataset, split, metric, and one row per model with
``accuracy``/``rougeL``/``perplexity`` as they apply and the counts ``examples`` and ``scored``),
``predictions.jsonl`` (one line per example and model: ``id``, ``model``, ``prompt``,
``prediction``, ``reference`` and the example's score ``correct`` or ``rougeL``), and a rich table
on the console.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from rlkd_cli import dataset as data_mod
from rlkd_cli import models
from rlkd_cli.engine import choose_device_and_precision, resolve_tokenizer, shift_for_next_token
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import atomic_write_json, atomic_write_text, dumps, ensure_writable_dir
from rlkd_cli.losses import cross_entropy

log = logging.getLogger("rlkd.evaluate")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# ----------------------------------------------------------------------------------------------
# Scoring (pure functions)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Generation and perplexity
# ----------------------------------------------------------------------------------------------

def _bos_prefix(tokenizer) -> list[int]:
    """The BOS prefix training sequences start with (shared with :mod:`rlkd_cli.dataset`)."""
    return [int(t) for t in data_mod._bos_prefix(tokenizer)]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    require(pad is not None, "the tokenizer has neither a pad nor an eos token; use a causal-LM tokenizer")
    return int(pad)


def _stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any eos ids of the model's generation config (e.g. Llama 3's several)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    require(len(ids) > 0, "the tokenizer has no eos token, so generation could never stop; use a causal-LM tokenizer")
    return ids


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config (``max_position_embeddings``, ``n_positions``...)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt as training saw it (BOS prefix when the tokenizer adds one, no eos).

    A prompt longer than ``max_prompt_tokens`` keeps its prefix and its last tokens (cut from the
    left, like training's truncation, so the text right before the answer survives). An empty prompt
    becomes ``[eos]`` (a start token, GPT-2 style). Returns ``(ids, number of truncated prompts)``.
    """
    prefix = _bos_prefix(tokenizer)
    out: list[list[int]] = []
    truncated = 0
    for start in range(0, len(prompts), 1000):
        chunk = tokenizer(list(prompts[start:start + 1000]), add_special_tokens=False)["input_ids"]
        for ids in chunk:
            ids = prefix + list(ids)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                keep = max(max_prompt_tokens - len(prefix), 1)
                ids = prefix + ids[len(ids) - keep:]
                truncated += 1
            if not ids:
                ids = [int(tokenizer.eos_token_id)]
            out.append(ids)
    return out, truncated


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             max_prompt_tokens: int | None = None, progress=None) -> list[str]:
    """Continuations of ``prompts`` (in order), decoded without the prompt and cut at the first eos.

    Prompts are encoded as in training (:func:`encode_prompts`), sorted by length, left-padded into
    batches of ``batch_size`` with an attention mask (generate derives position ids from it, so a
    padded row computes what it would alone) and continued with ``model.generate`` and its KV cache
    for at most ``max_new_tokens`` tokens, stopping a row at eos. Greedy unless ``do_sample`` (then
    temperature and nucleus ``top_p`` sampling, no top-k, seeded with ``seed``). The decoded
    continuation has special tokens skipped and surrounding whitespace stripped.
    """
    require(batch_size >= 1 and max_new_tokens >= 1, "generate needs batch_size >= 1 and max_new_tokens >= 1")
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, truncated = encode_prompts(tokenizer, prompts, max_prompt_tokens=max_prompt_tokens)
    if truncated:
        log.warning("%d of %d prompts were longer than %d tokens and were cut from the left", truncated,
                    len(prompts), max_prompt_tokens)
    pad, stops = _pad_id(tokenizer), _stop_ids(model, tokenizer)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": pad, "eos_token_id": stops,
                              "use_cache": True, "num_beams": 1}
    if do_sample:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        torch.manual_seed(int(seed))
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(int(seed))
    else:
        kwargs.update(do_sample=False)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                n = len(ids[i])
                input_ids[j, width - n:] = torch.tensor(ids[i], dtype=torch.long)
                attention_mask[j, width - n:] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            new = out[:, width:].tolist()
            for j, i in enumerate(rows):
                tokens = new[j]
                cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
                outputs[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def reference_perplexity(model, tokenizer, dataset_cfg, split: str, *, limit: int | None,
                         batch_size: int) -> dict[str, float]:
    """Perplexity of the split's reference responses: ``exp(sum NLL / tokens)`` over the positions
    with ``labels != -100`` (response tokens and their eos; every token for ``text`` data sets).

    Returns ``{"perplexity": value, "perplexity_tokens": tokens, "perplexity_sequences": sequences}``; like training's validation, the
    log-softmax is over the tokenizer's vocabulary (padding rows of the output layer cut off) and
    the mean NLL is capped at 50 before ``exp``.
    """
    device = next(model.parameters()).device
    split_data = data_mod.build_split(dataset_cfg, tokenizer, split, limit=limit)
    ds = split_data.dataset
    pad, vocab = _pad_id(tokenizer), len(tokenizer)
    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = data_mod.collate([ds[i] for i in order[start:start + batch_size]], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, targets, mask = shift_for_next_token(logits, batch["labels"], vocab)
            nll += float(cross_entropy(logits, None, mask, labels=targets, reduction="sum"))
            count += int(mask.sum())
    finally:
        model.train(was_training)
    require(count > 0, f"dataset '{data_mod.dataset_cfg(dataset_cfg)['name']}' split '{split}' has no reference "
                       "tokens to measure perplexity on; check the dataset and split")
    return {"perplexity": math.exp(min(nll / count, 50.0)), "perplexity_tokens": count,
            "perplexity_sequences": len(ds)}


# ----------------------------------------------------------------------------------------------
# Config checks and sources
# ----------------------------------------------------------------------------------------------

def _eval_int(ec: DictConfig, key: str, *, allow_null: bool = False) -> int | None:
    value = ec.get(key)
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        null = " or null" if allow_null else ""
        raise RlkdError(f"eval.{key} must be an integer >= 1{null}, got {value!r}; e.g. eval.{key}=8")
    return int(value)


def _eval_float(ec: DictConfig, key: str) -> float:
    value = ec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RlkdError(f"eval.{key} must be a finite number, got {value!r}")
    return float(value)


def validate_eval(ec: DictConfig) -> dict[str, Any]:
    """Check ``eval.*`` before anything is loaded; return the values as plain Python."""
    out = {
        "limit": _eval_int(ec, "limit", allow_null=True),
        "batch_size": _eval_int(ec, "batch_size"),
        "max_new_tokens": _eval_int(ec, "max_new_tokens"),
        "do_sample": ec.get("do_sample", False),
        "temperature": _eval_float(ec, "temperature"),
        "top_p": _eval_float(ec, "top_p"),
        "seed": ec.get("seed", 0),
        "perplexity": ec.get("perplexity", True),
    }
    for key in ("do_sample", "perplexity"):
        require(isinstance(out[key], bool), f"eval.{key} must be true or false, got {out[key]!r}")
    require(isinstance(out["seed"], int) and not isinstance(out["seed"], bool),
            f"eval.seed must be an integer, got {out['seed']!r}")
    if out["do_sample"]:
        require(out["temperature"] > 0, f"eval.temperature must be > 0 when sampling, got {out['temperature']}; "
                "use eval.do_sample=false for greedy decoding")
        require(0 < out["top_p"] <= 1, f"eval.top_p must be in (0, 1], got {out['top_p']}")
    return out


def _model_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The models to evaluate: model.name_or_path, then checkpoints, then the teacher (if asked)."""
    specs: list[dict[str, Any]] = []
    mcfg = cfg.get("model") or {}
    if mcfg.get("name_or_path"):
        name = str(mcfg.name_or_path)
        require(Path(name).expanduser().exists() or not models._looks_local(name),
                f"model.name_or_path '{name}' does not exist; set it to a model folder (save_pretrained, or an rlkd "
                "checkpoints/step-* folder) or a hub id")
        specs.append({"label": str(mcfg.name_or_path), "role": "model", "path": str(mcfg.name_or_path),
                      "trust_remote_code": bool(mcfg.get("trust_remote_code", False))})
    checkpoints = cfg.get("checkpoints") or []
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    for c in checkpoints:
        path = Path(str(c)).expanduser()
        require(path.is_dir(), f"checkpoint '{c}' is not a folder; pass model folders written by rlkd "
                "(checkpoints/step-*) or save_pretrained, e.g. checkpoints=[outputs/distill/RUN/checkpoints/step-000300]")
        require((path / "config.json").is_file(), f"checkpoint '{c}' is not a model folder (no config.json); pass "
                "a checkpoints/step-* folder of an rlkd run, or a folder written by save_pretrained")
        specs.append({"label": str(c), "role": "checkpoint", "path": str(c),
                      "trust_remote_code": bool(mcfg.get("trust_remote_code", False))})
    seen: dict[str, str] = {}
    for s in specs:
        local = Path(s["path"]).expanduser()
        key = str(local.resolve()) if local.exists() else s["path"]
        if key in seen:
            raise RlkdError(f"model '{s['label']}' is given twice (as '{seen[key]}' too) in model.name_or_path / "
                            "checkpoints; list each model once")
        seen[key] = s["label"]
    include_teacher = cfg.get("include_teacher", False)
    require(isinstance(include_teacher, bool), f"include_teacher must be true or false, got {include_teacher!r}")
    if include_teacher:
        specs.append({"label": "teacher", "role": "teacher", "path": None,
                      "trust_remote_code": bool(cfg.teacher.get("trust_remote_code", False))})
    return specs


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
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RlkdError(f"cannot read predictions file '{path}' ({e}); give a UTF-8 JSON Lines file") from e
    groups: dict[str, dict[str, str]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
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


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

class _Run:
    """State shared by the steps of one evaluation: config, checked eval settings, metric, tokenizers."""

    def __init__(self, cfg: DictConfig, ev: dict[str, Any]):
        self.cfg = cfg
        self.ev = ev
        self.split = str(cfg.get("split", "test"))
        self.metric = data_mod.metric_name(cfg.dataset)
        self.dataset_name = data_mod.dataset_cfg(cfg.dataset)["name"]
        self._fallback_tokenizer = None
        self._tokenizers: dict[str, Any] = {}

    def fallback_tokenizer(self):
        """``tokenizer.name_or_path``, else the teacher's tokenizer, else the embedded BPE."""
        if self._fallback_tokenizer is None:
            self._fallback_tokenizer = resolve_tokenizer(self.cfg, [self.cfg.teacher])
        return self._fallback_tokenizer

    def tokenizer_for(self, path: str):
        """The tokenizer a model folder carries; tokenizer.name_or_path wins; else the fallback."""
        from rlkd_cli import tokenizer as tok_mod

        if self.cfg.tokenizer.get("name_or_path"):
            return self.fallback_tokenizer()
        if path in self._tokenizers:
            return self._tokenizers[path]
        local = Path(path).expanduser()
        if local.is_dir():
            if any((local / f).exists() for f in _TOKENIZER_FILES):
                tok = tok_mod.load_tokenizer(str(local), config_key="tokenizer.name_or_path")
            else:
                log.info("'%s' has no tokenizer files: using the teacher's/embedded tokenizer", path)
                tok = self.fallback_tokenizer()
        elif not local.exists() and not models._looks_local(path):
            tok = tok_mod.load_tokenizer(path, config_key="tokenizer.name_or_path")  # a hub id
        else:
            tok = self.fallback_tokenizer()
        self._tokenizers[path] = tok
        return tok


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate the configured source (models or a predictions file); write results.json and predictions.jsonl."""
    ev = validate_eval(cfg.eval)
    specs = _model_specs(cfg)
    predictions = cfg.get("predictions")
    if predictions is not None and str(predictions).strip() == "":
        predictions = None
    if predictions is not None and specs:
        raise RlkdError("give one source of outputs: predictions=FILE.jsonl scores a file without models; drop "
                        "model.name_or_path / checkpoints / include_teacher, or drop predictions")
    if predictions is None and not specs:
        raise RlkdError("nothing to evaluate; pass model.name_or_path=PATH, checkpoints=[A,B], include_teacher=true, "
                        "or predictions=FILE.jsonl (lines {\"id\": ..., \"prediction\": ...})")
    out_dir = ensure_writable_dir(out_dir)
    state = _Run(cfg, ev)
    if predictions is not None:
        rows, lines = _evaluate_predictions_file(state, str(predictions))
        source = "predictions"
    else:
        rows, lines = _evaluate_models(state, specs)
        source = "models"
    result = {
        "command": "evaluate", "source": source, "dataset": state.dataset_name, "split": state.split,
        "metric": state.metric, "predictions_file": str(predictions) if predictions is not None else None,
        "eval": ev, "models": rows,
    }
    atomic_write_json(out_dir / "results.json", result)
    atomic_write_text(out_dir / "predictions.jsonl",
                      "".join(dumps(line, ensure_ascii=False) + "\n" for line in lines))
    log.info("wrote %s and %s (%d lines)", out_dir / "results.json", out_dir / "predictions.jsonl", len(lines))
    _print_table(result)
    return result


def _prediction_lines(label: str, examples: list[dict], preds: list[str], per: list[dict]) -> list[dict]:
    return [{"id": ex["id"], "model": label, "prompt": ex["prompt"], "prediction": pred,
             "reference": ex["reference"], **extra} for ex, pred, extra in zip(examples, preds, per)]


def _evaluate_predictions_file(state: _Run, path: str) -> tuple[list[dict], list[dict]]:
    """Score a predictions file against the split's references (no model is loaded)."""
    cfg = state.cfg
    require(state.metric != "perplexity",
            f"dataset '{state.dataset_name}' is scored by perplexity, which needs a model, not a predictions "
            "file; pass model.name_or_path=PATH, or a dataset with metric accuracy or rougeL")
    groups = read_predictions(path, default_label=str(path))
    all_examples = data_mod.load_examples(cfg.dataset, state.split)
    known = {ex["id"] for ex in all_examples}
    examples = all_examples[: state.ev["limit"]] if state.ev["limit"] is not None else all_examples
    in_scope = {ex["id"] for ex in examples}
    unknown = [i for g in groups.values() for i in g if i not in known]
    if unknown:
        id_field = data_mod.dataset_cfg(cfg.dataset)["id_field"]
        hint = (f"ids are the values of the dataset's '{id_field}' column" if id_field else
                f"ids are the row indices 0..{len(all_examples) - 1} of the split")
        shown = ", ".join(repr(i) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise RlkdError(f"{len(unknown)} prediction id(s) in '{path}' are not in dataset '{state.dataset_name}' "
                        f"split '{state.split}' ({len(all_examples)} examples): {shown}; {hint}")
    rows, lines = [], []
    for label, preds_by_id in groups.items():
        scored_examples = [ex for ex in examples if ex["id"] in preds_by_id]
        ignored = sum(1 for i in preds_by_id if i not in in_scope)
        missing = len(examples) - len(scored_examples)
        if ignored:
            log.info("%s: %d prediction(s) beyond eval.limit=%s ignored", label, ignored, state.ev["limit"])
        if missing:
            log.warning("%s: %d of %d examples have no prediction; they are left out of the score", label,
                        missing, len(examples))
        require(len(scored_examples) > 0, f"'{path}' has no prediction for the first {len(examples)} examples "
                f"of dataset '{state.dataset_name}' split '{state.split}'; check the ids or eval.limit")
        preds = [preds_by_id[ex["id"]] for ex in scored_examples]
        corpus, per = score_predictions(state.metric, preds, [ex["reference"] for ex in scored_examples])
        rows.append({"model": label, "role": "predictions", "path": str(path), state.metric: corpus[state.metric],
                     "examples": len(scored_examples), "scored": corpus["scored"], "missing": missing})
        lines.extend(_prediction_lines(label, scored_examples, preds, per))
    return rows, lines


def _evaluate_models(state: _Run, specs: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Generate with and score every model in turn (one model in memory at a time)."""
    cfg, ev = state.cfg, state.ev
    device, precision = choose_device_and_precision(cfg.trainer)
    dtype = torch.bfloat16 if precision == "bf16" else None
    generate_text = state.metric in ("accuracy", "rougeL")
    examples = data_mod.load_examples(cfg.dataset, state.split, limit=ev["limit"]) if generate_text else []
    if generate_text:
        require(len(examples) > 0, f"dataset '{state.dataset_name}' split '{state.split}' has no examples; "
                "check dataset.path and eval.limit")
    rows, lines = [], []
    for spec in specs:
        if spec["role"] == "teacher":
            spec["path"] = models.ensure_teacher(cfg, state.fallback_tokenizer())
        tokenizer = state.tokenizer_for(spec["path"])
        log.info("evaluating %s (%s) on %s/%s", spec["label"], spec["path"], state.dataset_name, state.split)
        model = models.load_pretrained(spec["path"], role=spec["role"] if spec["role"] != "checkpoint" else "model",
                                       dtype=dtype, trust_remote_code=spec["trust_remote_code"])
        models.check_vocab(model, tokenizer, role="the teacher" if spec["role"] == "teacher" else f"'{spec['label']}'")
        model.to(device).eval()
        row: dict[str, Any] = {"model": spec["label"], "role": spec["role"], "path": str(spec["path"])}
        if generate_text:
            limit_ctx = context_length(model)
            max_prompt = None
            if limit_ctx is not None:
                require(ev["max_new_tokens"] < limit_ctx,
                        f"eval.max_new_tokens={ev['max_new_tokens']} leaves no room for the prompt in "
                        f"{spec['label']}'s context of {limit_ctx} tokens; lower eval.max_new_tokens")
                max_prompt = limit_ctx - ev["max_new_tokens"]
            t0 = time.perf_counter()
            with _progress(bool(cfg.trainer.get("progress", True)), len(examples), spec["label"]) as advance:
                preds = generate(model, tokenizer, [ex["prompt"] for ex in examples], batch_size=ev["batch_size"],
                                 max_new_tokens=ev["max_new_tokens"], do_sample=ev["do_sample"],
                                 temperature=ev["temperature"], top_p=ev["top_p"], seed=ev["seed"],
                                 max_prompt_tokens=max_prompt, progress=advance)
            gen_time = time.perf_counter() - t0
            corpus, per = score_predictions(state.metric, preds, [ex["reference"] for ex in examples])
            row[state.metric] = corpus[state.metric]
            row.update(examples=len(examples), scored=corpus["scored"], generation_time_s=round(gen_time, 3))
            lines.extend(_prediction_lines(spec["label"], examples, preds, per))
        if state.metric == "perplexity" or ev["perplexity"]:
            ppl = reference_perplexity(model, tokenizer, cfg.dataset, state.split, limit=ev["limit"],
                                       batch_size=ev["batch_size"])
            row.update(ppl)
            if not generate_text:
                row.update(examples=ppl["perplexity_sequences"], scored=ppl["perplexity_sequences"])
        rows.append(row)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, lines


class _progress:
    """A rich progress bar over generated examples (a no-op when disabled); yields ``advance(n)``."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=True)
        task = self.bar.add_task(f"generating ({Path(self.label).name or self.label})", total=self.total)
        self.bar.start()
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from rlkd_cli.alignment import short_label

    metric = result["metric"]
    table = Table(title=f"rlkd evaluate: {result['dataset']}/{result['split']} ({metric})")
    table.add_column("model", no_wrap=True)
    columns = [metric] if metric != "perplexity" else []
    if any("perplexity" in r for r in result["models"]):
        columns.append("perplexity")
    for c in columns:
        table.add_column({"accuracy": "accuracy", "rougeL": "ROUGE-L", "perplexity": "ppl"}[c], justify="right")
    table.add_column("examples", justify="right")
    table.add_column("scored", justify="right")
    for r in result["models"]:
        cells = [_fmt(r.get(c), 4 if c == "accuracy" else 2 if c == "rougeL" else 3) for c in columns]
        table.add_row(r["model"] if r.get("role") in ("teacher", "predictions") else short_label(str(r["model"])), *cells, str(r.get("examples", "-")), str(r.get("scored", "-")))
    console = Console()
    if not console.is_terminal:  # logs and pipes: no 80-column squeeze
        console = Console(width=200)
    console.print(table)


__all__ = ["accuracy_score", "context_length", "encode_prompts", "extract_final_number", "generate",
           "read_predictions", "reference_perplexity", "rouge_l", "run", "score_predictions", "validate_eval"]
