"""The ``dataset`` config group: where rows come from, how they become prompts and responses, and
how they are tokenized for training and evaluation.

Three kinds of data set (``dataset.kind``):

``synthetic_math``
    The embedded task of :mod:`rlkd_cli.data.synthetic` (``path: null``), or the same schema read from
    ``path``. Rendered like ``prompt_response``.
``prompt_response``
    Rows are rendered with ``prompt_template`` and ``response_template`` (``str.format`` templates
    whose ``{variables}`` are looked up in the row through ``fields``: variable -> column). If
    ``prompt_template_no_input`` is set, it is used for rows where a variable that only
    ``prompt_template`` uses is empty (Alpaca's with/without-input prompts for Dolly).
    Loss is on the response only: ``labels = -100`` on the prompt, the response ids followed by
    ``eos`` (trained on, so the model learns to stop).
``text``
    Plain documents (``response_template``, default ``{text}``), each tokenized and followed by
    ``eos``, concatenated and cut into blocks of exactly ``max_length`` tokens; the last partial
    block is dropped (``stats["num_dropped_tokens"]``). Loss is on every token.

Sources (``dataset.path``; ``null`` means the default: the generator, or ``hub_id``):

* a ``.jsonl`` (JSON Lines) or ``.json`` (a list of objects) file: it serves every split --
  train is all rows but the last ``validation_size``, validation is those, test is all rows;
* a folder holding ``<split>.jsonl`` files, or files whose name contains the split name as a word
  (``test_sample.jsonl``; ``valid``/``val``/``dev`` also name the validation split);
* a hub id, loaded with ``datasets.load_dataset(hub_id, hub_config, split=splits[split])``.

When a folder or hub source has no validation split (``splits.validation: null`` for the hub), the
last ``validation_size`` rows of train are carved off as validation and removed from train; with
``test_size`` set and no test split, the last ``test_size`` rows of train (before the validation
rows) become test. Carving is deterministic (the file's or the hub's row order). ``limit`` keeps
the first ``limit`` rows of each split.

Where rows come from is :mod:`rlkd_cli.data.sources`. Tokenization runs through
``datasets.Dataset.map`` (batched); with a ``cache_dir`` its result is kept on disk under a
fingerprint of everything it depends on (the rendered texts, the tokenizer, ``max_length``, the
code's version), so reruns and the jobs of a sweep load it instead of tokenizing again.

Public API: :func:`load_rows`, :func:`load_examples`, :func:`build_split`, :func:`collate`,
:func:`dataset_cfg`, :func:`metric_name`.
"""


from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rlkd_cli import schema
from rlkd_cli.data import sources
from rlkd_cli.data.sources import SPLITS, _Rows
from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import file_lock

log = logging.getLogger("rlkd.data")

KINDS = ("synthetic_math", "prompt_response", "text")
METRICS = ("accuracy", "rougeL", "perplexity")
IGNORE_INDEX = -100
#: Bumped whenever tokenization changes what it produces (part of the on-disk cache's fingerprint).
TOKENIZATION_VERSION = 3
#: The column in which ``rlkd generate`` marks a response cut off at ``max_new_tokens`` (``false``): such a
#: response is trained without an eos, so the model does not learn to stop where the text was cut.
ENDED_COLUMN = "ended_with_eos"


# Every key a dataset config may have, with the value used when a config leaves it out
# (rlkd_cli.schema.DatasetConfig: the group's schema).
DEFAULTS: dict[str, Any] = schema.dataset_defaults()


