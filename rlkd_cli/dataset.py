"""The ``dataset`` config group: where rows come from, how they become prompts and responses, and
how they are tokenized for training and evaluation.

Three kinds of data set (``dataset.kind``):

``synthetic_math``
    The embedded task of :mod:`rlkd_cli.synthetic` (``path: null``), or the same schema read from
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

Public API: :func:`load_rows`, :func:`load_examples`, :func:`build_split`, :func:`collate`,
:func:`dataset_cfg`, :func:`metric_name`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rlkd_cli.errors import RlkdError, require

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
KINDS = ("synthetic_math", "prompt_response", "text")
METRICS = ("accuracy", "rougeL", "perplexity")
IGNORE_INDEX = -100

# Every key a dataset config may have, with the value used when a config leaves it out.
DEFAULTS: dict[str, Any] = {
    "name": "dataset",
    "kind": "prompt_response",
    "path": None,
    "hub_id": None,
    "hub_config": None,
    "splits": {"train": "train", "validation": "validation", "test": "test"},
    "validation_size": 200,
    "test_size": None,
    "fields": {},
    "prompt_template": "{prompt}",
    "prompt_template_no_input": None,
    "response_template": " {response}",
    "max_length": 512,
    "skip_malformed": False,
    "metric": "perplexity",
    "id_field": None,
    "limit": None,
    # synthetic_math only
    "seed": 0,
    "num_train": 20000,
    "num_validation": 256,
    "num_test": 256,
}

_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
_FILE_SUFFIXES = (".jsonl", ".json")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def dataset_cfg(cfg: Any) -> dict:
    """The dataset config as a plain, validated dict with every key of :data:`DEFAULTS`.

    Accepts the ``dataset`` node itself or a whole run config that has a ``dataset`` node,
    as an OmegaConf config or a mapping.
    """
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    require(isinstance(cfg, Mapping), "the dataset config must be a mapping (pick one with dataset=NAME)")
    if "kind" not in cfg and isinstance(cfg.get("dataset"), Mapping):
        cfg = cfg["dataset"]
    d = {**DEFAULTS, **dict(cfg)}
    d["fields"] = dict(d.get("fields") or {})
    d["splits"] = {**DEFAULTS["splits"], **dict(d.get("splits") or {})}
    name = d["name"]
    require(d["kind"] in KINDS, f"dataset '{name}': unknown dataset.kind={d['kind']!r}; use one of {', '.join(KINDS)}")
    require(d["metric"] in METRICS,
            f"dataset '{name}': unknown dataset.metric={d['metric']!r}; use one of {', '.join(METRICS)}")
    for key, low in (("max_length", 2), ("validation_size", 0)):
        v = d[key]
        require(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                f"dataset '{name}': dataset.{key}={v!r} must be an integer >= {low}")
    for key in ("test_size", "limit"):
        v = d[key]
        require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                f"dataset '{name}': dataset.{key}={v!r} must be null or an integer >= 0")
    return d


def metric_name(cfg: Any) -> str:
    """The metric the evaluator reports for this data set: accuracy, rougeL or perplexity."""
    return dataset_cfg(cfg)["metric"]


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------

@dataclass
class _Rows:
    rows: list[dict]
    source: str  # for messages: a file path, a hub id or "the synthetic generator"
    num_malformed: int = 0


def _check_split(split: str) -> None:
    require(split in SPLITS, f"unknown split '{split}'; use one of {', '.join(SPLITS)}")


def _resolve_local(path: str) -> Path:
    """``path`` as given; a relative path missing here is also tried against Hydra's original cwd."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            alt = Path(get_original_cwd()) / p
            if alt.exists():
                return alt
    except Exception:  # noqa: BLE001 - hydra absent or not running: use the path as given
        pass
    return p


def _looks_like_hub_id(path: str) -> bool:
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return False
    return not path.lower().endswith((".jsonl", ".json", ".gz", ".csv", ".parquet", ".txt"))


