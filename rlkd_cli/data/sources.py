"""Where a data set's rows come from: the synthetic generator, JSON Lines files, folders, or the hub.

:func:`load` returns the raw rows (dicts, as in the source) of one split of a dataset config (see
:mod:`rlkd_cli.data.dataset` for the keys). JSON Lines files are read per the format: one JSON
object per line, lines ending at ``\\n`` only (a U+2028 inside a string is text, not a line end),
a UTF-8 byte-order mark accepted (:func:`rlkd_cli.io.jsonl_lines`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlkd_cli.errors import RlkdError, require
from rlkd_cli.io import jsonl_lines

log = logging.getLogger("rlkd.data")

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
_FILE_SUFFIXES = (".jsonl", ".json")


@dataclass
class _Rows:
    rows: list[dict]
    source: str  # for messages: a file path, a hub id or "the synthetic generator"
    num_malformed: int = 0
    lines: list[str] | None = None  # for messages: each row's "file:line" (rows read from files)

    def where(self, i: int) -> str:
        """Where row ``i`` came from, for a message: ``file:line``, else ``row N of SOURCE``."""
        return self.lines[i] if self.lines is not None else f"row {i + 1} of {self.source}"

    def take(self, start: int, stop: int | None) -> "_Rows":
        """Rows ``start:stop``, their locations alongside."""
        lines = self.lines[start:stop] if self.lines is not None else None
        return _Rows(self.rows[start:stop], self.source, self.num_malformed, lines)


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
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark is dropped)
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
    lines: list[str] = []
    bad = 0
    for lineno, line in jsonl_lines(text):
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
        lines.append(f"{path}:{lineno}")
    if bad:
        log.warning("dataset '%s': skipped %d malformed line(s) in %s", name, bad, path)
    require(rows, f"dataset '{name}': {path} has no valid rows ({bad} malformed); check dataset.path")
    return _Rows(rows, str(path), bad, lines)


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
    parts = {"train": (0, end_train), "validation": (end_train, end_train + n_val), "test": (end_train + n_val, None)}
    return got.take(*parts[split])


def _read_single_file(cfg: dict, split: str, path: Path, check: Callable[[_Rows], None]) -> _Rows:
    got = _read_file(path, cfg["name"], cfg["skip_malformed"])
    check(got)
    if split == "test":
        return got
    n_val = cfg["validation_size"]
    require(n_val < len(got.rows) or split == "validation",
            f"dataset '{cfg['name']}': {path} has {len(got.rows)} rows, too few to keep validation_size={n_val} "
            f"rows apart from train; lower dataset.validation_size")
    n_val = min(n_val, len(got.rows))
    cut = len(got.rows) - n_val
    return got.take(0, cut) if split == "train" else got.take(cut, None)


def _read_folder(cfg: dict, split: str, folder: Path, check: Callable[[_Rows], None]) -> _Rows:
    found = {s: _folder_files(folder, s, cfg) for s in SPLITS}
    available = {s for s, files in found.items() if files}
    listing = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _FILE_SUFFIXES)) or "none"

    def read(s: str) -> _Rows:
        parts = [_read_file(p, cfg["name"], cfg["skip_malformed"]) for p in found[s]]
        lines = [loc for part in parts for loc in (part.lines or [part.source] * len(part.rows))]
        got = _Rows([r for part in parts for r in part.rows], ", ".join(p.source for p in parts),
                    sum(p.num_malformed for p in parts), lines)
        check(got)
        return got

    return _carve(cfg, split, available, read, f"{folder} (data files: {listing})")


def _hub_error(hub_id: str, e: BaseException) -> RlkdError:
    detail = " ".join(str(e).split())[:200]
    return RlkdError(f"cannot load dataset '{hub_id}' from the hub (offline or unreachable, not cached); "
                     f"point dataset.path at a local file or folder [{type(e).__name__}: {detail}]")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint accepts a connection (one quick try; behind a proxy it is assumed to)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_quietly():
    """Load from the hub without its retry warnings (five "Retrying in Ns" lines before rlkd's one error line),
    and offline (the local cache only, at once) when the hub cannot be reached."""
    import datasets
    from huggingface_hub import constants

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    offline = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if not _hub_reachable():
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = offline
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _read_hub(cfg: dict, split: str, hub_id: str, hub_config: str | None, check: Callable[[_Rows], None]) -> _Rows:
    available = {s for s in SPLITS if cfg["splits"].get(s)}

    def read(s: str) -> _Rows:
        try:
            import datasets

            with _hub_quietly():
                ds = datasets.load_dataset(hub_id, hub_config, split=cfg["splits"][s])
            rows = ds.to_list()
        except RlkdError:
            raise
        except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
            raise _hub_error(hub_id, e) from e
        got = _Rows(rows, f"hub dataset {hub_id}" + (f" ({hub_config})" if hub_config else ""))
        check(got)
        return got

    return _carve(cfg, split, available, read, f"hub dataset '{hub_id}'")


@functools.lru_cache(maxsize=4)
def _synthetic_splits(num_train: int, num_validation: int, num_test: int, seed: int) -> dict[str, list[dict]]:
    from rlkd_cli.data.synthetic import generate_splits

    return generate_splits(num_train, num_validation, num_test, seed=seed)


def locate(cfg: dict) -> tuple[str, Any]:
    """Where the data set's rows come from, without reading them: ``("synthetic", None)``, ``("folder", Path)``,
    ``("file", Path)`` or ``("hub", id)``; one line naming ``dataset.path`` when it is none of them."""
    name, path = cfg["name"], cfg["path"]
    if path is None or str(path).strip() == "":
        if cfg["kind"] == "synthetic_math":
            return "synthetic", None
        require(bool(cfg["hub_id"]), f"dataset={name} needs dataset.path=FILE.jsonl (a file, a folder or a hub id)")
        return "hub", str(cfg["hub_id"])
    path = str(path)
    local = _resolve_local(path)
    if local.is_dir():
        return "folder", local
    if local.is_file():
        return "file", local
    require(_looks_like_hub_id(path), f"dataset '{name}': no such file or folder '{path}'; set dataset.path to a "
                                      ".jsonl file, a folder of <split>.jsonl files, or a hub id")
    return "hub", path


def load(cfg: dict, split: str, check: Callable[[_Rows], None] | None = None) -> _Rows:
    """The rows of ``split``; ``check`` sees the rows as read (a whole file, folder split or hub split), before
    any split is carved from them or counted, so a wrong column is reported before a row count."""
    _check_split(split)
    check = check or (lambda got: None)
    kind, where = locate(cfg)
    if kind == "synthetic":
        rows = _synthetic_splits(int(cfg["num_train"]), int(cfg["num_validation"]), int(cfg["num_test"]),
                                 int(cfg["seed"]))[split]
        got = _Rows([dict(r) for r in rows], "the synthetic generator")
        check(got)
    elif kind == "folder":
        got = _read_folder(cfg, split, where, check)
    elif kind == "file":
        got = _read_single_file(cfg, split, where, check)
    else:
        hub_config = cfg["hub_config"] if where == cfg["hub_id"] else None
        got = _read_hub(cfg, split, where, hub_config, check)
    if cfg["limit"] is not None:
        got = got.take(0, cfg["limit"])
    return got