def dataset_cfg(cfg: Any) -> dict:
    """The dataset config as a plain, checked dict with every key of :data:`DEFAULTS`.

    Accepts the ``dataset`` node itself or a whole run config that has a ``dataset`` node, as an
    OmegaConf config or a mapping; unknown keys, wrong types and out-of-range values are one line
    naming the key (:func:`rlkd_cli.schema.check`).
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    require(isinstance(cfg, Mapping), "the dataset config must be a mapping (pick one with dataset=NAME)")
    if "kind" not in cfg and isinstance(cfg.get("dataset"), Mapping):
        cfg = cfg["dataset"]
    schema.check(dict(cfg), schema.DatasetConfig, "dataset")
    d = {**DEFAULTS, **dict(cfg)}
    d["fields"] = dict(d.get("fields") or {})
    d["splits"] = {**DEFAULTS["splits"], **dict(d.get("splits") or {})}
    return d


def metric_name(cfg: Any) -> str:
    """The metric the evaluator reports for this data set: accuracy, rougeL or perplexity."""
    return dataset_cfg(cfg)["metric"]



def check_found(cfg: Any) -> None:
    """One line naming ``dataset.path`` when the data set cannot be found (before anything trains on it)."""
    sources.locate(dataset_cfg(cfg))


def is_embedded(cfg: Any) -> bool:
    """Whether the data set is the embedded default (the synthetic generator, no ``dataset.path``)."""
    d = dataset_cfg(cfg)
    return d["kind"] == "synthetic_math" and (d["path"] is None or str(d["path"]).strip() == "")


#: The columns by which an ``rlkd generate`` file says which model wrote each row.
GENERATED_COLUMNS = ("model", ENDED_COLUMN, "generated_tokens")


def generated_by(cfg: Any) -> str | None:
    """The model that wrote the data set's train rows when they are one teacher's ``rlkd generate`` output
    (every row names the same ``model``, with ``role`` teacher or unrecorded), else ``None``."""
    d = dataset_cfg(cfg)
    if sources.locate(d)[0] not in ("file", "folder"):
        return None
    rows = sources.load(d, "train").rows
    if not rows or not all(all(c in r for c in GENERATED_COLUMNS) for r in rows):
        return None
    writers = {str(r["model"]) for r in rows}
    roles = {r.get("role") for r in rows}
    return writers.pop() if len(writers) == 1 and roles <= {None, "teacher"} else None


def load_rows(cfg: Any, split: str) -> list[dict]:
    """The raw rows (dicts, as in the source) of ``split`` in {"train", "validation", "test"}."""
    return sources.load(dataset_cfg(cfg), split).rows


# --------------------------------------------------------------------------------------------
# Rendering rows into prompt / response
# --------------------------------------------------------------------------------------------

def _template_vars(template: str | None, name: str, key: str) -> list[str]:
    if not template:
        return []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise RlkdError(f"dataset '{name}': dataset.{key} is not a valid template ({e}); "
                        f"write variables as {{column}} and literal braces as {{{{ }}}}") from e
    out = []
    for _, var, _, _ in parsed:
        if var is None:
            continue
        require(var.isidentifier(), f"dataset '{name}': dataset.{key} uses {{{var}}}; variables must be plain "
                                    f"names such as {{question}}; write literal braces as {{{{ }}}}")
        if var not in out:
            out.append(var)
    return out


def _text(value: Any, *, column: str, var: str, where: str, name: str) -> str:
    """A cell as text: strings as they are, null as empty; anything else is refused, never turned into text
    (a JSON ``NaN`` would otherwise train as the word "nan", a number as its Python spelling)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    kind = {list: "a list", dict: "an object", bool: "a boolean"}.get(type(value), "a number")
    shown = kind if isinstance(value, (list, dict)) else f"{json.dumps(value)[:40]} ({kind})"
    raise RlkdError(f"dataset '{name}': {where} holds {shown} in column '{column}', where rlkd reads text; write it "
                    f"as a JSON string (\"...\"), or map another column with dataset.fields.{var}=<column>")


def _columns_of(cfg: dict, got: _Rows, all_vars: list[str]) -> None:
    """Every template variable's column exists in the source: one line naming all the missing ones otherwise."""
    if not got.rows:
        return  # nothing to check the columns against (an empty carved split, or limit=0)
    columns: dict[str, None] = {}
    for row in got.rows:
        for k in row:
            columns.setdefault(k, None)
    missing = {var: str(cfg["fields"].get(var, var)) for var in all_vars}
    missing = {var: col for var, col in missing.items() if col not in columns}
    if not missing:
        return
    names = ", ".join(f"'{c}'" for c in missing.values())
    fix = " ".join(f"dataset.fields.{var}=<column>" for var in missing)
    raise RlkdError(f"{cfg['name']}: column{'s' if len(missing) > 1 else ''} {names} not found in {got.source} "
                    f"(columns: {', '.join(columns)}); set {fix}")