def _read_file(path: Path, name: str, skip_malformed: bool) -> _Rows:
    """Rows of a JSON Lines file (or a ``.json`` file holding a list of objects)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RlkdError(f"dataset '{name}': {path} is not UTF-8 text ({e.reason}); give a .jsonl file") from e
    except OSError as e:
        raise RlkdError(f"dataset '{name}': cannot read {path} ({e.strerror or e}); check dataset.path") from e
    require(text.strip() != "", f"dataset '{name}': {path} is empty (no rows); check dataset.path")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # maybe JSON Lines with a .json name: read it line by line below
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            obj = lists[0] if len(lists) == 1 else None
        if isinstance(obj, list):
            rows = [r for r in obj if isinstance(r, dict)]
            bad = len(obj) - len(rows)
            if bad and not skip_malformed:
                raise RlkdError(f"dataset '{name}': {path} holds {bad} list entries that are not JSON objects; "
                                f"fix them or set dataset.skip_malformed=true")
            require(rows, f"dataset '{name}': {path} is empty (no rows); check dataset.path")
            return _Rows(rows, str(path), bad)
    rows: list[dict] = []
    bad = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if not skip_malformed:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                raise RlkdError(f"dataset '{name}': {path}:{lineno}: malformed JSON line ({msg}); fix or remove "
                                f"that line, or set dataset.skip_malformed=true") from e
            bad += 1
            continue
        rows.append(row)
    if bad:
        log.warning("dataset '%s': skipped %d malformed line(s) in %s", name, bad, path)
    require(rows, f"dataset '{name}': {path} has no valid rows ({bad} malformed); check dataset.path")
    return _Rows(rows, str(path), bad)


def _folder_files(folder: Path, split: str, cfg: dict) -> list[Path]:
    """Files in ``folder`` that hold ``split``: exact stem first, else stems containing the name as a word."""
    names = []
    mapped = cfg["splits"].get(split)
    if mapped:
        names.append(str(mapped).lower())
    names.extend(n for n in _SPLIT_ALIASES[split] if n not in names)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _FILE_SUFFIXES)
    for n in names:
        exact = [p for p in files if p.stem.lower() == n]
        if exact:
            return exact[:1]
    for n in names:
        loose = [p for p in files if n in re.split(r"[^a-z0-9]+", p.stem.lower())]
        if loose:
            return loose
    return []


def _carve(cfg: dict, split: str, available: set[str], read: Callable[[str], _Rows], where: str) -> _Rows:
    """``split`` from a source offering the splits in ``available``; carve missing ones from train."""
    name = cfg["name"]
    carve_val = "validation" not in available
    carve_test = "test" not in available and bool(cfg["test_size"])
    if split in available and not (split == "train" and (carve_val or carve_test)):
        return read(split)
    if split == "test" and not carve_test:
        raise RlkdError(f"dataset '{name}' has no test split in {where}; add a test file or point dataset.path "
                        f"at a single file (its rows serve as the test split)")
    if "train" not in available:
        raise RlkdError(f"dataset '{name}' has no train split in {where} to take the {split} split from; "
                        f"add a train file or point dataset.path at a single file")
    got = read("train")
    rows = got.rows
    n_val = cfg["validation_size"] if carve_val else 0
    n_test = cfg["test_size"] if carve_test else 0
    require(n_val + n_test < len(rows),
            f"dataset '{name}': {where} has {len(rows)} train rows, too few to carve validation_size={n_val}"
            + (f" and test_size={n_test}" if n_test else "") + " rows; lower dataset.validation_size")
    end_train = len(rows) - n_val - n_test
    parts = {"train": rows[:end_train], "validation": rows[end_train:end_train + n_val],
             "test": rows[end_train + n_val:]}
    return _Rows(parts[split], got.source, got.num_malformed)


def _read_single_file(cfg: dict, split: str, path: Path) -> _Rows:
    got = _read_file(path, cfg["name"], cfg["skip_malformed"])
    if split == "test":
        return got
    n_val = cfg["validation_size"]
    require(n_val < len(got.rows) or split == "validation",
            f"dataset '{cfg['name']}': {path} has {len(got.rows)} rows, too few to keep validation_size={n_val} "
            f"rows apart from train; lower dataset.validation_size")
    n_val = min(n_val, len(got.rows))
    cut = len(got.rows) - n_val
    rows = got.rows[:cut] if split == "train" else got.rows[cut:]
    return _Rows(rows, got.source, got.num_malformed)


def _read_folder(cfg: dict, split: str, folder: Path) -> _Rows:
    found = {s: _folder_files(folder, s, cfg) for s in SPLITS}
    available = {s for s, files in found.items() if files}
    listing = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _FILE_SUFFIXES)) or "none"

    def read(s: str) -> _Rows:
        parts = [_read_file(p, cfg["name"], cfg["skip_malformed"]) for p in found[s]]
        return _Rows([r for part in parts for r in part.rows], ", ".join(p.source for p in parts),
                     sum(p.num_malformed for p in parts))

    return _carve(cfg, split, available, read, f"{folder} (data files: {listing})")


def _hub_error(hub_id: str, e: BaseException) -> RlkdError:
    detail = " ".join(str(e).split())[:200]
    return RlkdError(f"cannot load dataset '{hub_id}' from the hub (offline or unreachable, not cached); "
                     f"point dataset.path at a local file or folder [{type(e).__name__}: {detail}]")


def _read_hub(cfg: dict, split: str, hub_id: str, hub_config: str | None) -> _Rows:
    available = {s for s in SPLITS if cfg["splits"].get(s)}

    def read(s: str) -> _Rows:
        try:
            import datasets

            ds = datasets.load_dataset(hub_id, hub_config, split=cfg["splits"][s])
            rows = ds.to_list()
        except RlkdError:
            raise
        except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
            raise _hub_error(hub_id, e) from e
        return _Rows(rows, f"hub dataset {hub_id}" + (f" ({hub_config})" if hub_config else ""))

    return _carve(cfg, split, available, read, f"hub dataset '{hub_id}'")


@functools.lru_cache(maxsize=4)
def _synthetic_splits(num_train: int, num_validation: int, num_test: int, seed: int) -> dict[str, list[dict]]:
    from rlkd_cli.synthetic import generate_splits

    return generate_splits(num_train, num_validation, num_test, seed=seed)


def _load(cfg: dict, split: str) -> _Rows:
    _check_split(split)
    name, path = cfg["name"], cfg["path"]
    if path is None or str(path).strip() == "":
        if cfg["kind"] == "synthetic_math":
            rows = _synthetic_splits(int(cfg["num_train"]), int(cfg["num_validation"]), int(cfg["num_test"]),
                                     int(cfg["seed"]))[split]
            got = _Rows([dict(r) for r in rows], "the synthetic generator")
        elif cfg["hub_id"]:
            got = _read_hub(cfg, split, str(cfg["hub_id"]), cfg["hub_config"])
        else:
            raise RlkdError(f"dataset={name} needs dataset.path=FILE.jsonl (a file, a folder or a hub id)")
    else:
        path = str(path)
        local = _resolve_local(path)
        if local.is_dir():
            got = _read_folder(cfg, split, local)
        elif local.is_file():
            got = _read_single_file(cfg, split, local)
        elif _looks_like_hub_id(path):
            hub_config = cfg["hub_config"] if path == cfg["hub_id"] else None
            got = _read_hub(cfg, split, path, hub_config)
        else:
            raise RlkdError(f"dataset '{name}': no such file or folder '{path}'; set dataset.path to a "
                            f".jsonl file, a folder of <split>.jsonl files, or a hub id")
    if cfg["limit"] is not None:
        got.rows = got.rows[: cfg["limit"]]
    return got


def load_rows(cfg: Any, split: str) -> list[dict]:
    """The raw rows (dicts, as in the source) of ``split`` in {"train", "validation", "test"}."""
    return _load(dataset_cfg(cfg), split).rows


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


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render(cfg: dict, got: _Rows) -> list[dict]:
    name, fields = cfg["name"], cfg["fields"]
    text_kind = cfg["kind"] == "text"
    response_t = cfg["response_template"] or ("{text}" if text_kind else " {response}")
    prompt_t = "" if text_kind else (cfg["prompt_template"] or "")
    no_input_t = None if text_kind else cfg["prompt_template_no_input"]
    p_vars = _template_vars(prompt_t, name, "prompt_template")
    n_vars = _template_vars(no_input_t, name, "prompt_template_no_input")
    r_vars = _template_vars(response_t, name, "response_template")
    optional = [v for v in p_vars if v not in n_vars] if no_input_t else []
    all_vars = list(dict.fromkeys(p_vars + n_vars + r_vars))

    if not got.rows:
        return []  # nothing to check the columns against (an empty carved split, or limit=0)
    columns: dict[str, None] = {}
    for row in got.rows:
        for k in row:
            columns.setdefault(k, None)
    for var in all_vars:
        col = str(fields.get(var, var))
        if col not in columns:
            raise RlkdError(f"{name}: column '{col}' not found in {got.source} (columns: {', '.join(columns)}); "
                            f"set dataset.fields.{var}=<column>")

    id_field = cfg["id_field"]
    examples = []
    for i, row in enumerate(got.rows):
        values = {var: _text(row.get(str(fields.get(var, var)))) for var in all_vars}
        use_no_input = bool(optional) and any(values[v].strip() == "" for v in optional)
        prompt = (no_input_t if use_no_input else prompt_t).format_map(values) if prompt_t else ""
        response = response_t.format_map(values)
        ex_id = _text(row[id_field]) if id_field and row.get(id_field) is not None else str(i)
        examples.append({"id": ex_id, "prompt": prompt, "response": response, "reference": response.strip()})
    return examples


def load_examples(cfg: Any, split: str, *, limit: int | None = None) -> list[dict]:
    """Rows of ``split`` rendered to ``{"id", "prompt", "response", "reference"}``.

    ``response`` is the training target exactly as ``response_template`` renders it (with its
    leading space); ``reference`` is the same text stripped, the gold target for metrics. For
    ``text`` data sets the prompt is ``""``. ``id`` is the ``id_field`` column when the row has
    it, else the row's index in the split.
    """
    return _examples(dataset_cfg(cfg), split, limit)[0]


def _examples(d: dict, split: str, limit: int | None) -> tuple[list[dict], _Rows]:
    got = _load(d, split)
    if limit is not None:
        got.rows = got.rows[:limit]
    return _render(d, got), got


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------

@dataclass
class TokenizedSplit:
    """A tokenized split: ``dataset`` has int-list columns ``input_ids`` and ``labels``.

    ``stats``: num_rows (rendered rows), num_examples (kept sequences), num_truncated,
    num_dropped, num_tokens, num_response_tokens (labels != -100), num_malformed (skipped lines),
    num_dropped_tokens (text: the partial last block), num_documents (text).
    """

    dataset: Any
    stats: dict = field(default_factory=dict)


def _encode(tokenizer, texts: Sequence[str], batch: int = 1000) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out.extend(tokenizer(list(texts[i:i + batch]), add_special_tokens=False)["input_ids"])
    return out


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer itself prepends BOS when encoding (Llama-style), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_sp) > len(without) and with_sp[0] == bos and with_sp[1:1 + len(without)] == without:
        return [bos]
    return []


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    require(eos is not None, "the tokenizer has no eos token; use a causal-LM tokenizer that defines eos_token")
    return int(eos)


def _tail(ids: list[int], keep: int) -> list[int]:
    return ids[len(ids) - keep:] if keep > 0 else []


def tokenize_example(prefix: list[int], prompt_ids: list[int], response_ids: list[int], eos: int,
                     max_length: int) -> tuple[list[int], list[int], bool] | None:
    """One training sequence ``(input_ids, labels, truncated)``, or ``None`` if nothing is left to train.

    Untruncated: ``prefix + prompt + response + [eos]``, labels ``-100`` on ``prefix + prompt``.
    Too long: the prompt is cut from the left so that the whole ``response + [eos]`` fits, keeping
    at least ``prefix`` and the last prompt token (so the first response token has a context);
    if even that does not fit, the response's end is cut and no eos is appended (the model must not
    learn to stop where the text was cut).
    """
    prompt = prefix + prompt_ids
    if len(prompt) + len(response_ids) + 1 <= max_length:
        return prompt + response_ids + [eos], [IGNORE_INDEX] * len(prompt) + response_ids + [eos], False
    min_prompt = min(len(prompt), len(prefix) + 1)
    if min_prompt + len(response_ids) + 1 <= max_length:
        keep = max_length - len(response_ids) - 1
        cut = prefix + _tail(prompt_ids, keep - len(prefix))
        return cut + response_ids + [eos], [IGNORE_INDEX] * len(cut) + response_ids + [eos], True
    cut = prefix[:min_prompt] + _tail(prompt_ids, min_prompt - len(prefix))
    room = max_length - len(cut)
    if room <= 0:
        return None
    resp = response_ids[:room]
    return cut + resp, [IGNORE_INDEX] * len(cut) + resp, True


def _empty_error(d: dict, split: str, why: str) -> RlkdError:
    return RlkdError(f"dataset '{d['name']}' split '{split}' has no examples: {why}; check dataset.path"
                     + (" and dataset.limit" if d["limit"] is not None else ""))


def build_split(cfg: Any, tokenizer, split: str, *, limit: int | None = None) -> TokenizedSplit:
    """Tokenize ``split`` for training/evaluation (see :func:`tokenize_example` and the module doc)."""
    import datasets

    d = dataset_cfg(cfg)
    examples, got = _examples(d, split, limit)
    eos = _eos_id(tokenizer)
    prefix = _bos_prefix(tokenizer)
    max_length = d["max_length"]
    stats = {"num_rows": len(examples), "num_examples": 0, "num_truncated": 0, "num_dropped": 0, "num_tokens": 0,
             "num_response_tokens": 0, "num_malformed": got.num_malformed, "num_dropped_tokens": 0}
    if not examples:
        raise _empty_error(d, split, f"{got.source} gave 0 rows")
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    if d["kind"] == "text":
        docs = [ex["response"] for ex in examples if ex["response"] != ""]
        stream: list[int] = []
        for ids in _encode(tokenizer, docs):
            stream.extend(prefix)
            stream.extend(ids)
            stream.append(eos)
        n_blocks = len(stream) // max_length
        for b in range(n_blocks):
            block = stream[b * max_length:(b + 1) * max_length]
            input_ids.append(block)
            labels.append(list(block))
        stats["num_documents"] = len(docs)
        stats["num_dropped_tokens"] = len(stream) - n_blocks * max_length
        if not input_ids:
            raise _empty_error(d, split, f"its {len(docs)} documents have {len(stream)} tokens, fewer than one "
                                         f"block of max_length={max_length}; lower dataset.max_length")
    else:
        prompts = _encode(tokenizer, [ex["prompt"] for ex in examples])
        responses = _encode(tokenizer, [ex["response"] for ex in examples])
        for p_ids, r_ids in zip(prompts, responses):
            out = tokenize_example(prefix, p_ids, r_ids, eos, max_length)
            if out is None:
                stats["num_dropped"] += 1
                stats["num_truncated"] += 1
                continue
            ids, labs, truncated = out
            stats["num_truncated"] += int(truncated)
            input_ids.append(ids)
            labels.append(labs)
        if not input_ids:
            raise _empty_error(d, split, f"all {len(examples)} examples were dropped (max_length={max_length} "
                                         f"leaves no response token); raise dataset.max_length")
        if stats["num_truncated"]:
            log.info("dataset '%s' split '%s': %d of %d examples truncated to max_length=%d (%d dropped)",
                     d["name"], split, stats["num_truncated"], len(examples), max_length, stats["num_dropped"])
    stats["num_examples"] = len(input_ids)
    stats["num_tokens"] = sum(len(x) for x in input_ids)
    stats["num_response_tokens"] = sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in labels)
    ds = datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    return TokenizedSplit(dataset=ds, stats=stats)


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


__all__ = ["DEFAULTS", "IGNORE_INDEX", "KINDS", "METRICS", "SPLITS", "TokenizedSplit", "build_split", "collate",
           "dataset_cfg", "load_examples", "load_rows", "metric_name", "tokenize_example"]