def _template_set(cfg: dict) -> tuple[str, str | None, str, list[str], list[str]]:
    """``(prompt template, no-input template, response template, the variables only the prompt template uses
    (optional inputs), every variable)`` of the data set's templates."""
    name, text_kind = cfg["name"], cfg["kind"] == "text"
    response_t = cfg["response_template"] or ("{text}" if text_kind else " {response}")
    prompt_t = "" if text_kind else (cfg["prompt_template"] or "")
    no_input_t = None if text_kind else cfg["prompt_template_no_input"]
    p_vars = _template_vars(prompt_t, name, "prompt_template")
    n_vars = _template_vars(no_input_t, name, "prompt_template_no_input")
    r_vars = _template_vars(response_t, name, "response_template")
    optional = [v for v in p_vars if v not in n_vars] if no_input_t else []
    return prompt_t, no_input_t, response_t, optional, list(dict.fromkeys(p_vars + n_vars + r_vars))


def _response_state(row: dict, cols: list[str], values: dict[str, str], r_vars: list[str]) -> str | None:
    """Why a row has no response to train on (``missing``, ``null``, ``empty``), or ``None`` if it has one."""
    if any(c not in row for c in cols):
        return "missing"
    if any(row[c] is None for c in cols):
        return "null"
    if all(values[v].strip() == "" for v in r_vars):
        return "empty"
    return None


def _render(cfg: dict, got: _Rows) -> list[dict]:
    """Rows -> ``{"id", "prompt", "response", "reference"}``; rows without a response are left out, with a count."""
    name, fields = cfg["name"], cfg["fields"]
    prompt_t, no_input_t, response_t, optional, all_vars = _template_set(cfg)
    r_vars = _template_vars(response_t, name, "response_template")
    if not got.rows:
        return []  # nothing to check the columns against (an empty carved split, or limit=0)
    _columns_of(cfg, got, all_vars)
    id_field, r_cols = cfg["id_field"], [str(fields.get(v, v)) for v in r_vars]
    examples, skipped = [], {"missing": 0, "null": 0, "empty": 0}
    for i, row in enumerate(got.rows):
        values = {var: _text(row.get(str(fields.get(var, var))), column=str(fields.get(var, var)), var=var,
                             where=got.where(i), name=name) for var in all_vars}
        why = _response_state(row, r_cols, values, r_vars) if r_vars else None
        if why is not None:
            skipped[why] += 1
            continue
        use_no_input = bool(optional) and any(values[v].strip() == "" for v in optional)
        prompt = (no_input_t if use_no_input else prompt_t).format_map(values) if prompt_t else ""
        response = response_t.format_map(values)
        ex_id = str(row[id_field]) if id_field and row.get(id_field) is not None else str(i)
        examples.append({"id": ex_id, "prompt": prompt, "response": response, "reference": response.strip()})
        if row.get(ENDED_COLUMN) is False:  # cut off by generation: no eos after it
            examples[-1]["eos"] = False
    if not examples:
        raise RlkdError(f"dataset '{name}': every one of the {len(got.rows)} rows of {got.source} has a missing, null "
                        f"or empty response (column {', '.join(repr(c) for c in r_cols)}); point dataset.fields."
                        f"{r_vars[0]} at the column that holds the responses, or fix the data")
    if sum(skipped.values()):
        log.warning("dataset '%s' (%s): left out %d of %d rows without a response (%s)", name, got.source,
                    sum(skipped.values()), len(got.rows), ", ".join(f"{n} {k}" for k, n in skipped.items() if n))
    return examples


def load_examples(cfg: Any, split: str, *, limit: int | None = None) -> list[dict]:
    """Rows of ``split`` rendered to ``{"id", "prompt", "response", "reference"}``.

    ``response`` is the training target exactly as ``response_template`` renders it (with its
    leading space); ``reference`` is the same text stripped, the gold target for metrics. A row
    whose ``ended_with_eos`` column is ``false`` (``rlkd generate``'s mark of a response cut off at
    ``max_new_tokens``) also has ``"eos": False``: it is trained without an eos. For
    ``text`` data sets the prompt is ``""``. ``id`` is the ``id_field`` column when the row has
    it, else the row's index in the split.
    """
    return _examples(dataset_cfg(cfg), split, limit)[0]


def check(cfg: Any) -> None:
    """The data set as training will read it: found, its columns there, its train and validation rows
    rendered (every refusal of bad rows); one line before any tokenizer, teacher or model work."""
    d = dataset_cfg(cfg)
    level = log.level
    log.setLevel(logging.ERROR)  # (its warnings, e.g. rows left out, come once, when the splits are built)
    try:
        for split in ("train", "validation"):
            if not _examples(d, split, None)[0] and split == "train":
                raise _empty_error(d, split, "it has no rows")
    finally:
        log.setLevel(level)


def _examples(d: dict, split: str, limit: int | None) -> tuple[list[dict], _Rows]:
    all_vars = _template_set(d)[4]
    got = sources.load(d, split, check=lambda raw: _columns_of(d, raw, all_vars))
    if limit is not None:
        got = got.take(0, limit)
    return _render(d, got), got



# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------

@dataclass
class TokenizedSplit:
    """A tokenized split: ``dataset`` (a ``datasets.Dataset``) has int-list columns ``input_ids`` and ``labels``
    (and, for prompt/response data, ``prompt_ids``: the untruncated prompt that rollouts generate from).

    ``stats``: num_rows (rendered rows), num_examples (kept sequences), num_truncated,
    num_dropped, num_tokens, num_response_tokens (labels != -100), num_malformed (skipped lines),
    num_dropped_tokens (text: the partial last block), num_documents (text).
    ``fingerprint``: identifies the tokenized data (the same rows, tokenizer and settings give the
    same fingerprint); checkpoints and teacher caches record it.
    """

    dataset: Any
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer itself prepends BOS when encoding (Llama-style), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_sp) > len(without) and with_sp[0] == bos and with_sp[1:1 + len(without)] == without:
        return [int(bos)]
    return []


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    require(eos is not None, "the tokenizer has no eos token; use a causal-LM tokenizer that defines eos_token")
    return int(eos)


def _tail(ids: list[int], keep: int) -> list[int]:
    return ids[len(ids) - keep:] if keep > 0 else []


def tokenize_example(prefix: list[int], prompt_ids: list[int], response_ids: list[int], eos: int,
                     max_length: int, *, add_eos: bool = True) -> tuple[list[int], list[int], bool] | None:
    """One training sequence ``(input_ids, labels, truncated)``, or ``None`` if nothing is left to train.

    Untruncated: ``prefix + prompt + response + [eos]``, labels ``-100`` on ``prefix + prompt``.
    Too long: the prompt is cut from the left so that the whole ``response + [eos]`` fits, keeping
    at least ``prefix`` and the last prompt token (so the first response token has a context);
    if even that does not fit, the response's end is cut and no eos is appended (the model must not
    learn to stop where the text was cut). ``add_eos=False`` (a response that was itself cut off)
    never appends the eos.
    """
    prompt, end = prefix + prompt_ids, [eos] if add_eos else []
    if len(prompt) + len(response_ids) + len(end) <= max_length:
        return prompt + response_ids + end, [IGNORE_INDEX] * len(prompt) + response_ids + end, False
    min_prompt = min(len(prompt), len(prefix) + 1)
    if min_prompt + len(response_ids) + len(end) <= max_length:
        keep = max_length - len(response_ids) - len(end)
        cut = prefix + _tail(prompt_ids, keep - len(prefix))
        return cut + response_ids + end, [IGNORE_INDEX] * len(cut) + response_ids + end, True
    cut = prefix[:min_prompt] + _tail(prompt_ids, min_prompt - len(prefix))
    room = max_length - len(cut)
    if room <= 0:
        return None
    resp = response_ids[:room]
    return cut + resp, [IGNORE_INDEX] * len(cut) + resp, True


def generation_prompt(prefix: list[int], prompt_ids: list[int], max_length: int) -> list[int]:
    """The prompt as generation sees it: ``prefix + prompt``, cut from the left (prefix kept) to ``max_length``."""
    return prefix + _tail(prompt_ids, max(max_length - len(prefix), 1))


def _empty_error(d: dict, split: str, why: str) -> RlkdError:
    return RlkdError(f"dataset '{d['name']}' split '{split}' has no examples: {why}; check dataset.path"
                     + (" and dataset.limit" if d["limit"] is not None else ""))


def _fingerprint(d: dict, split: str, examples: list[dict], tokenizer, limit: int | None) -> str:
    """A hash of everything the tokenized split depends on."""
    from rlkd_cli.data.identity import fingerprint as tokenizer_fingerprint

    h = hashlib.sha256()
    h.update(json.dumps({"version": TOKENIZATION_VERSION, "kind": d["kind"], "max_length": d["max_length"],
                         "tokenizer": tokenizer_fingerprint(tokenizer), "split": split, "limit": limit},
                        sort_keys=True).encode())
    for ex in examples:
        for text in (ex["prompt"], ex["response"]):
            b = text.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        if ex.get("eos") is False:
            h.update(b"\x00no-eos")
    return h.hexdigest()[:20]


def _map(ds, fn, fingerprint: str, cache: Path | None, **kwargs):
    """``ds.map(fn, batched=True)``; with ``cache`` the result is the Arrow file ``cache/<fingerprint>.arrow``."""
    kwargs.setdefault("batched", True)
    if cache is None:
        return ds.map(fn, new_fingerprint=fingerprint, **kwargs)
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{fingerprint}.lock"):  # concurrent sweep jobs tokenize once
        return ds.map(fn, new_fingerprint=fingerprint, cache_file_name=str(cache / f"{fingerprint}.arrow"),
                      load_from_cache_file=True, **kwargs)


def _tokenize_pairs(d: dict, split: str, examples: list[dict], tokenizer, fp: str, cache: Path | None):
    """Prompt/response examples -> one training sequence each (:func:`tokenize_example`), plus ``prompt_ids``:
    the whole prompt (cut only to ``max_length - 1``), which on-policy rollouts generate from, since the
    training sequence's prompt may have been cut to make room for a reference response they do not use."""
    import datasets

    eos, prefix, max_length = _eos_id(tokenizer), _bos_prefix(tokenizer), d["max_length"]

    def encode(batch: dict) -> dict:
        prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "prompt_ids": []}
        for p_ids, r_ids, add_eos in zip(prompts, responses, batch["eos"]):
            seq = tokenize_example(prefix, p_ids, r_ids, eos, max_length, add_eos=add_eos)
            if seq is not None:
                out["input_ids"].append(seq[0])
                out["labels"].append(seq[1])
                out["truncated"].append(seq[2])
                out["prompt_ids"].append(generation_prompt(prefix, p_ids, max_length - 1))
        return out

    raw = datasets.Dataset.from_dict({"prompt": [e["prompt"] for e in examples],
                                      "response": [e["response"] for e in examples],
                                      "eos": [e.get("eos", True) for e in examples]})
    ds = _map(raw, encode, fp, cache, remove_columns=["prompt", "response", "eos"], batch_size=1000)
    n = len(ds)
    if n == 0:
        raise _empty_error(d, split, f"all {len(examples)} examples were dropped (max_length={max_length} "
                                     f"leaves no response token); raise dataset.max_length")
    n_trunc = _count_true(ds, "truncated")
    ds = ds.remove_columns(["truncated"])
    stats = {"num_truncated": n_trunc + len(examples) - n, "num_dropped": len(examples) - n}
    if stats["num_truncated"]:
        log.info("dataset '%s' split '%s': %d of %d examples truncated to max_length=%d (%d dropped)",
                 d["name"], split, stats["num_truncated"], len(examples), max_length, stats["num_dropped"])
    return ds, stats


def _tokenize_text(d: dict, split: str, examples: list[dict], tokenizer, fp: str, cache: Path | None):
    """Documents -> ``prefix + ids + [eos]`` each, concatenated, cut into blocks of ``max_length``."""
    import datasets

    eos, prefix, block = _eos_id(tokenizer), _bos_prefix(tokenizer), d["max_length"]
    docs = [ex["response"] for ex in examples]

    def encode(batch: dict) -> dict:
        return {"ids": [prefix + ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def pack(batch: dict) -> dict:
        stream = [t for ids in batch["ids"] for t in ids]
        blocks = [stream[i * block:(i + 1) * block] for i in range(len(stream) // block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    raw = datasets.Dataset.from_dict({"text": docs})
    per_doc = _map(raw, encode, fp + "-docs", cache, remove_columns=["text"], batch_size=1000)
    stream_len = _total_length(per_doc, "ids")
    ds = _map(per_doc, pack, fp, cache, remove_columns=["ids"], batch_size=None)
    if len(ds) == 0:
        raise _empty_error(d, split, f"its {len(docs)} documents have {stream_len} tokens, fewer than one "
                                     f"block of max_length={block}; lower dataset.max_length")
    return ds, {"num_documents": len(docs), "num_dropped_tokens": stream_len - len(ds) * block}


def _count_true(ds, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(ds.data.column(column)).as_py() or 0)


def _total_length(ds, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(ds.data.column(column))).as_py() or 0)


def _count_labelled(ds) -> int:
    import pyarrow.compute as pc

    flat = pc.list_flatten(ds.data.column("labels"))
    return int(pc.sum(pc.not_equal(flat, IGNORE_INDEX)).as_py() or 0)


def build_split(cfg: Any, tokenizer, split: str, *, limit: int | None = None,
                cache_dir: str | Path | None = None) -> TokenizedSplit:
    """Tokenize ``split`` for training/evaluation (see :func:`tokenize_example` and the module doc).

    ``limit`` keeps the first ``limit`` training sequences: examples, or for ``text`` data sets the
    packed blocks that are trained and measured (not documents). ``cache_dir`` keeps the tokenized
    split on disk, keyed by its fingerprint (:class:`TokenizedSplit`).
    """
    import datasets

    datasets.disable_progress_bars()
    d = dataset_cfg(cfg)
    text_kind = d["kind"] == "text"
    examples, got = _examples(d, split, None if text_kind else limit)
    if not examples:
        raise _empty_error(d, split, f"{got.source} gave 0 rows")
    fp = _fingerprint(d, split, examples, tokenizer, None if text_kind else limit)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    tokenize = _tokenize_text if text_kind else _tokenize_pairs
    ds, extra = tokenize(d, split, examples, tokenizer, fp, cache)
    if text_kind and limit is not None and limit < len(ds):
        ds = ds.select(range(limit))  # (its fingerprint follows: datasets derives it from the selection)
        fp = f"{fp}-{limit}"
    stats = {"num_rows": len(examples), "num_examples": len(ds), "num_truncated": 0, "num_dropped": 0,
             "num_tokens": _total_length(ds, "input_ids"), "num_response_tokens": _count_labelled(ds),
             "num_malformed": got.num_malformed, "num_dropped_tokens": 0, **extra}
    return TokenizedSplit(dataset=ds, stats=stats, fingerprint=fp)


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict:
    """Right-pad a batch: ``input_ids`` (pad id), ``attention_mask`` (1 on real tokens), ``labels``
    (-100 on padding; equal to ``input_ids`` when a feature has no ``labels``). All ``torch.long``."""
    import torch

    require(len(features) > 0, "cannot collate an empty batch")
    require(pad_token_id is not None, "the tokenizer has no pad token id; set one (pad = eos is fine)")
    seqs = [list(map(int, f["input_ids"])) for f in features]
    labs = [list(map(int, f["labels"])) if f.get("labels") is not None else list(s) for f, s in zip(features, seqs)]
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        require(len(lab) == len(s), f"feature {i}: labels ({len(lab)}) and input_ids ({len(s)}) differ in length")
        n = len(s)
        if n:
            input_ids[i, :n] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


__all__ = ["DEFAULTS", "ENDED_COLUMN", "check", "IGNORE_INDEX", "KINDS", "METRICS", "SPLITS", "TokenizedSplit", "build_split", "collate",
           "dataset_cfg", "generated_by", "generation_prompt", "is_embedded", "load_examples", "load_rows", "metric_name", "tokenize_example"]
